"""The gap metric (gap.py) against a direct computation: each sampled client trained by hand
from the model it received, both models scored in NumPy on its own test split."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import client, evaluation, gap, train
from fedmerge_jax.config import resolve
from fedmerge_jax.data import FederatedData


def federation():
  """Unequal train and test sizes (test 2..10), 5 clients, 3 classes."""
  rng = np.random.default_rng(3)
  split = lambda n: (
    rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
    rng.integers(0, 3, n).astype(np.int32),
  )
  train_sizes, test_sizes = [5, 9, 3, 12, 7], [4, 2, 10, 6, 3]
  return FederatedData.from_arrays(
    {f"c{i}": split(n) for i, n in enumerate(train_sizes)},
    {f"c{i}": split(n) for i, n in enumerate(test_sizes)},
    num_classes=3,
  )


def numpy_scores(model, variables, x, y):
  """(accuracy, mean CE) of a plain flax model, from its logits in NumPy."""
  logits = np.asarray(model.apply(variables, jnp.asarray(x), train=False), np.float64)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  return np.mean(logits.argmax(1) == y), -np.mean(log_p[np.arange(len(y)), y])


def softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def merged(state, weights_row):
  return jax.tree.map(lambda x: np.tensordot(weights_row, np.asarray(x), 1), state.globals)


# example_chunk 3: the probe (evaluation.EVAL_EXAMPLES) and the gap's evaluation in chunks of
# 3 examples; client 2's 10 test examples end in a chunk shifted back to rows 7..9.
@pytest.mark.parametrize(
  "algorithm, example_chunk", [("fedmerge", 0), ("fedavg", 0), ("fedmerge", 3)]
)
def test_gap_equals_a_direct_computation(tiny_config, algorithm, example_chunk, monkeypatch):
  if example_chunk:
    monkeypatch.setattr(evaluation, "EVAL_EXAMPLES", example_chunk)
  tiny_config.algorithm = algorithm
  tiny_config.num_global_models = 2
  data = federation()
  config = resolve(tiny_config)
  model, alg = train.build(config, data)
  state = alg.init(jax.random.key(0))
  if algorithm == "fedmerge":
    state = state.replace(logits=jax.random.normal(jax.random.key(5), state.logits.shape))
  ids = np.array([0, 2, 3])  # Partial participation.
  rng = jax.random.key(7)
  batch = gap.WithTest(data.train.gather(ids), data.test.gather(ids))
  new_state, round_metrics = jax.jit(alg.round)(state, ids, batch, rng)
  scalars, per_client = gap.make_gap_evaluator(alg, data, example_chunk=example_chunk)(
    new_state, ids, round_metrics
  )

  local = client.LocalConfig(
    config.local_epochs,
    config.batch_size,
    config.client_lr,
    config.prox_mu if algorithm == "fedmerge" else 0.0,
  )
  acc_gaps, loss_gaps = [], []
  for cid in ids:
    if algorithm == "fedmerge":
      received = merged(state, softmax(np.asarray(state.logits[cid])))
      sent = merged(new_state, softmax(np.asarray(new_state.logits[cid])))
    else:
      received = jax.tree.map(lambda x: np.asarray(x[0]), state.globals)
      sent = jax.tree.map(lambda x: np.asarray(x[0]), new_state.globals)
    n = data.train.counts[cid]
    own = client.ClientData(*data.train.client(cid), n)
    delta, _ = client.local_train(model.apply, received, own, jax.random.fold_in(rng, cid), local)
    trained = jax.tree.map(lambda r, d: r - np.asarray(d), received, delta)
    x, y = data.test.client(cid)
    (acc_a, loss_a), (acc_b, loss_b) = (numpy_scores(model, v, x, y) for v in (trained, sent))
    acc_gaps.append(acc_a - acc_b)
    loss_gaps.append(loss_b - loss_a)
  np.testing.assert_allclose(per_client["clients/gap_acc"][ids], acc_gaps, atol=1e-6)
  np.testing.assert_allclose(per_client["clients/gap_loss"][ids], loss_gaps, atol=1e-4)
  assert np.isnan(per_client["clients/gap_acc"][[1, 4]]).all()  # Not trained this round.
  assert scalars["gap/acc_mean"] == pytest.approx(np.mean(acc_gaps), abs=1e-6)
  assert scalars["gap/loss_mean"] == pytest.approx(np.mean(loss_gaps), abs=1e-4)
  assert np.any(np.abs(loss_gaps) > 1e-3)  # The test is not vacuous.


def test_local_training_has_no_gap(tiny_config):
  """'local' keeps exactly what it trained: (a) and (b) are the same model."""
  tiny_config.algorithm = "local"
  data = federation()
  _, alg = train.build(resolve(tiny_config), data)
  ids = np.arange(5)
  batch = gap.WithTest(data.train.gather(ids), data.test.gather(ids))
  new_state, metrics = jax.jit(alg.round)(
    alg.init(jax.random.key(0)), ids, batch, jax.random.key(1)
  )
  scalars, per_client = gap.make_gap_evaluator(alg, data, chunk_size=2)(new_state, ids, metrics)
  np.testing.assert_allclose(per_client["clients/gap_loss"], 0.0, atol=1e-5)
  assert scalars["gap/acc_mean"] == pytest.approx(0.0, abs=1e-6)


class FlatDense(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x.reshape(len(x), -1))


def test_the_probe_scores_each_clients_test_part_and_runs_for_no_one_when_all_are_empty():
  """Vmapped over clients, as local training calls it: each client's (correct, summed CE) on
  its own test rows (NumPy), zeros for an empty one; and when every client's part is empty
  (a replica group's training rounds) the model is never called."""
  data, model = federation(), FlatDense()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  calls = []

  def predict(v, x):
    jax.debug.callback(lambda: calls.append(1))
    return model.apply(v, x)

  skipping = lambda test: gap.WithTest(test, test, skips_empty=True)
  probe = jax.jit(jax.vmap(lambda test: gap.probe({}, predict, variables, skipping(test))))
  ids = np.array([0, 5, 2, 6])  # 5 and 6: phantoms (past the last client), no examples.
  got = jax.device_get(probe(data.test.gather(ids, 16)))
  assert calls  # Some client had examples: the probe ran.
  for row, i in enumerate(ids):
    if i >= data.num_clients:
      assert got["gap_trained_correct"][row] == got["gap_trained_loss_sum"][row] == 0
      continue
    x, y = data.test.client(i)
    acc, loss = numpy_scores(model, variables, x, y)
    assert got["gap_trained_correct"][row] == pytest.approx(acc * len(y))
    assert got["gap_trained_loss_sum"][row] == pytest.approx(loss * len(y), rel=1e-5)
  calls.clear()
  empty = jax.device_get(probe(data.test.gather(np.array([5, 6, 7, 8]), 16)))
  assert calls == []  # Every part empty: no trip of the probe's loop.
  assert not np.any(empty["gap_trained_correct"]) and not np.any(empty["gap_trained_loss_sum"])


@pytest.mark.plots  # The suite's runs skip plots (conftest); this one draws them.
def test_runs_write_the_gap(tmp_path, tiny_config):
  tiny_config.clients_per_round = 3
  summary = train.train_and_evaluate(tiny_config, str(tmp_path), data=federation())
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all(np.isfinite(row["gap/acc_mean"]) and "gap/loss_mean" in row for row in rows)
  clients = np.load(os.path.join(tmp_path, "clients.npz"))
  assert np.isfinite(clients["gap_acc"]).sum() == 3 and np.isfinite(clients["gap_loss"]).sum() == 3
  assert summary["gap/loss_mean"] == rows[-1]["gap/loss_mean"]
  assert os.path.exists(os.path.join(tmp_path, "gap.png"))


def test_compare_table_shows_the_gap():
  from fedmerge_jax import compare  # pylint: disable=g-import-not-at-top

  results = [
    compare.Result("fedmerge", "/w/a", {"gap/acc_mean": -0.01234}, []),
    compare.Result("fedavg", "/w/b", {"gap/acc_mean": 0.25}, []),
    compare.Result("local", "/w/c", {}, []),
  ]
  table = compare.comparison_table(results).splitlines()
  assert table[0].split("|")[-2].strip() == "gap acc"
  assert [line.split("|")[-2].strip() for line in table[2:]] == [
    "-0.0123",
    "+0.2500",
    compare.MISSING,
  ]


@pytest.mark.parametrize("algorithm", ["ditto", "fedavg_ft"])
def test_received_is_the_global_model_where_clients_predict_with_another(tiny_config, algorithm):
  """Ditto predicts with v_i and FedAvg-FT with a fine-tuned copy; the server sends w."""
  tiny_config.algorithm = algorithm
  data = federation()
  _, alg = train.build(resolve(tiny_config), data)
  state = alg.init(jax.random.key(0))
  if algorithm == "ditto":  # Personal models that differ from the global one.
    state = state.replace(personal=jax.tree.map(lambda x: x + 1.0, state.personal))
  ids = np.array([1, 3])
  got = (alg.received or alg.personalized)(state, ids, data.train.gather(ids))
  server = state.server if algorithm == "ditto" else state
  jax.tree.map(
    lambda g, w: np.testing.assert_array_equal(g, np.broadcast_to(w, g.shape)),
    got,
    jax.tree.map(lambda x: x[0], server.globals),
  )


def fixed(seed):
  """An initializer that ignores its key: every run, and every global, starts the same."""
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(
    np.random.default_rng(seed).normal(0, 0.5, shape), dtype
  )


class FixedInitMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(8, kernel_init=fixed(0))(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, kernel_init=fixed(1), name="head")(x)


def one_example_federation():
  """Each client's training examples are copies of one (x, y), so its local training gives
  the same model whatever the shuffling key; unequal sizes (largest-first order 2, 1, 4, 0, 3)
  and unequal test splits."""
  rng = np.random.default_rng(4)
  copies = lambda n: (
    np.repeat(rng.normal(size=(1, 4, 4, 1)).astype(np.float32), n, 0),
    np.full(n, rng.integers(0, 3), np.int32),
  )
  split = lambda n: (
    rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
    rng.integers(0, 3, n).astype(np.int32),
  )
  return FederatedData.from_arrays(
    {f"c{i}": copies(n) for i, n in enumerate([4, 8, 12, 3, 6])},
    {f"c{i}": split(n) for i, n in enumerate([7, 5, 9, 6, 8])},
    num_classes=3,
  )


@pytest.mark.parametrize("algorithm", ["fedavg", "ditto", "fedavg_ft"])
def test_per_client_gaps_through_a_run_score_the_model_the_server_sends(
  tmp_path, tiny_config, algorithm
):
  """One round of all clients through train_and_evaluate (its clients in largest-first order):
  clients.npz's gap of client c is c's own trained model against the new global model, which
  is what the server sends, also for Ditto and FedAvg-FT (whose clients predict with others)."""
  tiny_config.algorithm, tiny_config.num_rounds = algorithm, 1
  tiny_config.checkpoint_every, tiny_config.tensorboard = 0, False
  data, model = one_example_federation(), FixedInitMLP()
  train.train_and_evaluate(tiny_config, str(tmp_path), data=data, model=model)
  clients = np.load(os.path.join(tmp_path, "clients.npz"))
  # Reference: FedAvg's round by hand from the fixed initial model.
  start = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  local = client.LocalConfig(
    tiny_config.local_epochs, tiny_config.batch_size, tiny_config.client_lr, 0.0
  )
  trained = []
  for cid in range(5):
    own = client.ClientData(*data.train.client(cid), data.train.counts[cid])
    delta, _ = client.local_train(model.apply, start, own, jax.random.key(cid), local)
    trained.append(jax.tree.map(lambda r, d: np.asarray(r) - np.asarray(d), start, delta))
  p = data.train.counts / data.train.counts.sum()
  sent = jax.tree.map(lambda *ws: sum(pc * w for pc, w in zip(p, ws)), *trained)
  acc_gap, loss_gap = [], []
  for cid in range(5):
    x, y = data.test.client(cid)
    (acc_a, loss_a), (acc_b, loss_b) = (numpy_scores(model, v, x, y) for v in (trained[cid], sent))
    acc_gap.append(acc_a - acc_b)
    loss_gap.append(loss_b - loss_a)
  np.testing.assert_allclose(clients["gap_loss"], loss_gap, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(clients["gap_acc"], acc_gap, atol=1e-6)
  assert len(set(np.round(loss_gap, 3))) == 5  # Distinct per client: a mix-up would show.


@pytest.mark.parametrize("algorithm", ["fedprox", "ifca", "fedem"])
def test_every_algorithm_reports_a_gap(tmp_path, tiny_config, algorithm):
  tiny_config.algorithm, tiny_config.num_rounds = algorithm, 1
  tiny_config.checkpoint_every, tiny_config.tensorboard = 0, False
  summary = train.train_and_evaluate(tiny_config, str(tmp_path), data=federation())
  assert np.isfinite(summary["gap/acc_mean"]) and np.isfinite(summary["gap/loss_mean"])
