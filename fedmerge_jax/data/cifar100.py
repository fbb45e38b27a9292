"""CIFAR-100 split into 50 clients the two ways of the FedMerge paper (arXiv 2504.06768).

Both splits are the authors' (github.com/shutong043/FedMerge, loaddata.py) draw for draw
from data.seed (11 in the paper configs): the same per-client index sets, given CIFAR-100
in the original archives' order.
- 'cifar100_cluster' (data.partition='cluster'): `partition.cluster_partition`; clients
  in contiguous blocks, one per class cluster; validation = 10% of each train class.
- 'cifar100_personal' (data.partition='dirichlet'): train+test pooled and split by
  `partition.personal_partition` (capped Dirichlet(0.1), then per client 1/6 test and
  10% of the rest validation).

Images come, in this order of preference, from an original CIFAR-100 archive in
`data.data_dir` (read with NumPy: `cifar-100-binary.tar.gz`, the one TFDS downloads, or
`cifar-100-python.tar.gz`, the one torchvision and the authors use; either also
extracted), or from a prepared TFDS `cifar100` (read with `tfds.data_source`, no
TensorFlow). TFDS numbers each example by its record index in the binary archive ('id'
train_00000, ...): sorted by id, its order is the binary archive's. The splits keep the
images uint8; the authors' per-channel normalisation runs inside the jitted programs
(`INPUT_TRANSFORM`, the federation's `input_transform`)."""

import io
import os
import pickle
import tarfile
from typing import Optional, Tuple

from absl import logging
import numpy as np

from fedmerge_jax.data.errors import DataError
from fedmerge_jax.data import partition
from fedmerge_jax.data.federated import ClientArrays, FederatedData
from fedmerge_jax.data.transforms import Standardize

NUM_CLASSES = 100
# The authors' normalisation constants (their loaddata.generate_dataloader).
MEAN = np.array([0.5071, 0.4867, 0.4408], np.float32)
STD = np.array([0.2675, 0.2565, 0.2761], np.float32)
Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, y, test x, y.

PREPARE_HINT = (
  "Either put the original archive (cifar-100-binary.tar.gz or cifar-100-python.tar.gz "
  "from https://www.cs.toronto.edu/~kriz/cifar.html) in --config.data.data_dir, or "
  "prepare TFDS's cifar100 once in an environment with TensorFlow (its builder needs it): "
  'pip install tensorflow && python -c "import tensorflow_datasets as tfds; '
  "tfds.data_source('cifar100', data_dir='DIR')\" and pass --config.data.data_dir=DIR."
)


class Cifar100NotFoundError(DataError):
  """CIFAR-100 is neither in data.data_dir nor prepared for TFDS."""


def _read_binary(read) -> Arrays:
  """The binary archive: records of [coarse label, fine label, 3072 CHW pixels]."""
  out = []
  for name in ("train.bin", "test.bin"):
    records = np.frombuffer(read(name), np.uint8).reshape(-1, 2 + 3072)
    out += [
      records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
      records[:, 1].astype(np.int32),
    ]
  return tuple(out)


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles the python archive's dicts of bytes, lists and arrays, and nothing else."""

  _ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"CIFAR-100 pickle refers to {module}.{name}; refusing.")
    return super().find_class(module, name)


def _read_python(read) -> Arrays:
  """The python archive: pickled dicts with b'data' [N, 3072] (CHW) and b'fine_labels'."""
  out = []
  for name in ("train", "test"):
    batch = _ArrayUnpickler(io.BytesIO(read(name)), encoding="bytes").load()
    x = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    out += [x, np.asarray(batch[b"fine_labels"], np.int32)]
  return tuple(out)


_ARCHIVES = (("cifar-100-binary", _read_binary), ("cifar-100-python", _read_python))


def read_archive(data_dir: str) -> Optional[Arrays]:
  """Arrays from an original archive (.tar.gz or extracted) in data_dir; None if absent."""
  for stem, reader in _ARCHIVES:
    folder = os.path.join(data_dir, stem)
    if os.path.isdir(folder):

      def read(name, folder=folder):
        with open(os.path.join(folder, name), "rb") as f:
          return f.read()

      return reader(read)
    path = folder + ".tar.gz"
    if os.path.isfile(path):
      with tarfile.open(path, "r:gz") as tar:
        return reader(lambda name, tar=tar, stem=stem: tar.extractfile(f"{stem}/{name}").read())
  return None


