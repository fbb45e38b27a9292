"""Federated EMNIST (FEMNIST): 3,400 writers, 28x28 characters, from FedJAX's SQLite files.

FedJAX publishes the TFF/LEAF federated EMNIST as two SQLite files per variant under
`URL` (62 classes: digits, upper- and lower-case letters; or the 10-class digits-only
variant, `data.only_digits`). Each row is one writer: `zlib(msgpack({pixels: float32
[N, 28, 28], label: int32 [N]}))`, every array a msgpack extension of type 1 holding
msgpack `(shape, dtype name, C-order bytes)`. Writers are the clients; train comes from
the train file, test from the test file (the same writers).

`FemnistFedjax` is a TFDS builder (no TensorFlow needed: array_record files, read with
`as_data_source`). It downloads the files with TFDS's download manager, or takes them
from `data.data_dir` when they are there, checks every row, and caches one example per
writer, pixels stored as uint8 with background 0 (round((1 - pixels) * 255), FedJAX's
`x = 1 - pixels`), under `<data_dir or ~/tensorflow_datasets>/femnist_fedjax/`. The cache
records the size and SHA-256 of the files it was built from; when the files in `data_dir`
differ, it is rebuilt (with a warning). Offline, a missing file fails within seconds with
one line naming where it was looked for, the address and the flag; nothing half-made stays.

In host memory the images are float16 in [0, 1], ragged (every writer's real examples,
`[total, 28, 28, 1]`, plus offsets): half of float32's size, and no padding. Models must cast
inputs to float32 where an op needs equal dtypes (XLA's convolution does; matmuls promote).
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import sqlite3
import urllib.parse
import zlib
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import msgpack
import numpy as np
import tensorflow_datasets as tfds

from fedmerge_jax.data.errors import DataError
from fedmerge_jax.data.federated import ClientArrays, FederatedData

URL = "https://storage.googleapis.com/gresearch/fedjax/emnist/"
IMAGE_SHAPE = (28, 28)
_NDARRAY_EXT = 1  # FedJAX's msgpack extension code for ndarrays.

Writers = Dict[str, Tuple[np.ndarray, np.ndarray]]  # client id -> (uint8 images, labels).


# --- Reading FedJAX's SQLite files. ---------------------------------------------------


def _ndarray_from_ext(code: int, payload: bytes) -> np.ndarray:
  """msgpack ext hook: FedJAX's ndarray encoding -> np.ndarray."""
  if code != _NDARRAY_EXT:
    raise ValueError(f"unexpected msgpack extension type {code}")
  shape, dtype, buffer = msgpack.unpackb(payload, raw=True)
  dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
  return np.frombuffer(buffer, np.dtype(dtype)).reshape(shape)


def decode_row(blob: bytes) -> Dict[str, np.ndarray]:
  """One `data` cell -> {'pixels': [N, 28, 28], 'label': [N]} (keys str or bytes in the file)."""
  tree = msgpack.unpackb(zlib.decompress(blob), ext_hook=_ndarray_from_ext, raw=False)
  if not isinstance(tree, dict):
    raise ValueError(f"expected a map of arrays, got {type(tree).__name__}")
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in tree.items()}


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """FedJAX's `1 - pixels` (background 0) in [0, 1] -> uint8 0..255."""
  return np.rint((1.0 - np.asarray(pixels, np.float32)) * 255).clip(0, 255).astype(np.uint8)


def _fix(path: str, url: str) -> str:
  return (
    f"Delete {path} and run again to download a fresh copy, or replace it with one "
    f"downloaded from {url} (then point --config.data.data_dir at its directory)."
  )


def _check_header(path: str, url: str) -> None:
  """Rejects a file that is not SQLite or is shorter than its header says (truncated)."""
  with open(path, "rb") as f:
    header = f.read(100)
  if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
    raise DataError(f"{path} is not an SQLite file (or is truncated). {_fix(path, url)}")
  page_size = int.from_bytes(header[16:18], "big")
  page_size = 65536 if page_size == 1 else page_size
  pages = int.from_bytes(header[28:32], "big")
  pages_valid = header[92:96] == header[24:28]  # SQLite >= 3.7.0 keeps the count current.
  size = os.path.getsize(path)
  if size % page_size or (pages_valid and size < pages * page_size):
    expected = f"{pages * page_size}" if pages_valid else f"a multiple of {page_size}"
    raise DataError(f"{path} is truncated ({size} bytes, expected {expected}). {_fix(path, url)}")


