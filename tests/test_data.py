"""FederatedData.from_arrays, partitioners and the offline default dataset."""

import numpy as np
import pytest

from fedmerge_jax.config import base_config
from fedmerge_jax.data import FederatedData, digits, load, partition


def test_from_arrays_pads_and_counts():
  train = {"a": (np.ones((3, 2)), np.array([0, 1, 2])), "b": (np.ones((1, 2)), np.array([4]))}
  test = {"b": (np.ones((2, 2)), np.array([1, 1]))}
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


@pytest.mark.parametrize("train,test,match", [
    ({"a": (np.ones((2, 2)), np.array([0]))}, {}, "x has 2 examples but y has 1"),
    ({"a": (np.ones((1, 2)), np.array([0.5]))}, {}, "labels must be integers"),
    ({"a": (np.full((1, 2), np.nan), np.array([0]))}, {}, "NaN"),
    ({"a": (np.ones((1, 2)), np.array([0]))}, {"z": (np.ones((1, 2)), np.array([0]))},
     "clients that train lacks"),
    ({"a": (np.ones((1, 2)), np.array([0])), "b": (np.ones((1, 3)), np.array([0]))}, {},
     "example shape"),
])
def test_from_arrays_rejects_bad_input(train, test, match):
  with pytest.raises(ValueError, match=match):
    FederatedData.from_arrays(train, test)


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
  train = {f"c{i}": (np.ones((n, 28, 28, 1), np.float16), np.zeros(n, np.int32))
           for i, n in enumerate(sizes)}
  data = FederatedData.from_arrays(train, train)
  real = sum(sizes) * (28 * 28 * 2 + 4)  # float16 pixels + int32 label per example.
  assert real <= data.train.nbytes <= real + 8 * (len(sizes) + 1)  # + the offsets.
