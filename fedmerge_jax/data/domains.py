"""Domain non-IID datasets: every domain (photo, sketch, ...) is split into its own clients.

- 'domainnet': TFDS `domainnet/<domain>` (Peng et al. 2019; 6 domains, 345 classes), read
  with `tfds.data_source` from an array_record preparation; train and test are pooled.
- 'pacs': a local folder `<data_dir>/<domain>/<class>/*.jpg|*.png` (Li et al. 2017;
  4 domains, 7 classes), classes sorted by name.

Each selected domain is split into `data.clients_per_domain` clients by `data.partition`
('iid', 'dirichlet', ...) within the domain; every client's examples are then split into
train/test/val by `data.test_fraction` / `data.val_fraction`. Images are squashed to
`data.image_size` x `data.image_size` RGB, float32 in [0, 1]; `groups` is the domain index.
"""

import io
import os
import zlib
from typing import Sequence, Tuple

from absl import logging
import numpy as np

from fedmerge_jax.data.errors import DataError
from fedmerge_jax.data import partition
from fedmerge_jax.data.digits import split_client
from fedmerge_jax.data.federated import FederatedData

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FOLDER_LAYOUT = "<data.data_dir>/<domain>/<class>/*.jpg|*.jpeg|*.png"

DOMAINNET_HOWTO = (
  "tfds.data_source reads DomainNet in the array_record format. Preparing it needs "
  "TensorFlow (TFDS's domainnet builder reads its files with tf.io.gfile) and downloads "
  "about 20 GB: in an environment with `pip install tensorflow tensorflow-datasets`, run "
  "`tfds build domainnet/<domain> --file_format=array_record --data_dir=DIR` for each "
  f"domain of {DOMAINNET_DOMAINS}, then copy DIR here if needed and pass "
  "--config.data.data_dir=DIR."
)
PACS_HOWTO = (
  "Download PACS (Li et al. 2017, https://domaingeneralization.github.io/; the 'kfold' "
  f"image folder) and point --config.data.data_dir at the folder that holds {PACS_DOMAINS} "
  f"(or at its parent holding kfold/). Expected layout: {FOLDER_LAYOUT}."
)


class DataNotFoundError(DataError):
  """A dataset's files are missing: says where they were looked for and how to get them."""


Domain = Tuple[str, np.ndarray, np.ndarray]  # (name, images [n, s, s, 3] uint8, labels [n]).


def decode_image(source, image_size: int) -> np.ndarray:
  """Encoded bytes or a file path -> [s, s, 3] uint8 RGB, squashed to s x s (bilinear)."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Domain datasets decode images with Pillow: pip install pillow") from e
  with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
    img.draft("RGB", (image_size, image_size))  # JPEG: decode at reduced size, faster.
    img = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(img, np.uint8)


def select_domains(requested: Sequence[str], available: Sequence[str], dataset: str):
  """`data.domains` checked against the dataset's domains, in canonical order; () : all."""
  unknown = sorted(set(requested) - set(available))
  if unknown:
    raise ValueError(f"data.domains has {unknown}, unknown to {dataset}; choose from {available}.")
  return tuple(d for d in available if not requested or d in requested)


def class_mapping(requested: Sequence[str], names: Sequence[str], dataset: str) -> np.ndarray:
  """[len(names)] new label per original class (-1: dropped) for `data.classes`; () : all."""
  if not requested:
    return np.arange(len(names))
  index = {n: i for i, n in enumerate(names)}
  unknown = [n for n in requested if n not in index]
  if unknown or len(set(requested)) != len(requested):
    raise ValueError(
      f"data.classes={tuple(requested)} must be distinct class names of "
      f"{dataset}; unknown: {unknown}; e.g. {tuple(names[:5])}."
    )
  mapping = np.full(len(names), -1)
  mapping[[index[n] for n in requested]] = np.arange(len(requested))
  return mapping


def _domain_seed(seed: int, domain: str) -> int:
  """A domain's own seed: its split does not depend on which other domains are used."""
  return int(np.random.SeedSequence((seed, zlib.crc32(domain.encode()))).generate_state(1)[0])


def federate_domains(
  domains: Sequence[Domain], data_config, num_classes: int, name: str
) -> FederatedData:
  """Splits each domain into data.clients_per_domain clients, then each client into splits."""
  c = data_config
  splits = {"train": {}, "test": {}, "val": {}}
  groups = {}
  for g, (domain, images, labels) in enumerate(domains):
    if not len(labels):
      raise ValueError(f"{name}: domain {domain!r} has no examples of the selected classes.")
    seed = _domain_seed(c.seed, domain)
    parts = partition.partition_by_name(
      c.partition, labels, c, num_clients=c.clients_per_domain, seed=seed
    )
    report = partition.describe_partition(labels, parts, num_classes)
    logging.info(
      "%s/%s: %d examples, %d clients, sizes min %d median %.0f max %d",
      name,
      domain,
      len(labels),
      len(parts),
      report["size_min"],
      report["size_median"],
      report["size_max"],
    )
    rng = np.random.default_rng(seed + 1)
    for i, indices in enumerate(parts):
      cid = f"{domain}_{i:03d}"
      groups[cid] = g
      for split, idx in zip(
        ("train", "test", "val"), split_client(indices, c.test_fraction, c.val_fraction, rng)
      ):
        splits[split][cid] = (images[idx].astype(np.float32) / 255.0, labels[idx].astype(np.int32))
  return FederatedData.from_arrays(
    splits["train"],
    splits["test"],
    splits["val"] if c.val_fraction > 0 else None,
    num_classes=num_classes,
    groups=groups,
    name=name,
  )


