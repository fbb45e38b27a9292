"""Partitioners, partition reports, and the domain datasets (PACS folder, mocked DomainNet)."""

import importlib.util
import io
import os

import numpy as np
import pytest

from fedmerge_jax import config as config_lib
from fedmerge_jax import train
from fedmerge_jax.config import base_config
from fedmerge_jax.data import domains, load, partition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {0: (230, 20, 20), 1: (20, 20, 230), 2: (20, 230, 20)}  # Label -> solid colour.


def data_config(**overrides):
  c = base_config().data
  c.update(overrides)
  return c


# Partitioners.


@pytest.mark.parametrize("name", ["iid", "dirichlet", "pathological"])
def test_partitions_are_deterministic_complete_and_disjoint(name):
  labels = np.repeat(np.arange(10), 40)
  c = data_config(num_clients=8, dirichlet_alpha=0.5, classes_per_client=3, min_client_size=5)
  a = partition.partition_by_name(name, labels, c, seed=1)
  b = partition.partition_by_name(name, labels, c, seed=1)
  other = partition.partition_by_name(name, labels, c, seed=2)
  assert len(a) == 8 and all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, other))
  report = partition.describe_partition(labels, a, 10)
  assert report["disjoint"] and report["coverage"] == 1.0 and report["size_min"] >= 5


def test_partition_by_name_matches_the_partitioners():
  labels = np.repeat(np.arange(5), 20)
  c = data_config(num_clients=4, seed=3, dirichlet_alpha=0.3, classes_per_client=2)
  expected = {
    "iid": partition.iid_partition(100, 4, 3),
    "dirichlet": partition.dirichlet_partition(labels, 4, 0.3, 3),
    "pathological": partition.pathological_partition(labels, 4, 2, 3),
  }
  for name, parts in expected.items():
    got = partition.partition_by_name(name, labels, c)
    assert all(np.array_equal(x, y) for x, y in zip(got, parts)), name


def test_partition_by_name_explains_bad_requests():
  labels = np.repeat(np.arange(5), 4)
  with pytest.raises(ValueError, match="choose one of .*'iid'.*'pathological'"):
    partition.partition_by_name("shards", labels, data_config())
  with pytest.raises(ValueError, match="gives a client 2 examples"):
    partition.partition_by_name("iid", labels, data_config(num_clients=10, min_client_size=3))


def test_pathological_gives_exactly_k_classes_split_evenly():
  labels = np.repeat(np.arange(10), [30, 31, 32, 33, 34, 35, 36, 37, 38, 39])
  parts = partition.pathological_partition(labels, num_clients=7, classes_per_client=3, seed=0)
  report = partition.describe_partition(labels, parts, 10)
  assert report["classes_per_client"] == [3] * 7
  assert report["disjoint"] and report["coverage"] == 1.0  # 7 * 3 >= 10 classes.
  hist = np.array(report["label_histograms"])
  holders = (hist > 0).sum(0)
  assert holders.sum() == 21 and holders.max() - holders.min() <= 1  # Balanced holders.
  for c in range(10):
    shares = hist[:, c][hist[:, c] > 0]
    assert shares.max() - shares.min() <= 1  # Each class split evenly among its holders.
  # Fewer slots than classes: the unheld classes are left out.
  few = partition.pathological_partition(labels, num_clients=2, classes_per_client=2, seed=0)
  assert partition.describe_partition(labels, few, 10)["classes_per_client"] == [2, 2]
  with pytest.raises(ValueError, match="classes_per_client=11"):
    partition.pathological_partition(labels, 3, 11, 0)
  with pytest.raises(ValueError, match="lower num_clients"):
    partition.pathological_partition(np.array([0, 0, 1, 1]), 4, 2, 0)


def test_natural_partition_groups_by_id_in_sorted_order():
  ids = np.array(["w2", "w1", "w2", "w3", "w1", "w2"])
  keys, parts = partition.natural_partition(ids)
  assert keys == ["w1", "w2", "w3"]
  assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
  perm = np.random.default_rng(0).permutation(6)  # Same groups whatever the example order.
  keys2, parts2 = partition.natural_partition(ids[perm])
  assert keys2 == keys
  assert [sorted(perm[p].tolist()) for p in parts2] == [p.tolist() for p in parts]
  keys3, _ = partition.natural_partition(np.array([5, 2, 5]))
  assert keys3 == [2, 5]


def test_describe_partition_numbers():
  labels = np.array([0, 0, 1, 2, 2, 2])
  report = partition.describe_partition(
    labels, [np.array([0, 2]), np.array([3, 4, 5]), np.array([1])], num_classes=3
  )
  assert report["sizes"] == [2, 3, 1] and report["num_examples"] == 6
  assert (report["size_min"], report["size_median"], report["size_max"]) == (1, 2.0, 3)
  assert report["label_histograms"] == [[1, 1, 0], [0, 0, 3], [1, 0, 0]]
  assert report["classes_per_client"] == [2, 1, 1]
  assert report["disjoint"] and report["coverage"] == 1.0
  overlapping = partition.describe_partition(labels, [np.array([0, 1]), np.array([1])], 3)
  assert not overlapping["disjoint"] and overlapping["coverage"] == pytest.approx(2 / 6)


