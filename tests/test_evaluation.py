"""Evaluation metrics against a direct NumPy computation, on clients of unequal test sizes."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import evaluation
from fedmerge_jax.algorithms.base import Algorithm
from fedmerge_jax.data import FederatedData

TEST_SIZES = [2, 5, 9, 3, 7]
VAL_SIZES = [4, 1, 6, 2, 3]


def _linear_clients():
  """Five clients, each predicting with its own linear map W_c from flattened inputs."""
  rng = np.random.default_rng(0)
  split = lambda n: (rng.normal(size=(n, 2, 3)).astype(np.float32),
                     rng.integers(0, 4, n).astype(np.int32))
  names = [f"c{i}" for i in range(5)]
  weights = rng.normal(size=(5, 6, 4)).astype(np.float32)
  test = {c: split(n) for c, n in zip(names, TEST_SIZES)}
  x2 = test["c2"][0]  # The largest client is always right: pooled and mean accuracy differ.
  test["c2"] = (x2, (x2.reshape(len(x2), -1) @ weights[2]).argmax(1).astype(np.int32))
  data = FederatedData.from_arrays({c: split(3) for c in names}, test,
                                   {c: split(n) for c, n in zip(names, VAL_SIZES)}, num_classes=4)
  algorithm = Algorithm(init=None, round=None, communication=(0, 0),
                        personalized=lambda state, ids, train: state[ids],
                        predict=lambda w, x: x.reshape(x.shape[0], -1) @ w)
  return data, weights, algorithm


def _numpy_metrics(weights, split, prefix):
  acc, loss, correct, total = [], [], 0, 0
  for c, n in enumerate(split.counts):
    x, y = split.client(c)
    logits = x.reshape(n, -1).astype(np.float64) @ weights[c]
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    hits = (logits.argmax(1) == y).sum()
    acc.append(hits / n)
    loss.append(-log_p[np.arange(n), y].mean())
    correct, total = correct + hits, total + n
  return {f"{prefix}/acc_mean": np.mean(acc), f"{prefix}/acc_weighted": correct / total,
          f"{prefix}/acc_std": np.std(acc), f"{prefix}/acc_p10": np.percentile(acc, 10),
          f"{prefix}/loss": np.mean(loss)}, np.array(acc)


def test_metrics_match_numpy_on_unequal_clients():
  data, weights, algorithm = _linear_clients()
  metrics = evaluation.make_evaluator(algorithm, data, chunk_size=2)(jnp.asarray(weights))
  for prefix, split in (("test", data.test), ("val", data.val)):
    expected, acc = _numpy_metrics(weights, split, prefix)
    for key, value in expected.items():
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(metrics[f"clients/{prefix}_acc"], acc, rtol=1e-6)
  # The unweighted mean differs from the pooled accuracy here, so the two can't be confused;
  # and padded rows (zeros, label 0) would be "correct" if they were counted.
  assert abs(metrics["test/acc_mean"] - metrics["test/acc_weighted"]) > 0.01
  assert min(TEST_SIZES) < max(TEST_SIZES) and (data.test.gather([0], 9).y[0, 2:] == 0).all()


def test_p10_is_the_tenth_percentile_of_client_accuracies():
  """Twelve clients with distinct accuracies k/11, so p0, p10 and p25 differ and p10 falls
  between two of them; one client without examples is left out. numpy's default
  percentile: linear between order statistics (position 0.1 (n - 1) = 1.1)."""
  counts = np.array([11] * 12 + [0])
  correct = np.array([9, 0, 5, 2, 7, 1, 11, 4, 8, 3, 6, 10, 0])
  metrics = evaluation.summarize(correct.astype(float), np.ones(13), counts, "test")
  acc = np.sort(correct[:12] / 11)
  expected = acc[1] + 0.1 * (acc[2] - acc[1])
  assert expected == pytest.approx(0.1)
  assert metrics["test/acc_p10"] == pytest.approx(expected, abs=1e-12)
  assert len({acc[0], acc[1], expected, np.percentile(acc, 25)}) == 4  # All differ.
