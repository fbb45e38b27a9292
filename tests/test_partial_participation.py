"""Partial participation: who is not sampled does not move; servers see only what they should."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmerge_jax import parallel, train
from fedmerge_jax.algorithms import fedmerge
from fedmerge_jax.config import resolve
from tests.conftest import make_federation


def _build(config, data, algorithm, **overrides):
  config.algorithm = algorithm
  for key, value in overrides.items():
    config[key] = value
  config = resolve(config)
  model, alg = train.build(config, data)
  return config, model, alg


def _one(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _rows(tree, rows):
  """The [N, ...] leaves of an optimizer state, at `rows`, as NumPy."""
  return [np.asarray(x[rows]) for x in jax.tree.leaves(tree) if x.ndim >= 1]


def test_unsampled_clients_keep_logits_and_adam_state_exactly(tiny_config, tiny_data):
  _, _, alg = _build(
    tiny_config,
    tiny_data,
    "fedmerge",
    update_mode="gradient",
    server_optimizer_logits="adam",
    server_lr_logits=0.1,
  )
  state = alg.init(jax.random.key(0))
  round_fn = jax.jit(alg.round)
  first, second = np.array([0, 1, 2]), np.array([2, 3])
  s1, _ = round_fn(state, first, tiny_data.train.gather(first), jax.random.key(1))
  s2, _ = round_fn(s1, second, tiny_data.train.gather(second), jax.random.key(2))
  idle = np.array([0, 1, 4])  # 0, 1: sampled in round 1 (adam moments non-zero), not in 2.
  np.testing.assert_array_equal(s2.logits[idle], s1.logits[idle])
  for before, after in zip(_rows(s1.logits_opt_state, idle), _rows(s2.logits_opt_state, idle)):
    np.testing.assert_array_equal(after, before)
  assert np.all(np.asarray(s1.logits[:2]) != 0), "round 1 must have moved clients 0 and 1"
  assert np.all(np.asarray(s2.logits[3]) != 0), "round 2 must have moved client 3"
  # Adam's step count is per client: the rounds it took part in.
  counts = [
    np.asarray(x)
    for x in jax.tree.leaves(s2.logits_opt_state)
    if x.shape == (5,) and jnp.issubdtype(x.dtype, jnp.integer)
  ]
  np.testing.assert_array_equal(counts[0], [1, 1, 2, 1, 0])
  # A client's first step is adam's first step on its row alone: lr * sign(g) here.
  np.testing.assert_allclose(np.abs(s2.logits[3]), 0.1, rtol=1e-3)


class _BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False, mask=None):
    x = nn.Dense(8)(x.reshape((x.shape[0], -1)))
    mask = None if mask is None else mask[:, None] > 0  # flax's BatchNorm: broadcastable to x.
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x, mask=mask))
    return nn.Dense(3, name="head")(x)


def test_gradient_mode_logit_gradient_comes_from_trainable_params_only(tiny_config, tiny_data):
  """dL/dA_ij = p_i w_ij <Delta_i, Theta_j - theta_i> over 'params' (DESIGN's closed form)."""
  tiny_config.algorithm = "fedmerge"
  tiny_config.update_mode = "gradient"
  tiny_config.server_lr_logits = 1.0
  config = resolve(tiny_config)
  model = _BatchNormNet()
  alg = fedmerge.make(model, config, 5, jnp.zeros(tiny_data.example_shape))
  state = alg.init(jax.random.key(0))
  # Give every model its own statistics and clients non-uniform weights.
  bump = lambda x: x + jax.random.normal(jax.random.key(3), x.shape)
  state = state.replace(
    globals={**state.globals, "batch_stats": jax.tree.map(bump, state.globals["batch_stats"])},
    logits=jax.random.normal(jax.random.key(4), state.logits.shape),
  )
  ids = np.array([0, 2, 4])
  batch = tiny_data.train.gather(ids)
  deltas, _ = alg.stages.train(state, ids, batch, jax.random.key(5))
  new = alg.stages.server(state, ids, batch, deltas)
  counts = tiny_data.train.counts[ids].astype(np.float64)
  p = counts / counts.sum()
  w = np.asarray(jax.nn.softmax(state.logits[ids], -1), np.float64)
  flat = lambda tree: np.concatenate(
    [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree["params"])], 1
  )
  theta = flat(state.globals)  # [K, P]
  delta = flat(deltas)  # [C, P]
  merged = w @ theta
  grad = np.stack(
    [[p[i] * w[i, j] * delta[i] @ (theta[j] - merged[i]) for j in range(3)] for i in range(3)]
  )
  np.testing.assert_allclose(
    np.asarray(new.logits[ids]), np.asarray(state.logits[ids]) - grad, rtol=1e-4, atol=1e-6
  )
  stats_moved = any(
    float(jnp.max(jnp.abs(x))) > 1e-3 for x in jax.tree.leaves(deltas["batch_stats"])
  )
  assert stats_moved, "the test needs BatchNorm statistics that move in training"