def test_digits_use_partition_by_name():
  data = load(data_config(partition="pathological", classes_per_client=2))
  for i in range(data.num_clients):
    seen = np.concatenate([s.client(i)[1] for s in (data.train, data.test, data.val)])
    assert len(np.unique(seen)) == 2


# Domain splitting on arrays.


def fake_domain(name, n, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return name, rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8), np.arange(n) % num_classes


def test_federate_domains_splits_within_each_domain():
  c = data_config(
    clients_per_domain=3,
    partition="dirichlet",
    dirichlet_alpha=1.0,
    test_fraction=0.2,
    val_fraction=0.1,
    seed=4,
  )
  a, b = fake_domain("a", 60, seed=1), fake_domain("b", 90, seed=2)
  data = domains.federate_domains([a, b], c, 3, "toy")
  assert data.client_ids == ("a_000", "a_001", "a_002", "b_000", "b_001", "b_002")
  np.testing.assert_array_equal(data.groups, [0, 0, 0, 1, 1, 1])
  counts = data.train.counts + data.test.counts + data.val.counts
  assert counts[:3].sum() == 60 and counts[3:].sum() == 90
  assert data.train.x.dtype == np.float32 and 0 <= data.train.x.min() and data.train.x.max() <= 1
  # Domain b's clients hold only b's images, and its split ignores which other domains are used.
  only_b = domains.federate_domains([b], c, 3, "toy")
  np.testing.assert_array_equal(only_b.train.client(0)[0], data.train.client(3)[0])
  b_images = {bytes(x) for x in (b[1].astype(np.float32) / 255.0)}
  assert all(bytes(x) in b_images for x in data.train.client(3)[0])


def test_domain_and_class_selection():
  assert domains.select_domains((), domains.PACS_DOMAINS, "pacs") == domains.PACS_DOMAINS
  assert domains.select_domains(("sketch", "photo"), domains.PACS_DOMAINS, "pacs") == (
    "photo",
    "sketch",
  )  # Canonical order.
  with pytest.raises(ValueError, match="'clipart'.*unknown to pacs"):
    domains.select_domains(("clipart",), domains.PACS_DOMAINS, "pacs")
  np.testing.assert_array_equal(domains.class_mapping(("c", "a"), ["a", "b", "c"], "x"), [1, -1, 0])
  with pytest.raises(ValueError, match="unknown: \\['z'\\]"):
    domains.class_mapping(("a", "z"), ["a", "b"], "x")


# PACS from a folder the test writes.


def encode(label, fmt="PNG", size=(12, 9), mode="RGB"):
  """A solid image of the label's colour, encoded (Pillow)."""
  image_module = pytest.importorskip("PIL.Image")
  img = image_module.new("RGB", size, COLORS[label]).convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def write_pacs(root, domain_names=("photo", "sketch"), classes=("dog", "horse"), per_class=3):
  """root/<domain>/<class>/{0.png, 1.png(grayscale... ), 2.jpg}: solid label colours."""
  for d in domain_names:
    for label, cls in enumerate(classes):
      folder = os.path.join(root, d, cls)
      os.makedirs(folder)
      for i in range(per_class):
        fmt, ext = ("JPEG", "jpg") if i % 3 == 2 else ("PNG", "png")
        with open(os.path.join(folder, f"{i}.{ext}"), "wb") as f:
          f.write(encode(label, fmt, size=(12 + i, 9), mode="RGBA" if i % 3 == 1 else "RGB"))
      open(os.path.join(folder, "notes.txt"), "w").close()  # Not an image: ignored.
  return str(root)


def pacs_config(root, **overrides):
  defaults = dict(
    name="pacs",
    data_dir=root,
    domains=("photo", "sketch"),
    clients_per_domain=2,
    image_size=8,
    test_fraction=0.34,
    val_fraction=0.34,
  )
  return data_config(**{**defaults, **overrides})


def assert_colours_match_labels(data):
  for split in (data.train, data.test, data.val):
    for i in range(data.num_clients):
      for x, y in zip(*split.client(i)):
        np.testing.assert_allclose(x.mean((0, 1)), np.array(COLORS[int(y)]) / 255, atol=0.02)


