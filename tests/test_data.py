"""FederatedData.from_arrays, partitioners and the offline default dataset."""

import dataclasses

import numpy as np
import pytest

from fedmerge_jax.config import base_config
from fedmerge_jax.data import DataError, FederatedData, Standardize, digits, load, partition


def test_from_arrays_pads_and_counts():
  train = {"a": (np.ones((3, 2)), np.array([0, 1, 2])), "b": (np.ones((1, 2)), np.array([4]))}
  test = {"a": (np.ones((0, 2)), np.array([], int)), "b": (np.ones((2, 2)), np.array([1, 1]))}
  data = FederatedData.from_arrays(train, test)
  assert data.client_ids == ("a", "b")
  assert data.num_classes == 5
  np.testing.assert_array_equal(data.train.counts, [3, 1])
  np.testing.assert_array_equal(data.test.counts, [0, 2])  # 'a' has no test examples.
  assert data.train.x.shape == (4, 2) and data.val is None  # Ragged: real examples only.
  np.testing.assert_array_equal(data.train.client(1)[1], [4])
  batch = data.train.gather([1, 0], length=4)
  np.testing.assert_array_equal(batch.y, [[4, 0, 0, 0], [0, 1, 2, 0]])
  np.testing.assert_array_equal(batch.count, [1, 3])


def _xy(n, shape=(2,), label=0, dtype=np.float32):
  return np.ones((n, *shape), dtype), np.full(n, label, np.int32)


GOOD = {"a": _xy(2), "b": _xy(3, label=1)}


@dataclasses.dataclass
class _MutableScale:  # A dataclass that is not frozen: unhashable.
  scale: float = 0.5

  def __call__(self, x):
    return x * self.scale


NAN = np.ones((2, 2), np.float32)
NAN[1, 0] = np.nan


@pytest.mark.parametrize(
  "train,test,kwargs,message",
  [
    (
      {"a": (np.ones((2, 2)), np.array([0]))},
      GOOD,
      {},
      "from_arrays: train['a']: x has 2 examples but y has 1; give one label per example.",
    ),
    (
      {**GOOD, "b": (np.ones((1, 2)), np.array([0.5]))},
      GOOD,
      {},
      "from_arrays: train['b']: labels must be integers, got float64; map the classes",
    ),
    (
      GOOD,
      {**GOOD, "b": (NAN, np.array([0, 1]))},
      {},
      "from_arrays: test['b']: x contains NaN or infinite values (example 1 first); clean or "
      "drop those examples.",
    ),
    (
      {**GOOD, "b": (np.array([[np.inf, 0.0]]), np.array([0]))},
      GOOD,
      {},
      "from_arrays: train['b']: x contains NaN or infinite values",
    ),
    (
      {"a": _xy(1)},
      {"a": _xy(1), "z": _xy(1)},
      {},
      "from_arrays: test has clients that train lacks: ['z']; every client must be in train.",
    ),
    (
      {**GOOD, "b": _xy(1, shape=(3,))},
      GOOD,
      {},
      "from_arrays: train['b']: example shape (3,) differs from (2,) (the first client's); give "
      "every client and split examples of one shape.",
    ),
    (
      GOOD,
      {**GOOD, "b": _xy(2, shape=(2, 1))},
      {},
      "from_arrays: test['b']: example shape (2, 1) differs from (2,)",
    ),
    (
      {**GOOD, "b": _xy(2, label=3)},
      GOOD,
      {"num_classes": 3},
      "from_arrays: train['b']: label 3 is outside [0, 3); fix the labels, or pass a "
      "num_classes that covers them.",
    ),
    (
      GOOD,
      {**GOOD, "a": _xy(2, label=-1)},
      {},
      "from_arrays: test['a']: label -1 is outside [0, 2)",
    ),
    (
      {**GOOD, "b": (np.array([["x", "y"]]), np.array([0]))},
      GOOD,
      {},
      "from_arrays: train['b']: x has dtype <U1, which can be neither an image nor a feature; "
      "give numbers",
    ),
    (
      {**GOOD, "b": (np.ones((1, 2), complex), np.array([0]))},
      GOOD,
      {},
      "from_arrays: train['b']: x has dtype complex128, which can be neither an image nor a "
      "feature",
    ),
    (
      {**GOOD, "b": _xy(0)},
      GOOD,
      {},
      "custom: train['b'] has no training examples, and every sampled client trains: drop it "
      "(from test and val too) or give each some examples.",
    ),
    (GOOD, {}, {}, "from_arrays: test has no clients, and every evaluation needs them"),
    (
      GOOD,
      {"a": _xy(1)},
      {},
      "from_arrays: test lacks 1 of the 2 clients (['b']); give each one a test entry (an "
      "empty (x, y) for one without test examples), or drop it from train.",
    ),
    (
      GOOD,
      {"a": _xy(0), "b": _xy(0)},
      {},
      "custom: the test split has no examples, and every evaluation needs them",
    ),
    (
      GOOD,
      GOOD,
      {"val": {"a": _xy(1, label=7)}, "num_classes": 2},
      "from_arrays: val['a']: label 7 is outside [0, 2)",
    ),
    (
      GOOD,
      GOOD,
      {"input_transform": _MutableScale()},
      "custom: input_transform _MutableScale(scale=0.5) is not hashable",
    ),
  ],
)
def test_from_arrays_rejects_bad_data_naming_the_client_and_the_fix(train, test, kwargs, message):
  with pytest.raises(DataError) as info:
    FederatedData.from_arrays(train, test, **kwargs)
  assert str(info.value).startswith(message), str(info.value)