def test_ifca_merging_weights_are_the_assignment_evaluation_uses(tiny_config, tiny_data):
  tiny_config.num_global_models = 3
  _, model, alg = _build(tiny_config, tiny_data, "ifca")
  state = alg.init(jax.random.key(4))
  ids = np.array([0, 2])
  state, _ = jax.jit(alg.round)(state, ids, tiny_data.train.gather(ids), jax.random.key(1))
  every = np.arange(5)
  train_data = tiny_data.train.gather(every)
  losses = np.zeros((5, 3))
  for c in every:
    for k in range(3):
      x, y = tiny_data.train.client(c)
      out = model.apply(_one(state.globals, k), x)
      losses[c, k] = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  expected = np.eye(3)[losses.argmin(1)]
  np.testing.assert_array_equal(np.asarray(alg.merging_weights(state, every, train_data)), expected)
  # The same through train.py's chunked path (chunks of 2, the last padded).
  weights = train.all_merging_weights(
    alg, tiny_data, 2, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("clients",))
  )
  np.testing.assert_array_equal(weights(state), expected)
  # And evaluation's models are those clusters.
  models = alg.personalized(state, every, train_data)
  for c in every:
    np.testing.assert_array_equal(
      jax.tree.leaves(_one(models, c))[0],
      jax.tree.leaves(_one(state.globals, losses[c].argmin()))[0],
    )


STREAMING = [
  ("fedmerge", {"update_mode": "gradient"}),
  ("fedmerge", {"update_mode": "official", "num_global_models": 1}),
  ("fedavg", {}),
  ("fedprox", {}),
  ("ifca", {}),
]


@pytest.mark.parametrize("algorithm,overrides", STREAMING)
def test_streamed_server_update_equals_the_stacked_one(tiny_config, algorithm, overrides):
  """The round folds chunks of 2 (of 5 clients: 3 chunks) into running sums; `stages.server`
  sees every delta at once."""
  data = make_federation(num_clients=6)
  tiny_config.client_parallelism = "vmap"
  tiny_config.client_chunk_size = 2
  _, _, alg = _build(tiny_config, data, algorithm, **overrides)
  state = alg.init(jax.random.key(0))
  if algorithm == "fedmerge" and state.logits.shape[1] > 1:
    state = state.replace(logits=jax.random.normal(jax.random.key(5), state.logits.shape))
  ids = np.array([0, 1, 3, 4, 5])
  batch = data.train.gather(ids)
  rng = jax.random.key(7)
  streamed, _ = jax.jit(alg.round)(state, ids, batch, rng)
  deltas, _ = jax.jit(alg.stages.train)(state, ids, batch, rng)
  stacked = jax.jit(alg.stages.server)(state, ids, batch, deltas)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), streamed, stacked
  )
  moved = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(streamed.globals), jax.tree.leaves(state.globals))
  )
  assert moved > 1e-4


def test_fedem_streamed_server_update_equals_the_stacked_sum(tiny_config):
  data = make_federation(num_clients=6)
  tiny_config.num_global_models = 2
  ids = np.array([0, 1, 3, 4, 5])
  results = []
  for parallelism, chunk in (("vmap", 2), ("vmap", 0)):  # 3 streamed chunks; one stacked.
    tiny_config.client_parallelism = parallelism
    tiny_config.client_chunk_size = chunk
    _, _, alg = _build(tiny_config, data, "fedem")
    state = alg.init(jax.random.key(0))
    results.append(jax.jit(alg.round)(state, ids, data.train.gather(ids), jax.random.key(7))[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *results)


# FedMerge's machinery (FedAvg, FedProx, IFCA, Ditto's global model) weights clients by
# base.sample_weights; FedEM by n_i / n_total.
@pytest.mark.parametrize(
  "algorithm,overrides",
  [("fedmerge", {"update_mode": "official"}), ("fedem", {})],
  ids=["fedmerge", "fedem"],
)
def test_phantom_clients_carry_no_weight(tiny_config, tiny_data, algorithm, overrides):
  """A round padded with phantom clients (ids past the last client, no examples), as a run on
  4 devices pads it, gives the plain round's result; on one device, in seconds."""
  tiny_config.client_parallelism = "vmap"  # Phantoms share a vmap with real clients.
  config, _, plain = _build(tiny_config, tiny_data, algorithm, **overrides)
  layout = parallel.client_layout(4, tiny_data.num_clients, 3, 0)
  _, padded = train.build(config, tiny_data, layout)
  sampled = np.array([4, 0, 2])
  ids = layout.pad_ids(sampled)
  assert layout.population > tiny_data.num_clients and len(ids) > len(sampled)
  logits = jax.random.normal(jax.random.key(5), (layout.population, config.num_global_models))
  states = []
  for alg, round_ids, rows in ((plain, sampled, tiny_data.num_clients), (padded, ids, None)):
    state = alg.init(jax.random.key(0))
    if hasattr(state, "logits"):  # Non-uniform merging weights, the same for both.
      state = state.replace(logits=logits[:rows])
    states.append(
      jax.jit(alg.round)(state, round_ids, tiny_data.train.gather(round_ids), jax.random.key(1))
    )
  (want, want_metrics), (got, got_metrics) = states
  cut = lambda leaf: (
    leaf[: tiny_data.num_clients] if leaf.shape[:1] == (layout.population,) else leaf
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(cut(b), a, rtol=1e-5, atol=1e-6), want, got)
  np.testing.assert_allclose(got_metrics["train/loss"], want_metrics["train/loss"], rtol=1e-6)