def _connect(path: str, url: str) -> sqlite3.Connection:
  """Opens `path` read-only, checking that it is a complete SQLite file with the table."""
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist. Download it from {url}.")
  _check_header(path, url)
  try:
    conn = sqlite3.connect(pathlib.Path(os.path.abspath(path)).as_uri() + "?mode=ro", uri=True)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
  except sqlite3.DatabaseError as e:
    raise DataError(f"{path} is not a readable SQLite file ({e}). {_fix(path, url)}") from e
  if "federated_data" not in tables:
    conn.close()
    raise DataError(
      f"{path} has no table 'federated_data' (it has {sorted(tables)}): not a "
      f"FedJAX federated EMNIST file. {_fix(path, url)}"
    )
  return conn


def _check_row(pixels, label, num_examples: int, num_classes: int) -> Optional[str]:
  """What is wrong with one writer's arrays, or None."""
  if pixels.ndim != 3 or pixels.shape[1:] != IMAGE_SHAPE:
    return f"pixels have shape {pixels.shape}, expected [N, 28, 28]"
  if label.shape != (len(pixels),):
    return f"{len(pixels)} images but labels of shape {label.shape}"
  if len(label) != num_examples:
    return f"num_examples is {num_examples} but the data holds {len(label)} examples"
  if not np.issubdtype(label.dtype, np.integer):
    return f"labels have dtype {label.dtype}, expected integers"
  if len(label) and (label.min() < 0 or label.max() >= num_classes):
    return f"labels span [{label.min()}, {label.max()}], expected [0, {num_classes})"
  if len(pixels) and not (
    np.all(np.isfinite(pixels)) and -1e-3 <= pixels.min() and pixels.max() <= 1 + 1e-3
  ):
    return "pixels are not all finite values in [0, 1]"
  return None


def read_sqlite(
  path: str, num_classes: int, url: str = URL
) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
  """Yields (writer id, uint8 images [N, 28, 28], int32 labels [N]) for every row, checked.

  Raises DataError naming `path` (and the writer) for a truncated or corrupt file.
  """
  path = os.fspath(path)
  conn = _connect(path, url)
  try:
    rows = conn.execute(
      "SELECT client_id, data, num_examples FROM federated_data ORDER BY client_id"
    )
    for client_id, blob, num_examples in rows:
      cid = client_id.decode() if isinstance(client_id, bytes) else str(client_id)
      try:
        tree = decode_row(blob)
        pixels = np.asarray(tree["pixels"], np.float32)
        label = np.asarray(tree["label"])
      except Exception as e:  # zlib, msgpack, dtype or shape errors: all mean corrupt.
        raise DataError(
          f"{path}: the row of writer {cid!r} does not decode "
          f"({type(e).__name__}: {e}). {_fix(path, url)}"
        ) from e
      problem = _check_row(pixels, label, num_examples, num_classes)
      if problem:
        raise DataError(f"{path}: writer {cid!r}: {problem}. {_fix(path, url)}")
      yield cid, to_uint8(pixels), label.astype(np.int32)
  except sqlite3.DatabaseError as e:
    raise DataError(f"{path} is corrupt or truncated ({e}). {_fix(path, url)}") from e
  finally:
    conn.close()


# --- The TFDS builder. ----------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FemnistConfig(tfds.core.BuilderConfig):
  """One variant: FedJAX's file names (train, test) and the number of classes."""

  files: Tuple[str, str] = ("", "")
  num_classes: int = 62


