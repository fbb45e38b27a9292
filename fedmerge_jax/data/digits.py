"""The offline default: scikit-learn's handwritten digits, split into clients with a
hidden group structure.

1,797 real 8x8 digit images ship inside scikit-learn, so nothing is downloaded. Clients
fall into `num_groups` hidden groups; each group sees the digits through its own
transform ('label_permutation': a fixed relabelling per group, group 0 the identity;
'rotation': group g's images rotated by g*90 degrees). One model cannot fit conflicting
groups, K merged models can: FedMerge with K >= num_groups should beat FedAvg.
"""

import numpy as np

from fedmerge_jax.data import partition
from fedmerge_jax.data.federated import FederatedData

GROUP_TRANSFORMS = ("label_permutation", "rotation", "none")


def group_transforms(num_groups: int, transform: str, num_classes: int, seed: int):
  """One (image_fn, label_map) per group; group 0 sees the data unchanged."""
  rng = np.random.default_rng(seed)
  out = []
  for g in range(num_groups):
    label_map = np.arange(num_classes)
    image_fn = lambda x: x
    if transform == "label_permutation" and g > 0:
      label_map = rng.permutation(num_classes)
    elif transform == "rotation":
      image_fn = lambda x, g=g: np.rot90(x, k=g % 4, axes=(1, 2))
    elif transform not in GROUP_TRANSFORMS:
      raise ValueError(f"data.group_transform={transform!r}; expected one of {GROUP_TRANSFORMS}.")
    out.append((image_fn, label_map))
  return out


def split_client(indices: np.ndarray, test_fraction: float, val_fraction: float, rng):
  """A client's examples -> (train, test, val) index arrays."""
  indices = rng.permutation(indices)
  n_test = int(round(len(indices) * test_fraction))
  n_val = int(round(len(indices) * val_fraction))
  return indices[n_test + n_val :], indices[:n_test], indices[n_test : n_test + n_val]


def load(data_config) -> FederatedData:
  """Builds the grouped digits federation described by `data_config`."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  # Imported here: ~1 s that only a run on these digits needs (not every import of the package).
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # [1797, 8, 8, 1] in [0, 1].
  labels = digits.target.astype(np.int32)
  num_classes = 10
  c = data_config
  if c.num_groups < 1 or c.num_clients < c.num_groups:
    raise ValueError(
      f"data.num_groups={c.num_groups} must be in [1, data.num_clients={c.num_clients}]."
    )
  parts = partition.partition_by_name(c.partition, labels, c, min_size=max(c.min_client_size, 10))
  transforms = group_transforms(c.num_groups, c.group_transform, num_classes, c.seed)
  groups = np.arange(c.num_clients) % c.num_groups  # Interleaved: ids reveal nothing.
  rng = np.random.default_rng(c.seed + 1)
  splits = {"train": {}, "test": {}, "val": {}}
  for client, indices in enumerate(parts):
    image_fn, label_map = transforms[groups[client]]
    cid = f"client_{client:03d}"
    for name, idx in zip(
      ("train", "test", "val"), split_client(indices, c.test_fraction, c.val_fraction, rng)
    ):
      splits[name][cid] = (np.ascontiguousarray(image_fn(images[idx])), label_map[labels[idx]])
  return FederatedData.from_arrays(
    splits["train"],
    splits["test"],
    splits["val"] if c.val_fraction > 0 else None,
    num_classes=num_classes,
    groups=dict(zip(splits["train"], groups)),
    name="digits_groups",
  )