def test_loaders_check_their_data_too():
  """A loader building FederatedData directly (FEMNIST's) gets the same checks."""
  good = FederatedData.from_arrays(GOOD, GOOD)
  bad_test = dataclasses.replace(good.test, y=np.array([0, 0, 1, 5, 1], np.int32))
  with pytest.raises(DataError, match=r"femnist: test\['b'\]: label 5 is outside \[0, 2\)"):
    dataclasses.replace(good, test=bad_test, name="femnist")


def test_dirichlet_partition_is_deterministic_and_complete():
  labels = np.repeat(np.arange(10), 50)
  a = partition.dirichlet_partition(labels, 8, alpha=0.3, seed=1, min_size=5)
  b = partition.dirichlet_partition(labels, 8, alpha=0.3, seed=1, min_size=5)
  c = partition.dirichlet_partition(labels, 8, alpha=0.3, seed=2, min_size=5)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert sorted(np.concatenate(a).tolist()) == list(range(500))  # Disjoint and complete.
  assert min(len(p) for p in a) >= 5
  hist = partition.label_histograms(labels, a, 10)
  # Skewed: with alpha=0.3 most clients are dominated by few classes.
  assert np.mean(hist.max(1) / hist.sum(1)) > 0.25


def test_dirichlet_partition_explains_impossible_requests():
  with pytest.raises(ValueError, match="raise alpha"):
    partition.dirichlet_partition(np.zeros(10, int), 5, 0.1, 0, min_size=5, max_tries=3)


def test_digit_groups_have_the_hidden_structure():
  config = base_config().data
  data = load(config)
  assert data.num_clients == 20 and data.num_classes == 10
  assert data.example_shape == (8, 8, 1)
  np.testing.assert_array_equal(np.bincount(data.groups), [5, 5, 5, 5])
  total = data.train.counts.sum() + data.test.counts.sum() + data.val.counts.sum()
  assert total == 1797
  # Group 0 keeps the true labels, others are relabelled: same image, other label.
  transforms = digits.group_transforms(4, "label_permutation", 10, config.seed)
  assert np.array_equal(transforms[0][1], np.arange(10))
  assert not np.array_equal(transforms[1][1], np.arange(10))
  again = load(config)
  np.testing.assert_array_equal(data.train.x, again.train.x)


def test_rotation_groups_rotate_images():
  config = base_config().data
  config.group_transform = "rotation"
  transforms = digits.group_transforms(2, "rotation", 10, 0)
  img = np.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(transforms[1][0](img)[0, :, :, 0], np.rot90(img[0, :, :, 0]))
  assert load(config).num_clients == 20


def test_ragged_splits_take_their_real_size():
  sizes = [1, 400, 3, 57]
  train = {
    f"c{i}": (np.ones((n, 28, 28, 1), np.float16), np.zeros(n, np.int32))
    for i, n in enumerate(sizes)
  }
  data = FederatedData.from_arrays(train, train)
  real = sum(sizes) * (28 * 28 * 2 + 4)  # float16 pixels + int32 label per example.
  assert real <= data.train.nbytes <= real + 8 * (len(sizes) + 1)  # + the offsets.


def test_from_arrays_keeps_uint8_images_only_with_a_transform_that_says_what_they_mean():
  uint8 = {"a": _xy(2, dtype=np.uint8), "b": _xy(3, label=1, dtype=np.uint8)}
  half = {"a": _xy(2, dtype=np.float16), "b": _xy(3, label=1, dtype=np.float16)}
  transform = Standardize((0.5,), (0.25,), divide_by=255)
  kept = FederatedData.from_arrays(uint8, uint8, input_transform=transform)
  assert kept.train.x.dtype == kept.test.x.dtype == np.uint8 and kept.input_transform == transform
  assert FederatedData.from_arrays(uint8, uint8).train.x.dtype == np.float32  # As before.
  assert FederatedData.from_arrays(half, half).train.x.dtype == np.float16
  mixed = {"a": _xy(2, dtype=np.uint8), "b": _xy(3, label=1)}
  assert FederatedData.from_arrays(mixed, GOOD, input_transform=transform).train.x.dtype == (
    np.float32
  )
  with pytest.raises(ValueError, match="one positive std per mean"):
    Standardize((0.5, 0.5), (0.25,))
