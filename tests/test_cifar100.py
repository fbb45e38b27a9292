"""CIFAR-100 splits (pure NumPy on CIFAR-shaped labels, loaders on mock TFDS and fake
archives) and the authors' narrow ResNet-9 (shape, BatchNorm, a short FedMerge run)."""

import io
import os
import pickle
import tarfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedmerge_jax import config as config_lib
from fedmerge_jax import models
from fedmerge_jax import train
from fedmerge_jax.config import base_config
from fedmerge_jax.data import cifar100, load, partition
from fedmerge_jax.models.resnet import conv

from conftest import make_federation

RBG = "rbg"  # Test inits with rbg keys: threefry inits of ResNet-9 compile ~4x slower on CPU.
TRAIN_LABELS = np.repeat(np.arange(100), 500)  # CIFAR-100's shape: 500 train, 100 test
TEST_LABELS = np.repeat(np.arange(100), 100)  # images per class.


def shuffled_labels(order_seed):
  """CIFAR-100's class sizes; order_seed None keeps them sorted, else a random label order."""
  train, test = TRAIN_LABELS, TEST_LABELS
  if order_seed is not None:
    rng = np.random.default_rng(order_seed)
    train, test = rng.permutation(train), rng.permutation(test)
  return train, test


def paper_cluster(train_labels=TRAIN_LABELS, test_labels=TEST_LABELS, seed=11):
  return partition.cluster_partition(
    train_labels,
    test_labels,
    num_clients=50,
    num_clusters=5,
    classes_per_cluster=30,
    alpha=10.0,
    val_fraction=0.1,
    seed=seed,
    num_classes=100,
  )


def paper_personal(labels, seed=11):
  return partition.personal_partition(
    labels,
    num_clients=50,
    alpha=0.1,
    min_size=100,
    test_fraction=1 / 6,
    val_fraction=0.1,
    seed=seed,
    num_classes=100,
  )


def min_median_max(values):
  return (int(np.min(values)), float(np.median(values)), int(np.max(values)))


# Partitioners: the authors' statistics (issue 11, from their released generators run on
# CIFAR-100; they depend only on the class sizes, not on the label order).


@pytest.mark.parametrize("order_seed", [None, 0])
def test_cluster_split_has_the_authors_counts(order_seed):
  train_labels, test_labels = shuffled_labels(order_seed)
  split = paper_cluster(train_labels, test_labels)
  assert np.bincount(split.client_cluster).tolist() == [6, 5, 8, 13, 18]
  assert [len(set(c)) for c in split.cluster_classes] == [30, 30, 30, 27, 30]
  sizes = lambda parts: min_median_max([len(p) for p in parts])
  assert sizes(split.train) == (475, 669.0, 1868)
  assert sizes(split.val) == (54, 75.0, 206)
  assert sizes(split.test) == (108, 150.0, 418)
  classes = [len(np.unique(train_labels[p])) for p in split.train]
  assert (min(classes), max(classes)) == (27, 30)


@pytest.mark.parametrize("order_seed", [None, 0])
def test_personal_split_has_the_authors_counts(order_seed):
  labels = np.concatenate(shuffled_labels(order_seed))
  split = paper_personal(labels)
  sizes = lambda parts: min_median_max([len(p) for p in parts])
  assert sizes(split.train) == (370, 926.5, 1066)
  assert sizes(split.val) == (42, 103.5, 119)
  assert sizes(split.test) == (83, 206.5, 238)
  held = [np.concatenate(parts) for parts in zip(*split)]
  assert min_median_max([len(np.unique(labels[h])) for h in held]) == (21, 36.0, 97)
  np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(60_000))


def test_cluster_split_assigns_every_example_once_to_its_clusters_classes():
  split = paper_cluster()
  train_val = np.concatenate(split.train + split.val)
  np.testing.assert_array_equal(np.sort(train_val), np.arange(len(TRAIN_LABELS)))
  np.testing.assert_array_equal(np.sort(np.concatenate(split.test)), np.arange(len(TEST_LABELS)))
  np.testing.assert_array_equal(
    np.bincount(TRAIN_LABELS[np.concatenate(split.val)]), np.full(100, 50)
  )
  for client, cluster in enumerate(split.client_cluster):
    expected = sorted(set(split.cluster_classes[cluster]))
    assert np.unique(TRAIN_LABELS[split.train[client]]).tolist() == expected