VARIANTS = {
  "full": FemnistConfig(
    name="full",
    num_classes=62,
    files=("federated_emnist_train.sqlite", "federated_emnist_test.sqlite"),
    description="62 classes: digits, upper- and lower-case letters.",
  ),
  "digits": FemnistConfig(
    name="digits",
    num_classes=10,
    files=("federated_emnist_digitsonly_train.sqlite", "federated_emnist_digitsonly_test.sqlite"),
    description="The 10 digit classes only.",
  ),
}


class FemnistFedjax(tfds.core.GeneratorBasedBuilder):
  """Federated EMNIST from FedJAX's SQLite files: one example per writer."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per writer; pixels uint8, background 0."}
  BUILDER_CONFIGS = list(VARIANTS.values())
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Optional: put FedJAX's federated_emnist_{{train,test}}.sqlite (or the "
    f"digitsonly ones) from {URL} in the manual dir; otherwise they are downloaded."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "client_id": tfds.features.Text(),
          "pixels": tfds.features.Tensor(
            shape=(None, *IMAGE_SHAPE), dtype=np.uint8, encoding="zlib"
          ),
          "label": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding="zlib"),
        }
      ),
      homepage="https://github.com/google/fedjax",
      citation="Cohen et al., EMNIST: Extending MNIST to handwritten letters, IJCNN 2017.",
    )

  local_sources = False  # Set by `prepare` when every file is in data_dir: nothing to download.

  def _log_download_bytes(self) -> None:
    if not self.local_sources:  # TFDS prints "Downloading and preparing" to stdout.
      super()._log_download_bytes()
    logging.info("FEMNIST: building the cache in %s", self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("FEMNIST: cache ready in %s", self.data_dir)

  def _split_generators(self, dl_manager):
    names = dict(zip(("train", "test"), self.builder_config.files))
    paths = _manual_files(dl_manager, names)
    missing = {split: URL + name for split, name in names.items() if split not in paths}
    if missing:
      logging.info("FEMNIST: downloading %s", sorted(missing.values()))
      paths.update(_download(dl_manager, missing, _manual_dir(dl_manager)))
    self.source_paths = {names[split]: os.fspath(path) for split, path in paths.items()}
    return {
      split: self._generate_examples(os.fspath(path), URL + names[split])
      for split, path in paths.items()
    }

  def _generate_examples(self, path: str, url: str):
    for cid, images, labels in read_sqlite(path, self.builder_config.num_classes, url):
      yield cid, {"client_id": cid, "pixels": images, "label": labels}


def _manual_dir(dl_manager) -> Optional[pathlib.Path]:
  try:
    return dl_manager.manual_dir
  except (AssertionError, ValueError):  # No manual dir, or an empty one.
    return None


def _check_reachable(url: str, timeout: float = 10.0) -> None:
  """Fails within `timeout` seconds where TFDS's downloader would retry for minutes."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  socket.create_connection((parts.hostname, port), timeout=timeout).close()


def offline_message(names: Sequence[str], looked_in, error: BaseException) -> str:
  where = f"in {looked_in}" if looked_in else "locally (no --config.data.data_dir was given)"
  reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
  return (
    f"FEMNIST files {', '.join(names)} were not found {where}, and downloading them "
    f"from {URL} failed ({reason}). Download them from {URL} into a folder and set "
    "--config.data.data_dir=<that folder>."
  )


def _download(dl_manager, missing: Mapping[str, str], looked_in) -> Dict[str, pathlib.Path]:
  """dl_manager.download(missing), failing fast offline and leaving no temporary folders."""
  download_dir = pathlib.Path(dl_manager.download_dir)
  before = set(download_dir.glob("*.tmp.*"))
  try:
    _check_reachable(next(iter(missing.values())))
    return dl_manager.download(dict(missing))
  except Exception as e:  # pylint: disable=broad-except  # requests', urllib3's, OSError...
    for partial in set(download_dir.glob("*.tmp.*")) - before:
      shutil.rmtree(partial, ignore_errors=True)
    _remove_empty_folders(download_dir)  # TFDS's downloads/extracted, made for nothing.
    names = [url.rsplit("/", 1)[-1] for url in missing.values()]
    raise DataError(offline_message(names, looked_in, e)) from e