def read_image_folder(
  root: str, domains: Sequence[str], classes: Sequence[str], image_size: int, howto: str
) -> Tuple[Tuple[str, ...], list]:
  """`root/<domain>/<class>/*.jpg|png` -> (class names, [(domain, images, labels)]).

  Class names are the sorted union of the domains' class folders (or `classes`, in its
  order); files are read in sorted order, so the result is deterministic.
  """
  if not root:
    raise DataNotFoundError(f"data.data_dir is empty; it must name the image folder. {howto}")
  if not os.path.isdir(root):
    raise DataNotFoundError(f"Image folder {root!r} does not exist. {howto}")
  for d in domains:
    if not os.path.isdir(os.path.join(root, d)):
      raise DataNotFoundError(f"Domain folder {os.path.join(root, d)!r} is missing. {howto}")
  names = sorted(
    {
      k
      for d in domains
      for k in os.listdir(os.path.join(root, d))
      if os.path.isdir(os.path.join(root, d, k))
    }
  )
  mapping = class_mapping(classes, names, root)
  out = []
  for d in domains:
    images, labels = [], []
    for k, cls in enumerate(names):
      folder = os.path.join(root, d, cls)
      if mapping[k] < 0 or not os.path.isdir(folder):
        continue
      for f in sorted(os.listdir(folder)):
        if f.lower().endswith(IMAGE_SUFFIXES):
          images.append(decode_image(os.path.join(folder, f), image_size))
          labels.append(mapping[k])
    if not labels:
      raise DataNotFoundError(
        f"Domain folder {os.path.join(root, d)!r} has no images of the selected classes. {howto}"
      )
    out.append((d, np.stack(images), np.array(labels, np.int32)))
  return tuple(classes) or tuple(names), out


def load_pacs(data_config) -> FederatedData:
  """PACS from a local folder, each domain split into data.clients_per_domain clients."""
  c = data_config
  domains = select_domains(c.domains, PACS_DOMAINS, "pacs")
  root = c.data_dir
  if root and not os.path.isdir(os.path.join(root, domains[0])):
    if os.path.isdir(os.path.join(root, "kfold", domains[0])):
      root = os.path.join(root, "kfold")  # The official release's folder name.
  names, per_domain = read_image_folder(root, domains, c.classes, c.image_size, PACS_HOWTO)
  return federate_domains(per_domain, c, len(names), "pacs")


def _tfds_split(domain: str, split: str, data_dir):
  """TFDS `domainnet/<domain>` `split` as a data source whose images stay encoded bytes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(
      f"domainnet/{domain}",
      split=split,
      data_dir=data_dir,
      download=False,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # TFDS raises several types for "not prepared (as array_record)".
    where = tfds.builder(f"domainnet/{domain}", data_dir=data_dir).data_dir
    raise DataNotFoundError(
      f"DomainNet domain {domain!r} is not prepared for tfds.data_source "
      f"under {where!r} ({type(e).__name__}: {e}). {DOMAINNET_HOWTO}"
    ) from e


def _read_tfds_domain(domain: str, data_dir, mapping: np.ndarray, image_size: int) -> Domain:
  """One DomainNet domain (TFDS train and test pooled), selected classes only."""
  images, labels = [], []
  for split in ("train", "test"):
    source = _tfds_split(domain, split, data_dir)
    for i in range(len(source)):
      example = source[i]  # Only the selected classes' images are decoded.
      label = mapping[int(example["label"])]
      if label >= 0:
        images.append(decode_image(bytes(example["image"]), image_size))
        labels.append(label)
  shape = (0, image_size, image_size, 3)
  return (
    domain,
    np.stack(images) if images else np.zeros(shape, np.uint8),
    np.array(labels, np.int32),
  )


def load_domainnet(data_config) -> FederatedData:
  """DomainNet from TFDS, each domain split into data.clients_per_domain clients."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  c = data_config
  domains = select_domains(c.domains, DOMAINNET_DOMAINS, "domainnet")
  data_dir = c.data_dir or None
  names = tfds.builder(f"domainnet/{domains[0]}", data_dir=data_dir).info.features["label"].names
  mapping = class_mapping(c.classes, names, "domainnet")
  per_domain = [_read_tfds_domain(d, data_dir, mapping, c.image_size) for d in domains]
  return federate_domains(per_domain, c, int(mapping.max()) + 1, "domainnet")