def test_class_shares_are_scipys_dirichlet_seeded_with_the_class():
  """The authors draw shares with scipy.stats.dirichlet(.., seed=classid).rvs()."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  for cls, holders in [(0, 6), (7, 19), (99, 13)]:
    want = stats.dirichlet([10.0] * holders, seed=cls).rvs()[0]
    np.testing.assert_array_equal(np.random.RandomState(cls).dirichlet([10.0] * holders), want)


def test_splits_are_deterministic_from_the_seed():
  a, b, c = paper_cluster(), paper_cluster(), paper_cluster(seed=12)
  for x, y in zip(a.train + a.test + a.val, b.train + b.test + b.val):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))


def test_class_picker_refills_and_may_repeat_a_class():
  import random  # pylint: disable=g-import-not-at-top

  clusters = partition.cycling_class_clusters(10, [6, 6, 6], random.Random(3))
  assert sorted(clusters[0] + clusters[1][:4]) == list(range(10))  # All before a refill.
  with pytest.raises(ValueError, match="cover all 10 classes"):
    partition.cycling_class_clusters(10, [3, 3, 3], random.Random(0))


# Loaders: mock TFDS and fake original archives.


def data_config(name, **overrides):
  c = base_config().data
  c.name = name
  c.partition = "cluster" if name == "cifar100_cluster" else "dirichlet"
  c.num_clients, c.seed = 10, 11
  c.dirichlet_alpha = 10.0 if name == "cifar100_cluster" else 0.1
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def mock_arrays():
  with tfds.testing.mock_data(num_examples=600, policy=tfds.testing.MockPolicy.USE_CODE):
    return cifar100.load_arrays("")


def test_tfds_source_gives_uint8_images_and_fine_labels(mock_arrays):
  train_x, train_y, test_x, test_y = mock_arrays
  assert train_x.shape == test_x.shape == (600, 32, 32, 3) and train_x.dtype == np.uint8
  assert train_y.max() < 100 and train_y.dtype == np.int32


def test_cluster_loader_through_the_registry():
  with tfds.testing.mock_data(num_examples=600, policy=tfds.testing.MockPolicy.USE_CODE):
    data = load(data_config("cifar100_cluster"))
  assert data.name == "cifar100_cluster" and data.num_clients == 10 and data.num_classes == 100
  assert data.example_shape == (32, 32, 3) and data.train.x.dtype == np.uint8
  assert data.input_transform == cifar100.INPUT_TRANSFORM  # Standardised inside the programs.
  assert data.train.counts.sum() + data.val.counts.sum() == 600
  assert data.test.counts.sum() == 600
  np.testing.assert_array_equal(data.groups, np.repeat(np.arange(5), 2))
  stats = cifar100.split_statistics(data)
  assert stats["clients_per_group"] == [2] * 5 and stats["num_clients"] == 10
  assert stats["classes_per_client"]["max"] <= 30


def test_personal_loader_pools_and_holds_out(mock_arrays):
  c = data_config(
    "cifar100_personal", num_clients=5, min_client_size=100, test_fraction=1 / 6, val_fraction=0.1
  )
  data = cifar100.personal_federation(mock_arrays, c)
  n = data.train.counts + data.val.counts + data.test.counts
  assert n.sum() == 1200 and n.min() >= 100
  np.testing.assert_array_equal(data.test.counts, np.ceil(n * (1 / 6)).astype(int))
  np.testing.assert_array_equal(data.val.counts, np.ceil(0.1 * (n - data.test.counts)).astype(int))
  # Kept as uint8 (standardised inside the programs): client 0's first image is an input.
  first = data.train.client(0)[0][0]
  pooled = np.concatenate([mock_arrays[0], mock_arrays[2]])
  assert np.any(np.all(pooled == first, axis=(1, 2, 3)))


def test_loader_rejects_a_mismatched_partition(mock_arrays):
  with pytest.raises(ValueError, match="data.partition='cluster'"):
    cifar100.cluster_federation(mock_arrays, data_config("cifar100_cluster", partition="iid"))


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
  with pytest.raises(cifar100.Cifar100NotFoundError) as e:
    cifar100.load_arrays(str(tmp_path))
  assert isinstance(e.value, ValueError)
  assert str(tmp_path) in str(e.value) and "pip install tensorflow" in str(e.value)


def fake_cifar(n):
  """n examples whose pixel (h, w, c) encodes (h + w + 50 c + i) % 256, labels i % 100."""
  h, w, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
  x = np.stack([(h + w + 50 * c + i) % 256 for i in range(n)]).astype(np.uint8)
  return x, (np.arange(n) % 100).astype(np.int32)


def add_to_tar(tar, name, payload: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def python_pickle(x, y) -> bytes:
  """The python archive's format, with the numpy module name of Python 2's pickles."""
  flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
  payload = pickle.dumps(
    {b"data": flat, b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()}, protocol=3
  )
  return payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def binary_records(x, y) -> bytes:
  chw = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
  return np.concatenate([(y // 5)[:, None], y[:, None], chw], 1).astype(np.uint8).tobytes()


@pytest.mark.parametrize("kind", ["python", "binary"])
def test_original_archives_are_read_with_numpy(tmp_path, kind):
  (train_x, train_y), (test_x, test_y) = fake_cifar(12), fake_cifar(5)
  encode = python_pickle if kind == "python" else binary_records
  names = ("train", "test") if kind == "python" else ("train.bin", "test.bin")
  with tarfile.open(tmp_path / f"cifar-100-{kind}.tar.gz", "w:gz") as tar:
    for name, (x, y) in zip(names, [(train_x, train_y), (test_x, test_y)]):
      add_to_tar(tar, f"cifar-100-{kind}/{name}", encode(x, y))
  arrays = cifar100.load_arrays(str(tmp_path))
  for got, want in zip(arrays, (train_x, train_y, test_x, test_y)):
    np.testing.assert_array_equal(got, want)


def test_python_binary_and_tfds_orders_give_the_same_clients(tmp_path, monkeypatch):
  """Same examples via the python archive, the binary archive and TFDS (records shuffled,
  numbered by 'id' like TFDS's builder): the same arrays, so the same per-client sets."""
  (train_x, train_y), (test_x, test_y) = fake_cifar(1000), fake_cifar(300)
  for kind, encode, names in [
    ("python", python_pickle, ("train", "test")),
    ("binary", binary_records, ("train.bin", "test.bin")),
  ]:
    (tmp_path / kind).mkdir()
    with tarfile.open(tmp_path / kind / f"cifar-100-{kind}.tar.gz", "w:gz") as tar:
      for name, (x, y) in zip(names, [(train_x, train_y), (test_x, test_y)]):
        add_to_tar(tar, f"cifar-100-{kind}/{name}", encode(x, y))

  def tfds_records(split, x, y):
    records = [{"id": f"{split}_{i:05d}", "image": x[i], "label": y[i]} for i in range(len(y))]
    return [records[i] for i in np.random.default_rng(0).permutation(len(records))]

  monkeypatch.setattr(
    tfds,
    "data_source",
    lambda *a, **k: [tfds_records("train", train_x, train_y), tfds_records("test", test_x, test_y)],
  )
  sources = [
    cifar100.load_arrays(str(tmp_path / "python")),
    cifar100.load_arrays(str(tmp_path / "binary")),
    cifar100.load_arrays(""),
  ]
  splits = []
  for arrays in sources:
    for got, want in zip(arrays, (train_x, train_y, test_x, test_y)):
      np.testing.assert_array_equal(got, want)
    splits.append(
      partition.cluster_partition(arrays[1], arrays[3], 10, 5, 30, 10.0, 0.1, 11, num_classes=100)
    )
  for other in splits[1:]:
    for a, b in zip(
      splits[0].train + splits[0].val + splits[0].test, other.train + other.val + other.test
    ):
      np.testing.assert_array_equal(a, b)


def test_python_archive_reader_refuses_code_in_pickles(tmp_path):
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  (folder / "train").write_bytes(pickle.dumps(os.getcwd, protocol=3))
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    cifar100.read_archive(str(tmp_path))


# The narrow ResNet-9.


def resnet(conv_impl="auto", num_classes=100):
  c = base_config().model
  c.name, c.conv_impl = "resnet9", conv_impl
  return models.get_model(c, num_classes)


def test_resnet9_matches_the_hand_count():
  model = resnet()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # stem 3*3*3*8 + BN 2*8; stage 1: 2 * (9*8*8 + 2*8); stage 2: 9*8*16 + 9*16*16 + 8*16
  # (1x1 shortcut) + 3 BN * 2*16; stage 3 and 4 likewise with 16->32 and 32->64;
  # head 64*100 + 100.
  by_hand = (
    (216 + 16)
    + 2 * (576 + 16)
    + (1152 + 2304 + 128 + 96)
    + (4608 + 9216 + 512 + 192)
    + (18432 + 36864 + 2048 + 384)
    + 6500
  )
  print(f"resnet9 parameters: {models.count_params(variables)} (by hand {by_hand})")
  assert models.count_params(variables) == by_hand == 83_852
  bn_channels = 8 + 2 * 8 + 3 * (16 + 32 + 64)
  assert sum(x.size for x in jax.tree.leaves(variables["batch_stats"])) == 2 * bn_channels
  assert "bias" not in variables["params"]["stem_conv"]  # BN follows every conv.
  head = [m for m in jax.tree.leaves(models.head_mask(variables)) if m]
  assert len(head) == 2 and variables["params"]["head"]["kernel"].shape == (64, 100)
  assert jax.eval_shape(model.apply, variables, jnp.zeros((3, 32, 32, 3))).shape == (3, 100)


def test_strided_conv_matches_pytorch_padding():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  for size, stride in [(3, 2), (1, 2), (3, 1)]:
    pad = (size - 1) // 2
    reference = nn.Conv(4, (size, size), (stride, stride), ((pad, pad), (pad, pad)), use_bias=False)
    variables = reference.init(jax.random.key(1), x)
    for impl in ("xla", "canonical", "patches"):
      got = conv(4, size, stride, impl, name=None).apply(variables, x)
      np.testing.assert_allclose(got, reference.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_resnet9_patches_equal_xla_in_train_and_eval():
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  xla, patches = resnet("xla", 10), resnet("patches", 10)
  variables = jax.jit(xla.init)(jax.random.key(1, impl=RBG), x)
  evaluate = lambda m: jax.jit(m.apply)(variables, x)
  np.testing.assert_allclose(evaluate(xla), evaluate(patches), rtol=1e-4, atol=1e-4)
  fit = lambda m: jax.jit(lambda v: m.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  (out_x, stats_x), (out_p, stats_p) = fit(xla), fit(patches)
  np.testing.assert_allclose(out_x, out_p, rtol=1e-4, atol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), stats_x, stats_p
  )


def test_resnet9_batch_norm_updates_stats_only_in_training():
  model = resnet("xla", num_classes=10)
  x = 3.0 + jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1, impl=RBG), x)
  _, updated = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  stem = updated["batch_stats"]["stem_bn"]["mean"]
  np.testing.assert_allclose(
    stem,
    0.1
    * jnp.mean(
      conv(8, 3, 1, "xla", name=None).apply({"params": variables["params"]["stem_conv"]}, x),
      axis=(0, 1, 2),
    ),
    rtol=1e-4,
    atol=1e-5,
  )  # momentum 0.9 from zero.
  # Evaluation uses the running statistics: an example's output ignores its batch.
  evaluate = jax.jit(model.apply)
  np.testing.assert_allclose(
    evaluate(variables, x[:1]), evaluate(variables, x)[:1], rtol=1e-4, atol=1e-5
  )


def test_fedmerge_with_resnet9_runs_and_merges_batch_stats(tmp_path, tiny_config):
  config = tiny_config
  config.num_global_models, config.local_epochs, config.client_lr = 2, 1, 0.01
  config.model.name = "resnet9"
  data = make_federation(
    num_clients=4, sizes=[8] * 4, example_shape=(32, 32, 3), num_classes=5, test_size=8, val_size=8
  )
  summary = train.train_and_evaluate(config, str(tmp_path), data=data)
  for key in ("test/acc_mean", "test/loss", "val/loss", "train/loss", "best/acc_mean"):
    assert np.isfinite(summary[key]), key
  # One round moves the globals' BatchNorm statistics, as it moves their parameters.
  model, algorithm = train.build(config_lib.resolve(config), data)
  state = jax.jit(algorithm.init)(jax.random.key(0, impl=RBG))
  ids = np.arange(data.num_clients)
  new_state, _ = jax.jit(algorithm.round)(
    state, ids, data.train.gather(ids), jax.random.key(1, impl=RBG)
  )
  old, new = state.globals["batch_stats"], new_state.globals["batch_stats"]
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