def test_pacs_loads_a_folder(tmp_path):
  root = write_pacs(tmp_path / "PACS")
  data = load(pacs_config(root))
  assert data.name == "pacs" and data.num_classes == 2 and data.example_shape == (8, 8, 3)
  assert data.client_ids == ("photo_000", "photo_001", "sketch_000", "sketch_001")
  np.testing.assert_array_equal(data.groups, [0, 0, 1, 1])
  total = data.train.counts + data.test.counts + data.val.counts
  np.testing.assert_array_equal(total, [3, 3, 3, 3])
  np.testing.assert_array_equal(data.test.counts, [1, 1, 1, 1])
  assert_colours_match_labels(data)  # Classes sorted by name: dog -> 0, horse -> 1.
  again = load(pacs_config(root))
  np.testing.assert_array_equal(data.train.x, again.train.x)
  np.testing.assert_array_equal(data.train.y, again.train.y)
  # Subset of classes (relabelled in the given order), and the release's kfold/ folder.
  kfold_parent = tmp_path / "release"
  write_pacs(kfold_parent / "kfold", classes=("dog", "horse", "house"))
  subset = load(pacs_config(str(kfold_parent), classes=("house", "dog")))
  assert subset.num_classes == 2
  labels = np.concatenate(
    [
      s.client(i)[1]
      for s in (subset.train, subset.test, subset.val)
      for i in range(subset.num_clients)
    ]
  )
  np.testing.assert_array_equal(np.bincount(labels), [6, 6])


def test_pacs_explains_missing_folders(tmp_path):
  with pytest.raises(domains.DataNotFoundError, match="data_dir is empty.*<domain>/<class>"):
    load(pacs_config(""))
  with pytest.raises(domains.DataNotFoundError, match="nowhere.*does not exist"):
    load(pacs_config(str(tmp_path / "nowhere")))
  root = write_pacs(tmp_path / "PACS", domain_names=("photo",))
  with pytest.raises(domains.DataNotFoundError, match="sketch.*is missing.*<class>"):
    load(pacs_config(root))
  os.makedirs(tmp_path / "PACS" / "sketch" / "dog")
  with pytest.raises(domains.DataNotFoundError, match="sketch.*has no images"):
    load(pacs_config(root))
  assert issubclass(domains.DataNotFoundError, ValueError)


def test_two_rounds_on_a_tiny_pacs_folder(tmp_path, tiny_config):
  root = write_pacs(tmp_path / "PACS", per_class=4)
  config = tiny_config
  config.num_global_models = 2
  config.data.update(pacs_config(root, clients_per_domain=1, val_fraction=0.25, test_fraction=0.25))
  summary = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert 0 <= summary["test/acc_mean"] <= 1 and "best/acc_mean" in summary
  assert os.path.exists(tmp_path / "work" / "metrics.jsonl")


# DomainNet through tfds.data_source, mocked.


def fake_domainnet_source(num_train=10, num_test=5, num_labels=3):
  """An `as_data_source` whose records are what SkipDecoding yields: PNG bytes + label."""

  def as_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
    del decoders, deserialize_method, kwargs
    offset = {"clipart": 0, "sketch": 1}.get(builder.builder_config.name, 2)
    n = num_train if split == "train" else num_test
    return [
      {
        "image": encode((i + offset) % num_labels, size=(20 + i, 15)),
        "label": np.int64((i + offset) % num_labels),
      }
      for i in range(n)
    ]

  return as_data_source


def domainnet_config(**overrides):
  defaults = dict(
    name="domainnet",
    domains=("sketch", "clipart"),
    clients_per_domain=2,
    image_size=8,
    test_fraction=0.2,
    val_fraction=0.2,
  )
  return data_config(**{**defaults, **overrides})


def test_domainnet_loads_through_tfds_data_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(as_data_source_fn=fake_domainnet_source()):
    data = load(domainnet_config())
    again = load(domainnet_config())
    subset = load(domainnet_config(classes=("alarm_clock", "aircraft_carrier")))
  assert data.name == "domainnet" and data.num_classes == 345
  assert data.client_ids == ("clipart_000", "clipart_001", "sketch_000", "sketch_001")
  np.testing.assert_array_equal(data.groups, [0, 0, 1, 1])
  total = data.train.counts + data.test.counts + data.val.counts
  assert total[:2].sum() == 15 and total[2:].sum() == 15  # Train and test pooled.
  assert data.example_shape == (8, 8, 3)
  assert_colours_match_labels(data)
  np.testing.assert_array_equal(data.train.x, again.train.x)
  # TFDS labels 2 (alarm_clock), 0 (aircraft_carrier) kept as 0, 1; label 1 dropped.
  assert subset.num_classes == 2
  kept = np.concatenate(
    [
      s.client(i)[1]
      for s in (subset.train, subset.test, subset.val)
      for i in range(subset.num_clients)
    ]
  )
  assert np.bincount(kept).tolist() == [9, 10]


def test_domainnet_explains_missing_data(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(domains.DataNotFoundError) as info:
    load(domainnet_config(data_dir=str(tmp_path)))
  message = str(info.value)
  assert str(tmp_path / "domainnet" / "clipart") in message
  assert "TensorFlow" in message and "--file_format=array_record" in message
  with pytest.raises(ValueError, match="unknown: \\['dragonfly'\\]"):
    load(domainnet_config(data_dir=str(tmp_path), classes=("dragonfly",)))


# Configs.


@pytest.mark.parametrize("name,k,dataset", [("domainnet", 6, "domainnet"), ("pacs", 4, "pacs")])
def test_domain_configs(name, k, dataset):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"configs/{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = config_lib.resolve(module.get_config())
  assert config.num_global_models == k and config.data.name == dataset
  assert config.data.image_size == 64 and config.model.name == "resnet9"
