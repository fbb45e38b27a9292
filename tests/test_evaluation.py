"""Evaluation metrics against a direct NumPy computation, on clients of unequal test sizes,
in one batch and in chunks of examples; the compiled chunk's memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TinyBN, make_federation, tiny_base_config
from fedmerge_jax import evaluation
from fedmerge_jax import parallel
from fedmerge_jax import train
from fedmerge_jax.algorithms.base import Algorithm
from fedmerge_jax.client import ClientData
from fedmerge_jax.config import resolve
from fedmerge_jax.data import FederatedData

TEST_SIZES = [2, 5, 9, 3, 7]
VAL_SIZES = [4, 1, 6, 2, 3]


def _linear_clients(test_sizes=TEST_SIZES):
  """Five clients, each predicting with its own linear map W_c from flattened inputs."""
  rng = np.random.default_rng(0)
  split = lambda n: (
    rng.normal(size=(n, 2, 3)).astype(np.float32),
    rng.integers(0, 4, n).astype(np.int32),
  )
  names = [f"c{i}" for i in range(5)]
  weights = rng.normal(size=(5, 6, 4)).astype(np.float32)
  test = {c: split(n) for c, n in zip(names, test_sizes)}
  x2 = test["c2"][0]  # The largest client is always right: pooled and mean accuracy differ.
  test["c2"] = (x2, (x2.reshape(len(x2), -1) @ weights[2]).argmax(1).astype(np.int32))
  data = FederatedData.from_arrays(
    {c: split(3) for c in names},
    test,
    {c: split(n) for c, n in zip(names, VAL_SIZES)},
    num_classes=4,
  )
  algorithm = Algorithm(
    init=None,
    round=None,
    communication=(0, 0),
    personalized=lambda state, ids, train: state[ids],
    predict=lambda w, x: x.reshape(x.shape[0], -1) @ w,
  )
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
  return {
    f"{prefix}/acc_mean": np.mean(acc),
    f"{prefix}/acc_weighted": correct / total,
    f"{prefix}/acc_std": np.std(acc),
    f"{prefix}/acc_p10": np.percentile(acc, 10),
    f"{prefix}/loss": np.mean(loss),
  }, np.array(acc)


# Client 2's 16 test examples fill their bucket (16): in chunks of 3 the last chunk is shifted
# back to rows 13..15, two of them already counted; in chunks of 4 the chunks tile it exactly.
@pytest.mark.parametrize(
  "test_sizes, example_chunk",
  [(TEST_SIZES, 0), ([2, 5, 16, 3, 7], 0), ([2, 5, 16, 3, 7], 3), ([2, 5, 16, 3, 7], 4)],
)
def test_metrics_match_numpy_on_unequal_clients(test_sizes, example_chunk):
  data, weights, algorithm = _linear_clients(test_sizes)
  metrics = evaluation.make_evaluator(algorithm, data, chunk_size=2, example_chunk=example_chunk)(
    jnp.asarray(weights)
  )
  for prefix, split in (("test", data.test), ("val", data.val)):
    expected, acc = _numpy_metrics(weights, split, prefix)
    for key, value in expected.items():
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(metrics[f"clients/{prefix}_acc"], acc, rtol=1e-6)
  # The unweighted mean differs from the pooled accuracy here, so the two can't be confused;
  # and padded rows (zeros, label 0) would be "correct" if they were counted.
  assert abs(metrics["test/acc_mean"] - metrics["test/acc_weighted"]) > 0.01
  assert min(test_sizes) < max(test_sizes) and (data.test.gather([0], 9).y[0, 2:] == 0).all()


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


@pytest.fixture(scope="module")
def batchnorm_run():
  """FedAvg on a BatchNorm model, its running statistics made non-trivial; unequal test
  splits (bucketed to 16 and 8: partial last chunks of 5)."""
  data = make_federation(sizes=[3, 9, 6, 4], val_size=0)
  rng = np.random.default_rng(1)
  split = lambda n: (
    rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
    rng.integers(0, 3, n).astype(np.int32),
  )
  train_split = {f"c{i}": data.train.client(i) for i in range(4)}
  data = FederatedData.from_arrays(
    train_split,
    {f"c{i}": split(n) for i, n in enumerate([13, 2, 7, 16])},
    {f"c{i}": split(n) for i, n in enumerate([5, 11, 1, 3])},
    num_classes=3,
  )
  config = tiny_base_config()
  config.algorithm, config.num_global_models = "fedavg", 1
  model = TinyBN()
  _, alg = train.build(resolve(config), data, model=model)
  state = alg.init(jax.random.key(0))
  stats = lambda x: jnp.abs(x + jnp.asarray(rng.normal(size=x.shape), x.dtype))  # Var >= 0.
  state = state.replace(
    globals={**state.globals, "batch_stats": jax.tree.map(stats, state.globals["batch_stats"])}
  )
  return data, model, alg, state


@pytest.mark.parametrize("example_chunk", [0, 5])
def test_batchnorm_model_in_eval_mode_in_chunks_matches_a_direct_computation(
  batchnorm_run, example_chunk
):
  data, model, alg, state = batchnorm_run
  metrics = evaluation.make_evaluator(alg, data, chunk_size=3, example_chunk=example_chunk)(state)
  variables = jax.tree.map(lambda x: np.asarray(x[0]), state.globals)
  for name, split in (("test", data.test), ("val", data.val)):
    acc, loss = [], []
    for c in range(4):  # Each client's real examples in one call of the model, in NumPy.
      x, y = split.client(c)
      logits = np.asarray(model.apply(variables, jnp.asarray(x), train=False), np.float64)
      log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
      acc.append(np.mean(logits.argmax(1) == y))
      loss.append(-log_p[np.arange(len(y)), y].mean())
    np.testing.assert_allclose(metrics[f"clients/{name}_acc"], acc, atol=1e-6)
    assert metrics[f"{name}/loss"] == pytest.approx(np.mean(loss), rel=1e-5)


def test_chunk_sizes_follow_the_config_or_bound_the_examples_at_once():
  data = make_federation(num_clients=40, test_size=300, val_size=20)
  config = tiny_base_config()
  config.eval_chunk_size, config.eval_batch_size = 0, 0
  assert evaluation.chunk_sizes(config, data) == (
    evaluation.EVAL_ROWS // evaluation.EVAL_EXAMPLES,
    evaluation.EVAL_EXAMPLES,
  )
  config.client_chunk_size = 3  # A user's training chunk also bounds evaluation's.
  assert evaluation.chunk_sizes(config, data) == (3, evaluation.EVAL_EXAMPLES)
  config.eval_chunk_size, config.eval_batch_size = 64, 50  # At most every client.
  assert evaluation.chunk_sizes(config, data) == (40, 50)
  small = make_federation(num_clients=40, test_size=6, val_size=4)
  config.eval_chunk_size, config.eval_batch_size, config.client_chunk_size = 0, 0, 0
  assert evaluation.chunk_sizes(config, small) == (40, evaluation.EVAL_EXAMPLES)


def _temp_bytes(alg, state, length: int, example_chunk: int) -> int:
  """XLA's temporaries of the compiled evaluation of 2 clients with `length` test rows."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  split = lambda n: ClientData(
    spec((2, n, 4, 4, 1), jnp.float32), spec((2, n), jnp.int32), spec((2,), jnp.int32)
  )
  program = evaluation.chunk_program(alg, example_chunk, parallel.make_mesh(1))
  compiled = program.lower(
    state, spec((2,), jnp.int32), split(8), {"test": split(length)}
  ).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_evaluation_temporaries_stay_flat_as_a_test_split_grows():
  config = tiny_base_config()
  config.algorithm, config.num_global_models, config.model.hidden_sizes = "fedavg", 1, (256,)
  data = make_federation(num_clients=2)
  _, alg = train.build(resolve(config), data)
  state = jax.eval_shape(alg.init, jax.random.key(0))
  chunked = [_temp_bytes(alg, state, n, 64) for n in (256, 4096)]
  whole = [_temp_bytes(alg, state, n, 0) for n in (256, 4096)]
  assert chunked[1] <= 1.1 * chunked[0]  # Flat: one chunk of 64 rows whatever the split.
  assert whole[1] > 8 * whole[0]  # In one batch the activations grow with the split.
  assert chunked[1] < whole[1] / 8
