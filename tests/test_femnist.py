"""FEMNIST loaders on small files in the real formats (FedJAX SQLite, LEAF JSON); no network."""

import functools
import http.server
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import socket
import sqlite3
import threading
import zlib

import msgpack
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedmerge_jax import train
from fedmerge_jax.config import base_config
from fedmerge_jax.data import femnist, leaf, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, TEST = femnist.VARIANTS["full"].files
SIZES = [7, 3, 12, 5, 9, 4, 6, 8]  # Train examples per writer; test has a third as many.


def _ext(obj):
  """FedJAX's msgpack encoding of an ndarray: ExtType 1 of msgpack (shape, dtype, bytes)."""
  payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
  return msgpack.ExtType(1, payload)


def encode_row(pixels, label, bytes_keys=False):
  tree = {b"pixels" if bytes_keys else "pixels": pixels, b"label" if bytes_keys else "label": label}
  return zlib.compress(msgpack.packb(tree, default=_ext, use_bin_type=True))


def write_sqlite(path, writers, corrupt=None):
  """A FedJAX federated_data file; `corrupt` maps writer -> replacement `data` cell."""
  conn = sqlite3.connect(path)
  conn.execute(
    "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
    "data BLOB NOT NULL, num_examples INTEGER NOT NULL)"
  )
  for i, (cid, (pixels, label)) in enumerate(writers.items()):
    blob = (corrupt or {}).get(cid) or encode_row(pixels, label, bytes_keys=i % 2 == 1)
    conn.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (cid.encode(), blob, len(label)))
  conn.commit()
  conn.close()


def make_writers(seed, sizes, num_classes=62):
  """Writers with FedJAX-style ids (high-school and census NIST sources) and random data."""
  rng = np.random.default_rng(seed)
  return {
    f"{i:016x}:f{2000 + 100 * i:04d}_{i:02d}": (
      rng.uniform(size=(n, 28, 28)).astype(np.float32),
      rng.integers(0, num_classes, n).astype(np.int32),
    )
    for i, n in enumerate(sizes)
  }