def _remove_empty_folders(root: pathlib.Path) -> None:
  """Removes `root` and the folders under it that hold no file."""
  for folder in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
    if folder.is_dir() and not any(folder.iterdir()):
      folder.rmdir()


def _manual_files(dl_manager, names: Mapping[str, str]) -> Dict[str, pathlib.Path]:
  """The files of `names` present in the manual dir (`data.data_dir`), by split."""
  manual = _manual_dir(dl_manager)
  if manual is None:
    return {}
  found = {split: manual / name for split, name in names.items() if (manual / name).exists()}
  for path in found.values():
    logging.info("FEMNIST: using local %s", path)
  return found


def prepare(data_dir: str = "", only_digits: bool = False) -> FemnistFedjax:
  """The prepared builder: reads the TFDS cache, building it first if needed.

  The SQLite files are taken from `data_dir` where they are, else downloaded (into
  `<data_dir>/downloads`); the cache goes to `data_dir` ('' : TFDS's data dir).
  """
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  if data_dir and not os.path.isdir(data_dir):
    raise DataError(
      f"--config.data.data_dir={data_dir} does not exist. Create it and put "
      f"FEMNIST's files from {URL} there, or fix the path."
    )
  make = lambda: FemnistFedjax(
    config="digits" if only_digits else "full", data_dir=data_dir, file_format="array_record"
  )
  builder = make()
  local = {
    name: os.path.join(data_dir, name)
    for name in builder.builder_config.files
    if data_dir and os.path.isfile(os.path.join(data_dir, name))
  }
  stale = _stale_cache_reason(builder, local)
  if stale:
    logging.warning("FEMNIST: %s; rebuilding the cache in %s.", stale, builder.data_dir)
    shutil.rmtree(os.fspath(builder.data_dir))
    builder = make()
  builder.local_sources = len(local) == len(builder.builder_config.files)
  dataset_folder = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  existed = os.path.exists(dataset_folder)
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=data_dir, try_download_gcs=False)
    )
  except DataError:
    if not existed:  # Only TFDS's metadata of a cache never built: leave nothing half-made.
      shutil.rmtree(dataset_folder, ignore_errors=True)
    raise
  if getattr(builder, "source_paths", None):  # Built just now: record what from.
    record = {name: fingerprint(path) for name, path in builder.source_paths.items()}
    with open(os.path.join(os.fspath(builder.data_dir), SOURCES_RECORD), "w") as f:
      json.dump(record, f, indent=1)
  return builder


SOURCES_RECORD = "fedmerge_sources.json"  # In the cache: size and SHA-256 of its sources.