def read_tfds(data_dir: str) -> Arrays:
  """Arrays from a prepared TFDS cifar100 (array_record), in the original order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    sources = tfds.data_source(
      "cifar100", split=["train", "test"], data_dir=data_dir or None, download=False
    )
  except Exception as e:  # TFDS fails in many ways on a missing or tfrecord copy.
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise Cifar100NotFoundError(
      f"CIFAR-100 not found: no cifar-100-binary / cifar-100-python archive in "
      f"data.data_dir={data_dir!r} and no prepared TFDS cifar100 (array_record) in {where} "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {PREPARE_HINT}"
    ) from e
  out = []
  for source in sources:
    examples = sorted((source[i] for i in range(len(source))), key=lambda ex: ex["id"])
    out += [
      np.stack([ex["image"] for ex in examples]).astype(np.uint8),
      np.array([ex["label"] for ex in examples], np.int32),
    ]
  return tuple(out)


def load_arrays(data_dir: str) -> Arrays:
  """(train_x, train_y, test_x, test_y): uint8 NHWC images and fine labels."""
  if data_dir:
    arrays = read_archive(os.path.expanduser(data_dir))
    if arrays is not None:
      return arrays
  return read_tfds(data_dir)


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 NHWC -> float32, standardised per channel with CIFAR-100's mean and std: the
  authors' normalisation, in NumPy (the loaders keep uint8 and apply `INPUT_TRANSFORM`)."""
  return (images.astype(np.float32) / 255.0 - MEAN) / STD


# What the model sees of the stored uint8 images: `normalize`, inside the jitted programs.
INPUT_TRANSFORM = Standardize(MEAN, STD, divide_by=255)


def client_split(images, labels, parts) -> ClientArrays:
  """The clients' examples `parts` (index arrays) as one ragged split of uint8 images (the
  model sees them through `INPUT_TRANSFORM`): one gather, no per-client copies."""
  order = np.concatenate([np.asarray(p, np.int64) for p in parts])
  offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
  return ClientArrays(
    np.asarray(images[order], np.uint8), np.asarray(labels[order], np.int32), offsets
  )


def _federation(name, train, test, val, groups=None) -> FederatedData:
  """Clients client_000.. with the splits `train`, `test` and `val` (None: no validation)."""
  return FederatedData(
    tuple(f"client_{i:03d}" for i in range(train.num_clients)),
    train,
    test,
    val,
    NUM_CLASSES,
    None if groups is None else np.asarray(groups, np.int32),
    name,
    INPUT_TRANSFORM,
  )


def _check_partition(c, expected: str) -> None:
  if c.partition != expected:
    raise ValueError(
      f"data.name={c.name!r} uses data.partition={expected!r}, got "
      f"{c.partition!r}; set --config.data.partition={expected}."
    )


def cluster_federation(arrays: Arrays, c) -> FederatedData:
  """The 'cluster' split of `arrays` described by data config `c`."""
  _check_partition(c, "cluster")
  train_x, train_y, test_x, test_y = arrays
  split = partition.cluster_partition(
    train_y,
    test_y,
    c.num_clients,
    c.num_clusters,
    c.classes_per_cluster,
    c.dirichlet_alpha,
    c.val_fraction,
    c.seed,
    num_classes=NUM_CLASSES,
  )
  return _federation(
    "cifar100_cluster",
    client_split(train_x, train_y, split.train),
    client_split(test_x, test_y, split.test),
    client_split(train_x, train_y, split.val) if c.val_fraction > 0 else None,
    split.client_cluster,
  )


def personal_federation(arrays: Arrays, c) -> FederatedData:
  """The 'personal' split of `arrays` (train and test pooled) described by data config `c`."""
  _check_partition(c, "dirichlet")
  train_x, train_y, test_x, test_y = arrays
  x, y = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
  train, val, test = partition.personal_partition(
    y,
    c.num_clients,
    c.dirichlet_alpha,
    c.min_client_size,
    c.test_fraction,
    c.val_fraction,
    c.seed,
    num_classes=NUM_CLASSES,
  )
  return _federation(
    "cifar100_personal",
    client_split(x, y, train),
    client_split(x, y, test),
    client_split(x, y, val) if c.val_fraction > 0 else None,
  )


def split_statistics(data: FederatedData) -> dict:
  """Plain-Python summary of a federation: clients per group, client sizes, classes each."""

  def sizes(arrays):
    n = arrays.counts
    return {
      "total": int(n.sum()),
      "min": int(n.min()),
      "median": float(np.median(n)),
      "max": int(n.max()),
    }

  present = np.zeros((data.num_clients, data.num_classes), bool)
  for i in range(data.num_clients):
    present[i, data.train.client(i)[1]] = True
  classes = present.sum(1)
  stats = {
    "name": data.name,
    "num_clients": data.num_clients,
    "train": sizes(data.train),
    "test": sizes(data.test),
    "classes_per_client": {
      "min": int(classes.min()),
      "median": float(np.median(classes)),
      "max": int(classes.max()),
    },
  }
  if data.val is not None:
    stats["val"] = sizes(data.val)
  if data.groups is not None:
    stats["clients_per_group"] = np.bincount(data.groups).tolist()
  return stats


def _load(build, c) -> FederatedData:
  data = build(load_arrays(c.data_dir), c)
  logging.info("%s split statistics: %s", data.name, split_statistics(data))
  return data


def load_cluster(data_config) -> FederatedData:
  """Loads CIFAR-100 and builds the paper's 'cluster' federation."""
  return _load(cluster_federation, data_config)


def load_personal(data_config) -> FederatedData:
  """Loads CIFAR-100 and builds the paper's 'personal' federation."""
  return _load(personal_federation, data_config)