@pytest.fixture(scope="module")
def fedjax_files(tmp_path_factory):
  """A directory with small train and test SQLite files, and the arrays written to them."""
  directory = tmp_path_factory.mktemp("fedjax")
  train_w = make_writers(0, SIZES)
  test_w = {
    cid: (p[: len(p) // 3], y[: len(y) // 3]) for cid, (p, y) in make_writers(1, SIZES).items()
  }
  write_sqlite(directory / TRAIN, train_w)
  write_sqlite(directory / TEST, test_w)
  return directory, train_w, test_w


def data_config(data_dir, **overrides):
  config = base_config().data
  config.name = "femnist"
  config.data_dir = str(data_dir)
  config.val_fraction = 0.0
  config.update(overrides)
  return config


@pytest.fixture
def no_download(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("tried to download")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", fail)


def test_reads_sqlite_rows_and_flips_pixels(fedjax_files):
  directory, train_w, _ = fedjax_files
  rows = list(femnist.read_sqlite(directory / TRAIN, 62))
  assert [cid for cid, _, _ in rows] == sorted(train_w)
  for cid, images, labels in rows:
    pixels, label = train_w[cid]
    assert images.dtype == np.uint8
    np.testing.assert_allclose(images / 255, 1 - pixels, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(labels, label)


def test_load_through_tfds_from_local_files(fedjax_files, no_download):
  directory, train_w, test_w = fedjax_files
  data = load(data_config(directory))
  ids = sorted(train_w)
  assert data.client_ids == tuple(ids) and data.name == "femnist"
  assert data.num_classes == 62 and data.example_shape == (28, 28, 1) and data.val is None
  assert data.train.x.dtype == np.float16
  np.testing.assert_array_equal(data.train.counts, [len(train_w[c][1]) for c in ids])
  np.testing.assert_array_equal(data.test.counts, [len(test_w[c][1]) for c in ids])
  for i, cid in enumerate(ids):
    pixels, label = train_w[cid]
    x, y = data.train.client(i)
    np.testing.assert_allclose(x[..., 0], 1 - pixels, atol=3e-3)
    np.testing.assert_array_equal(y, label)
  np.testing.assert_array_equal(data.groups, [femnist.writer_domain(c) for c in ids])
  assert set(data.groups) == {0, 1}
  # The TFDS cache lives under data_dir, in array_record files; a second load reuses it.
  cache = directory / "femnist_fedjax" / "full" / "1.0.0"
  assert any(p.name.startswith("femnist_fedjax-train.array_record") for p in cache.iterdir())
  again = load(data_config(directory))
  np.testing.assert_array_equal(again.test.x, data.test.x)


def test_builder_download_and_prepare_then_read_back(fedjax_files, tmp_path):
  directory, train_w, _ = fedjax_files
  builder = femnist.FemnistFedjax(config="full", data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(directory))
  )
  assert builder.info.splits["train"].num_examples == len(train_w)
  source = tfds.data_source("femnist_fedjax/full", data_dir=str(tmp_path), split="train")
  read = {ex["client_id"].decode(): ex for ex in source}
  assert sorted(read) == sorted(train_w)
  cid = sorted(train_w)[2]
  assert read[cid]["pixels"].shape == (12, 28, 28) and read[cid]["pixels"].dtype == np.uint8
  np.testing.assert_array_equal(read[cid]["label"], train_w[cid][1])


def test_client_fraction_keeps_a_fixed_seeded_subset(fedjax_files):
  directory, train_w, _ = fedjax_files
  half = load(data_config(directory, client_fraction=0.5, seed=3))
  assert half.num_clients == 4 and set(half.client_ids) <= set(train_w)
  assert list(half.client_ids) == sorted(half.client_ids)
  assert load(data_config(directory, client_fraction=0.5, seed=3)).client_ids == half.client_ids
  others = {
    load(data_config(directory, client_fraction=0.5, seed=s)).client_ids for s in range(4, 9)
  }
  assert others - {half.client_ids}
  with pytest.raises(ValueError, match="client_fraction"):
    load(data_config(directory, client_fraction=0.0))


def test_validation_split_is_carved_from_train(fedjax_files):
  directory, train_w, _ = fedjax_files
  data = load(data_config(directory, val_fraction=0.25, seed=1))
  sizes = np.array([len(train_w[c][1]) for c in data.client_ids])
  np.testing.assert_array_equal(data.val.counts, np.rint(sizes * 0.25).astype(int))
  np.testing.assert_array_equal(data.train.counts + data.val.counts, sizes)
  again = load(data_config(directory, val_fraction=0.25, seed=1))
  np.testing.assert_array_equal(again.val.x, data.val.x)
  # A writer's split depends on (seed, writer), not on which other writers are kept.
  subset = load(data_config(directory, val_fraction=0.25, seed=1, client_fraction=0.5))
  i, j = data.client_ids.index(subset.client_ids[0]), 0
  np.testing.assert_array_equal(subset.val.client(j)[1], data.val.client(i)[1])


def test_digits_only_variant_uses_its_own_files(tmp_path, no_download):
  names = femnist.VARIANTS["digits"].files
  write_sqlite(tmp_path / names[0], make_writers(0, [4, 5], num_classes=10))
  write_sqlite(tmp_path / names[1], make_writers(1, [2, 2], num_classes=10))
  data = load(data_config(tmp_path, only_digits=True))
  assert data.num_classes == 10 and data.num_clients == 2 and data.name == "femnist_digits"


def test_truncated_file_names_it(fedjax_files, tmp_path, no_download):
  directory, _, _ = fedjax_files
  (tmp_path / TEST).write_bytes((directory / TEST).read_bytes())
  blob = (directory / TRAIN).read_bytes()
  (tmp_path / TRAIN).write_bytes(blob[: len(blob) // 2 + 100])
  with pytest.raises(femnist.DataError, match=f"{TRAIN} is truncated.*Delete") as info:
    load(data_config(tmp_path))
  assert str(tmp_path / TRAIN) in str(info.value) and femnist.URL in str(info.value)
  assert not (tmp_path / "femnist_fedjax" / "full" / "1.0.0").exists()  # Nothing cached.


@pytest.mark.parametrize(
  "blob,match",
  [
    (b"not zlib at all", "does not decode"),
    (zlib.compress(msgpack.packb({"pixels": 1})), "does not decode"),
    (encode_row(np.zeros((2, 28, 28), np.float32), np.zeros(3, np.int32)), "labels of shape"),
    (encode_row(np.zeros((2, 28, 28), np.float32), np.zeros(2, np.int32)), "num_examples is"),
    (encode_row(np.zeros((3, 28, 28), np.float32), np.full(3, 99, np.int32)), "labels span"),
  ],
  ids=["not_zlib", "not_arrays", "shape_mismatch", "count_mismatch", "bad_labels"],
)
def test_corrupt_row_names_file_and_writer(tmp_path, no_download, blob, match):
  writers = make_writers(0, [3, 3])
  bad = sorted(writers)[1]
  write_sqlite(tmp_path / TRAIN, writers, corrupt={bad: blob})
  write_sqlite(tmp_path / TEST, make_writers(1, [1, 1]))
  with pytest.raises(femnist.DataError, match=match) as info:
    load(data_config(tmp_path))
  assert str(tmp_path / TRAIN) in str(info.value) and bad in str(info.value)


def test_not_a_database_or_wrong_table(tmp_path):
  (tmp_path / "junk.sqlite").write_bytes(b"x" * 5000)
  with pytest.raises(femnist.DataError, match="junk.sqlite is not an SQLite file"):
    list(femnist.read_sqlite(tmp_path / "junk.sqlite", 62))
  sqlite3.connect(tmp_path / "other.sqlite").execute("CREATE TABLE t (a)").connection.commit()
  with pytest.raises(femnist.DataError, match="no table 'federated_data'"):
    list(femnist.read_sqlite(tmp_path / "other.sqlite", 62))
  with pytest.raises(femnist.DataError, match="does not exist"):
    list(femnist.read_sqlite(tmp_path / "missing.sqlite", 62))


def test_downloads_with_tfds_when_files_are_absent(fedjax_files, tmp_path, monkeypatch):
  """The download path, against a local HTTP server standing in for FedJAX's bucket."""
  directory, train_w, _ = fedjax_files

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  handler = functools.partial(Quiet, directory=str(directory))
  try:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  except OSError as e:
    pytest.skip(f"no local HTTP server: {e}")
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setattr(femnist, "URL", f"http://127.0.0.1:{server.server_address[1]}/")
  monkeypatch.delenv("HTTP_PROXY", raising=False)
  monkeypatch.delenv("http_proxy", raising=False)
  (tmp_path / "cache").mkdir()
  try:
    data = load(data_config(tmp_path / "cache"))
  finally:
    server.shutdown()
  assert data.client_ids == tuple(sorted(train_w))
  downloaded = [p.name for p in (tmp_path / "cache" / "downloads").rglob("*")]
  assert sum(name.endswith(".sqlite") for name in downloaded) == 2
  assert not any(".tmp." in name for name in downloaded)  # Written atomically.


def refuse_connections(monkeypatch):
  def refused(*args, **kwargs):
    raise ConnectionRefusedError(111, "Connection refused")

  monkeypatch.setattr(socket.socket, "connect", refused)
  monkeypatch.setattr(socket, "create_connection", refused)


def leftovers(directory):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_offline_without_files_fails_fast_in_one_line(tmp_path, monkeypatch, no_download):
  refuse_connections(monkeypatch)  # No network: every connection is refused at once.
  # no_download: TFDS's downloader (which retries for minutes) is never reached.
  with pytest.raises(femnist.DataError) as info:
    load(data_config(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  assert f"not found in {tmp_path}" in message and femnist.URL in message
  assert "--config.data.data_dir=" in message and "ConnectionRefusedError" in message
  assert leftovers(tmp_path) == []  # Nothing half-made: no *.tmp folders, no empty cache.


def test_a_download_failing_midway_leaves_no_temporary_folders(tmp_path, monkeypatch):
  monkeypatch.setattr(femnist, "_check_reachable", lambda url: None)  # Online at first...

  def fail_midway(self, urls):
    partial = pathlib.Path(self.download_dir) / "federated_emnist_trainABC.tmp.123"
    partial.mkdir(parents=True)
    (partial / "federated_emnist_train.sqlite").write_bytes(b"SQLite format 3\x00 half")
    raise ConnectionResetError(104, "Connection reset by peer")  # ... then not.

  monkeypatch.setattr(tfds.download.DownloadManager, "download", fail_midway)
  with pytest.raises(femnist.DataError, match="ConnectionResetError.*--config.data.data_dir="):
    load(data_config(tmp_path))
  assert leftovers(tmp_path) == []


def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path, no_download):
  missing = tmp_path / "femnst"
  with pytest.raises(femnist.DataError, match=f"data_dir={missing} does not exist"):
    load(data_config(missing))
  assert not missing.exists()  # Not silently created.


def test_a_changed_source_file_rebuilds_the_cache(
  fedjax_files, tmp_path, no_download, caplog, capsys
):
  directory, train_w, test_w = fedjax_files
  for name in (TRAIN, TEST):
    shutil.copy(directory / name, tmp_path / name)
  assert load(data_config(tmp_path)).client_ids == tuple(sorted(train_w))
  # Other files of the same names (fewer writers): different sizes.
  fewer = dict(list(train_w.items())[:3])
  for name, writers in ((TRAIN, fewer), (TEST, {c: test_w[c] for c in fewer})):
    (tmp_path / name).unlink()
    write_sqlite(tmp_path / name, writers)
  with caplog.at_level(logging.WARNING):
    data = load(data_config(tmp_path))
  assert data.client_ids == tuple(sorted(fewer))  # Not the 8 cached writers.
  assert "changed since the cache was built (size" in caplog.text
  # The same size, other bytes (SQLite's change counter): caught by the checksum.
  caplog.clear()
  blob = bytearray((tmp_path / TRAIN).read_bytes())
  blob[24] ^= 0xFF
  (tmp_path / TRAIN).write_bytes(bytes(blob))
  with caplog.at_level(logging.WARNING):
    assert load(data_config(tmp_path)).client_ids == tuple(sorted(fewer))
  assert "SHA-256 differs" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    load(data_config(tmp_path))
  assert "rebuilding" not in caplog.text  # Unchanged files: the cache is read as is.
  assert "Downloading and preparing" not in capsys.readouterr().out  # Local files: quiet.


def write_leaf(directory, split, users, seed, files=2):
  """LEAF's JSON layout: pixels gray/255 (background 1) as lists of 784 floats."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory / split, exist_ok=True)
  arrays = {}
  for f in range(files):
    mine = users[f::files]
    user_data = {}
    for u in mine:
      n = 2 + len(u) % 3
      x = rng.integers(0, 256, (n, 784)) / 255
      y = rng.integers(0, 62, n)
      y[0] = rng.integers(0, 10)  # A digit each: the digits-only variant keeps every client.
      arrays[u] = (x, y)
      user_data[u] = {"x": x.tolist(), "y": y.tolist()}
    blob = {
      "users": mine,
      "num_samples": [len(user_data[u]["y"]) for u in mine],
      "user_data": user_data,
    }
    (directory / split / f"all_data_{f}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(blob))
  return arrays


def test_leaf_json(tmp_path):
  users = ["f0001_01", "f2150_33", "f3100_7"]
  train_a = write_leaf(tmp_path, "train", users, 0)
  write_leaf(tmp_path, "test", users, 1)
  config = data_config(tmp_path, name="leaf_femnist")
  data = load(config)
  assert data.client_ids == tuple(sorted(users)) and data.num_classes == 62
  assert data.name == "leaf_femnist"
  np.testing.assert_array_equal(data.groups, [1, 0, 1])
  x, y = train_a["f2150_33"]
  i = data.client_ids.index("f2150_33")
  # Background 0, like FedJAX's loader: x = 1 - LEAF's pixels.
  np.testing.assert_allclose(data.train.client(i)[0].reshape(len(y), 784), 1 - x, atol=1e-3)
  np.testing.assert_array_equal(data.train.client(i)[1], y)
  assert load(data_config(tmp_path, name="leaf_femnist", only_digits=True)).num_classes == 10


def test_leaf_errors_say_how_to_get_the_data(tmp_path):
  with pytest.raises(femnist.DataError, match=r"train does not exist.*preprocess.sh"):
    load(data_config(tmp_path, name="leaf_femnist"))
  with pytest.raises(femnist.DataError, match="data_dir"):
    load(data_config("", name="leaf_femnist"))
  write_leaf(tmp_path, "train", ["a", "b"], 0)
  write_leaf(tmp_path, "test", ["c"], 1, files=1)
  with pytest.raises(femnist.DataError, match="-t sample"):
    load(data_config(tmp_path, name="leaf_femnist"))
  (tmp_path / "test" / "broken.json").write_text('{"users": [')
  with pytest.raises(femnist.DataError, match="broken.json is not a LEAF JSON file"):
    leaf.read_json_dir(str(tmp_path / "test"))


def test_femnist_small_config_trains_two_rounds(fedjax_files, tmp_path):
  directory, _, _ = fedjax_files
  spec = importlib.util.spec_from_file_location(
    "femnist_small", os.path.join(ROOT, "configs/femnist_small.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.num_rounds = 2
  config.eval_every = 1
  config.clients_per_round = 3
  config.data.data_dir = str(directory)
  config.data.client_fraction = 0.5
  config.model.name = "mlp"  # The EMNIST CNN takes ~40 s to compile; the data path is tested.
  config.model.hidden_sizes = (16,)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert 0 <= summary["test/acc_mean"] <= 1 and np.isfinite(summary["best/loss"])
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    assert [json.loads(line)["round"] for line in f] == [1, 2]