def fingerprint(path: str) -> Dict[str, object]:
  """{'size': bytes, 'sha256': hex digest} of a file."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _stale_cache_reason(builder: FemnistFedjax, local: Mapping[str, str]) -> Optional[str]:
  """Why a prepared cache no longer matches the files in data_dir, or None if it does."""
  cache = os.fspath(builder.data_dir)
  if not local or not os.path.isdir(cache):
    return None
  record_path = os.path.join(cache, SOURCES_RECORD)
  if not os.path.exists(record_path):
    return "the cache has no record of the files it was built from"
  with open(record_path) as f:
    record = json.load(f)
  for name, path in sorted(local.items()):
    if name in record and os.path.getsize(path) != record[name]["size"]:
      return (
        f"{path} changed since the cache was built (size {record[name]['size']} -> "
        f"{os.path.getsize(path)} bytes)"
      )
    if name in record and fingerprint(path)["sha256"] != record[name]["sha256"]:
      return f"{path} changed since the cache was built (its SHA-256 differs)"
  return None


def read_split(builder: FemnistFedjax, split: str) -> Writers:
  """A prepared split as {writer id: (uint8 images [N, 28, 28], int32 labels [N])}."""
  return {
    ex["client_id"].decode(): (ex["pixels"], ex["label"])
    for ex in builder.as_data_source(split=split)
  }


# --- Writers -> FederatedData (shared with the LEAF loader). ---------------------------


def check_fraction(fraction: float) -> None:
  """Rejects a `data.client_fraction` outside (0, 1] (before anything is downloaded)."""
  if not 0 < fraction <= 1:
    raise ValueError(f"data.client_fraction={fraction} must be in (0, 1].")


def select_clients(client_ids: Sequence[str], fraction: float, seed: int) -> Sequence[str]:
  """A fixed random `fraction` of `client_ids` (at least one), kept in sorted order."""
  check_fraction(fraction)
  ids = sorted(client_ids)
  if fraction == 1:
    return ids
  keep = max(1, int(round(len(ids) * fraction)))
  chosen = np.random.default_rng(seed).choice(len(ids), keep, replace=False)
  return [ids[i] for i in np.sort(chosen)]


def split_validation(writers: Writers, fraction: float, seed: int) -> Tuple[Writers, Writers]:
  """Carves `fraction` of each writer's examples out as validation (>= 1 left to train).

  Each writer's split depends only on (seed, writer id), not on which writers are kept.
  """
  train, val = {}, {}
  for cid, (x, y) in writers.items():
    rng = np.random.default_rng([seed, zlib.crc32(cid.encode())])
    n_val = min(int(round(len(y) * fraction)), max(len(y) - 1, 0))
    order = rng.permutation(len(y))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    train[cid], val[cid] = (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])
  return train, val


def ragged_images(per_client: Sequence[Tuple[np.ndarray, np.ndarray]]) -> ClientArrays:
  """uint8 images -> a ragged split: float16 `[total, 28, 28, 1]` in [0, 1], labels, offsets."""
  return ClientArrays.from_clients(
    [
      ((np.asarray(x, np.float32)[..., None] / 255).astype(np.float16), y)  # float16 early:
      for x, y in per_client
    ],  # lower peak.
    (*IMAGE_SHAPE, 1),
    x_dtype=np.float16,
  )


def writer_domain(client_id: str) -> Optional[int]:
  """NIST source of a writer id ('[hash:]f2100_00'): 0 high school (2100-2599), 1 census."""
  match = re.search(r"(?:^|:)f(\d{4})_\d+$", client_id)
  if match is None:
    return None
  return 0 if 2100 <= int(match.group(1)) <= 2599 else 1


def to_federated(
  train: Writers, test: Writers, num_classes: int, data_config, name: str
) -> FederatedData:
  """Writers -> FederatedData, keeping `data.client_fraction` of the writers.

  A validation split is carved out of train when `data.val_fraction` > 0; `groups` holds
  each writer's NIST source (`writer_domain`) where every id tells it.
  """
  extra = sorted(set(test) - set(train))
  if extra:
    raise DataError(
      f"{name}: the test data has {len(extra)} writers that train lacks "
      f"(e.g. {extra[:3]}); train and test must come from the same source."
    )
  ids = select_clients(list(train), data_config.client_fraction, data_config.seed)
  train = {cid: train[cid] for cid in ids}
  val = None
  if data_config.val_fraction > 0:
    train, val = split_validation(train, data_config.val_fraction, data_config.seed)
  empty = (np.zeros((0, *IMAGE_SHAPE), np.uint8), np.zeros((0,), np.int32))
  domains = [writer_domain(cid) for cid in ids]
  return FederatedData(
    client_ids=tuple(ids),
    train=ragged_images([train[cid] for cid in ids]),
    test=ragged_images([test.get(cid, empty) for cid in ids]),
    val=None if val is None else ragged_images([val[cid] for cid in ids]),
    num_classes=num_classes,
    groups=None if None in domains else np.array(domains, np.int32),
    name=name,
  )


def load(data_config) -> FederatedData:
  """FEMNIST as `data_config` asks (`data_dir`, `only_digits`, `client_fraction`, ...)."""
  check_fraction(data_config.client_fraction)
  builder = prepare(data_config.data_dir, data_config.only_digits)
  return to_federated(
    read_split(builder, "train"),
    read_split(builder, "test"),
    builder.builder_config.num_classes,
    data_config,
    "femnist_digits" if data_config.only_digits else "femnist",
  )
