"""Every baseline's round against a plain per-client reference written here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fedmerge_jax import client, train
from fedmerge_jax.algorithms import fedavg_ft, fedem, ifca
from fedmerge_jax.config import resolve
from fedmerge_jax.data import FederatedData
from tests.conftest import one_example_federation


def _build(config, data, algorithm):
  config.algorithm = algorithm
  config = resolve(config)
  model, alg = train.build(config, data)
  return config, model, alg


def _local(config, prox_mu=0.0, epochs=None):
  return client.LocalConfig(
    epochs or config.local_epochs, config.batch_size, config.client_lr, prox_mu
  )


def _one(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _client_data(data, cid, length=None):
  """Client `cid`'s training data, padded to `length` rows (default: its own count)."""
  return jax.tree.map(lambda a: jnp.asarray(a[0]), data.train.gather([cid], length))


def _trained(model, variables, data, key, local, anchor=None):
  delta, _ = client.local_train(model.apply, variables, data, key, local, anchor=anchor)
  return jax.tree.map(jnp.subtract, variables, delta)


IDS = np.array([0, 2, 3])
RNG = jax.random.key(11)


def _one_example_federation(sizes=(4, 8, 12, 4, 8)):
  """conftest.one_example_federation with sizes that are unequal multiples of the batch
  size (4), so clients take unequal numbers of steps."""
  return one_example_federation(sizes)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_match_their_papers(tiny_config, algorithm):
  """FedAvg (McMahan et al., Alg. 1): w <- sum_{k in S} n_k / m w_k; FedProx (Li et al.):
  clients minimise F_k(w) + mu/2 ||w - w^t||^2, config.prox_mu being mu/2."""
  data = _one_example_federation()
  tiny_config.prox_mu = 0.5
  config, model, alg = _build(tiny_config, data, algorithm)
  state = alg.init(jax.random.key(0))
  new, _ = jax.jit(alg.round)(state, IDS, data.train.gather(IDS), RNG)
  w_t = _one(state.globals, 0)["params"]
  mu = 2 * config.prox_mu if algorithm == "fedprox" else 0.0
  trained = []
  for c in IDS:
    n = int(data.train.counts[c])
    steps = n * config.local_epochs // config.batch_size
    x, y = (a[:1] for a in data.train.client(c))
    w = w_t
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y
    ).mean()
    for _ in range(steps):  # The proximal gradient mu (w - w^t), written out.
      w = jax.tree.map(
        lambda v, g, a: v - config.client_lr * (g + mu * (v - a)), w, jax.grad(loss)(w), w_t
      )
    trained.append(w)
  n = data.train.counts[IDS].astype(np.float64)
  expected = jax.tree.map(lambda *ws: sum(nk / n.sum() * wk for nk, wk in zip(n, ws)), *trained)
  _close(_one(new.globals, 0)["params"], expected, rtol=2e-4, atol=2e-6)
  # Nothing personal: every client predicts with the same model.
  models = alg.personalized(new, np.arange(5), data.train.gather(np.arange(5)))
  for i in range(1, 5):
    _close(_one(models, i), _one(models, 0), rtol=0, atol=0)


def test_fedprox_differs_from_fedavg_only_by_the_prox_term(tiny_config, tiny_data):
  tiny_config.prox_mu = 1.0
  _, _, avg = _build(tiny_config, tiny_data, "fedavg")
  _, _, prox = _build(tiny_config, tiny_data, "fedprox")
  state = avg.init(jax.random.key(0))
  a, _ = avg.round(state, IDS, tiny_data.train.gather(IDS), RNG)
  b, _ = prox.round(state, IDS, tiny_data.train.gather(IDS), RNG)
  drift = lambda s: sum(
    float(jnp.sum((x - y) ** 2))
    for x, y in zip(jax.tree.leaves(s.globals), jax.tree.leaves(state.globals))
  )
  assert drift(b) < drift(a)


def test_fedavg_ft_fine_tunes_the_global_model_per_client(tiny_config, tiny_data):
  tiny_config.finetune_epochs = 3
  config, model, alg = _build(tiny_config, tiny_data, "fedavg_ft")
  state = alg.init(jax.random.key(0))
  ids = np.arange(5)
  models = alg.personalized(state, ids, tiny_data.train.gather(ids))
  rng = jax.random.fold_in(jax.random.key(config.seed), fedavg_ft.FINETUNE_STREAM)
  for c in ids:
    expected = _trained(
      model,
      _one(state.globals, 0),
      _client_data(tiny_data, c),
      jax.random.fold_in(rng, c),
      _local(config, 0.0, epochs=3),
    )
    _close(_one(models, c), expected)


def test_local_trains_only_the_sampled_clients_own_models(tiny_config, tiny_data):
  config, model, alg = _build(tiny_config, tiny_data, "local")
  state = alg.init(jax.random.key(0))
  # Give every client a different model so that mixing them up would show.
  state = state.replace(
    personal=jax.tree.map(
      lambda x: x + jnp.arange(5.0).reshape((5,) + (1,) * (x.ndim - 1)), state.personal
    )
  )
  new, _ = jax.jit(alg.round)(state, IDS, tiny_data.train.gather(IDS), RNG)
  for c in range(5):
    if c in IDS:
      expected = _trained(
        model,
        _one(state.personal, c),
        _client_data(tiny_data, c),
        jax.random.fold_in(RNG, c),
        _local(config),
      )
      _close(_one(new.personal, c), expected)
    else:
      _close(_one(new.personal, c), _one(state.personal, c), rtol=0, atol=0)
  assert alg.communication == (0, 0)


def test_ditto_matches_its_paper(tiny_config):
  """Ditto (Li et al. 2021, Alg. 1): a sampled client takes its local steps
  v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t)) from its own v_k, w^t the global
  model of the round; the global model is FedAvg's; unsampled clients keep v_k."""
  data = _one_example_federation()
  tiny_config.ditto_lambda = 2.0
  config, model, alg = _build(tiny_config, data, "ditto")
  state = alg.init(jax.random.key(0))
  state = state.replace(personal=jax.tree.map(lambda x: x * 0.5, state.personal))
  new, _ = jax.jit(alg.round)(state, IDS, data.train.gather(IDS), RNG)
  w_t = _one(state.server.globals, 0)["params"]
  lam, eta = config.ditto_lambda, config.client_lr
  for c in range(5):
    if c not in IDS:
      _close(_one(new.personal, c), _one(state.personal, c), rtol=0, atol=0)
      continue
    x, y = (a[:1] for a in data.train.client(c))
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y
    ).mean()
    v = _one(state.personal, c)["params"]
    for _ in range(int(data.train.counts[c]) * config.local_epochs // config.batch_size):
      v = jax.tree.map(
        lambda vi, g, wi: vi - eta * (g + lam * (vi - wi)), v, jax.grad(loss)(v), w_t
      )
    _close(_one(new.personal, c)["params"], v, rtol=2e-4, atol=2e-6)
  # The global model: FedAvg's w <- sum_k n_k / m w_k of plain local SGD from w^t.
  n = data.train.counts[IDS].astype(np.float64)
  trained = []
  for c in IDS:
    x, y = (a[:1] for a in data.train.client(c))
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y
    ).mean()
    w = w_t
    for _ in range(int(data.train.counts[c]) * config.local_epochs // config.batch_size):
      w = jax.tree.map(lambda wi, g: wi - eta * g, w, jax.grad(loss)(w))
    trained.append(w)
  expected = jax.tree.map(lambda *ws: sum(nk / n.sum() * wk for nk, wk in zip(n, ws)), *trained)
  _close(_one(new.server.globals, 0)["params"], expected, rtol=2e-4, atol=2e-6)


def test_ifca_assigns_argmin_loss_model_and_averages_per_cluster(tiny_config, tiny_data):
  tiny_config.num_global_models = 3
  config, model, alg = _build(tiny_config, tiny_data, "ifca")
  state = alg.init(jax.random.key(4))
  ids = np.arange(5)
  new, _ = jax.jit(alg.round)(state, ids, tiny_data.train.gather(ids), RNG)
  losses = np.zeros((5, 3))
  for c in ids:
    d = _client_data(tiny_data, c)
    n = int(d.count)
    for k in range(3):
      logits = model.apply(_one(state.globals, k), d.x[:n])
      losses[c, k] = optax.softmax_cross_entropy_with_integer_labels(logits, d.y[:n]).mean()
  assignment = losses.argmin(1)
  assert len(set(assignment.tolist())) > 1, "test needs clients in several clusters"
  p = tiny_data.train.counts / tiny_data.train.counts.sum()
  for k in range(3):
    members = np.flatnonzero(assignment == k)
    if len(members) == 0:
      _close(_one(new.globals, k), _one(state.globals, k), rtol=0, atol=0)
      continue
    trained = [
      _trained(
        model,
        _one(state.globals, k),
        _client_data(tiny_data, c),
        jax.random.fold_in(RNG, c),
        _local(config),
      )
      for c in members
    ]
    w = p[members] / p[members].sum()
    expected = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *trained)
    _close(_one(new.globals, k), expected, rtol=1e-4, atol=1e-5)
  # Each client predicts with the cluster model that fits its training data best.
  models = alg.personalized(new, ids, tiny_data.train.gather(ids))
  train_losses = np.asarray(
    jax.jit(lambda s, d: ifca.training_losses(model, s.globals, d))(
      new, tiny_data.train.gather(ids)
    )
  )
  for c in ids:
    _close(_one(models, c), _one(new.globals, int(train_losses[c].argmin())), rtol=0, atol=0)
  assert alg.communication[0] == 3 * alg.communication[1]


def test_ifca_assigns_clusters_from_real_examples_only(tiny_config):
  """Cluster 1 predicts class 0 at any input: right on the padded rows (zeros, label 0), wrong
  on the client's real rows (labels 1, 2). Counting padding, cluster 1 would win."""
  rng = np.random.default_rng(0)
  split = lambda labels: (
    rng.normal(size=(len(labels), 4, 4, 1)).astype(np.float32),
    np.asarray(labels, np.int32),
  )
  data = FederatedData.from_arrays(
    {"small": split([1, 2, 1]), "other": split([0, 1, 2, 0])},
    {"small": split([1]), "other": split([0])},
    num_classes=3,
  )
  tiny_config.num_global_models = 2
  _, model, alg = _build(tiny_config, data, "ifca")
  state = alg.init(jax.random.key(0))
  one = jax.tree.map(lambda x: x[0], state.globals)
  biased = jax.tree.map(lambda x: x, one)
  biased["params"]["head"]["bias"] = one["params"]["head"]["bias"] + jnp.array([8.0, 0.0, 0.0])
  state = state.replace(globals=jax.tree.map(lambda a, b: jnp.stack([a, b]), one, biased))
  ids = np.array([0])
  padded = data.train.gather(ids, 32)  # 3 real rows, 29 padded ones.
  losses = np.asarray(
    jax.jit(lambda s, d: ifca.training_losses(model, s.globals, d))(state, padded)
  )
  x, y = data.train.client(0)
  expected = [
    float(
      optax.softmax_cross_entropy_with_integer_labels(
        model.apply(_one(state.globals, k), x), y
      ).mean()
    )
    for k in range(2)
  ]
  np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
  padded_rows_mean = [
    float(
      optax.softmax_cross_entropy_with_integer_labels(
        model.apply(_one(state.globals, k), padded.x[0]), padded.y[0]
      ).mean()
    )
    for k in range(2)
  ]
  assert np.argmin(expected) == 0 and np.argmin(padded_rows_mean) == 1, "the case needs both"
  np.testing.assert_array_equal(np.asarray(alg.merging_weights(state, ids, padded)), [[1, 0]])


def test_fedem_e_step_follows_the_likelihoods_of_real_examples_only(tiny_config, tiny_data):
  tiny_config.num_global_models = 3
  config, model, alg = _build(tiny_config, tiny_data, "fedem")
  state = alg.init(jax.random.key(1))
  d = _client_data(tiny_data, 0, length=11)  # 3 real examples, 8 padded rows.
  n = int(d.count)
  assert n < d.y.shape[0], "the test needs padded rows"
  prior = jnp.array([0.5, 0.3, 0.2])
  q, pi = fedem.e_step(model, state.components, prior, d)
  # Reference: q_k(x) = pi_k p_k(y|x) / sum_j pi_j p_j(y|x), pi_new = mean of q over real x.
  lik = np.stack(
    [
      np.asarray(jax.nn.softmax(model.apply(_one(state.components, k), d.x[:n])))[
        np.arange(n), np.asarray(d.y[:n])
      ]
      for k in range(3)
    ],
    1,
  )
  joint = lik * np.asarray(prior)
  expected_q = joint / joint.sum(1, keepdims=True)
  np.testing.assert_allclose(q[:n], expected_q, rtol=1e-4)
  np.testing.assert_allclose(pi, expected_q.mean(0), rtol=1e-4)


def _fedem_reference(model, config, data, components, mixture, ids, rng):
  """The reference implementation's round (omarfoq/FedEM `CentralizedAggregator.mix`):
  sampled clients train; every client's copy is averaged with n_i / n_total, unsampled
  copies being the old components: Theta - sum_{i in S} n_i / n_total Delta_i."""
  p = data.train.counts[ids] / data.train.counts.sum()
  stacked_apply = fedem.component_apply(model, config.num_global_models)
  deltas = []
  for c in ids:
    d = _client_data(data, c)
    q, _ = fedem.e_step(model, components, mixture[c], d)

    def loss(outputs, labels, idx, q=q):
      ce = jax.vmap(lambda o: optax.softmax_cross_entropy_with_integer_labels(o, labels))(outputs)
      return jnp.sum(q[idx].T * ce, axis=0)

    delta, _ = client.local_train(
      stacked_apply, components, d, jax.random.fold_in(rng, c), _local(config), example_loss=loss
    )
    deltas.append(delta)
  return jax.tree.map(lambda s, *ds: s - sum(w * x for w, x in zip(p, ds)), components, *deltas)


@pytest.mark.parametrize("ids", [IDS, np.arange(5)], ids=["sampled", "all"])
def test_fedem_round_as_the_reference_implementation(tiny_config, tiny_data, ids):
  tiny_config.num_global_models = 2
  config, model, alg = _build(tiny_config, tiny_data, "fedem")
  state = alg.init(jax.random.key(1))
  state = state.replace(
    mixture=jnp.asarray(np.random.default_rng(0).dirichlet([1, 1], 5), jnp.float32)
  )
  new, _ = jax.jit(alg.round)(state, ids, tiny_data.train.gather(ids), RNG)
  for c in range(5):
    if c in ids:
      _, pi = fedem.e_step(model, state.components, state.mixture[c], _client_data(tiny_data, c))
      _close(new.mixture[c], pi)
    else:
      np.testing.assert_array_equal(new.mixture[c], state.mixture[c])
  expected = _fedem_reference(model, config, tiny_data, state.components, state.mixture, ids, RNG)
  _close(new.components, expected, rtol=1e-4, atol=1e-5)


def test_fedem_predicts_the_mixture_of_its_components_probabilities(tiny_config, tiny_data):
  tiny_config.num_global_models = 3
  _, model, alg = _build(tiny_config, tiny_data, "fedem")
  state = alg.init(jax.random.key(1))
  mixture = np.random.default_rng(1).dirichlet([1, 1, 1], 5).astype(np.float32)
  state = state.replace(mixture=jnp.asarray(mixture))
  ids = np.array([1, 4])
  personal = alg.personalized(state, ids, tiny_data.train.gather(ids))
  for i, c in enumerate(ids):
    x = tiny_data.test.client(c)[0]
    probs = [
      np.asarray(jax.nn.softmax(model.apply(_one(state.components, k), x)), np.float64)
      for k in range(3)
    ]
    expected = sum(mixture[c, k] * probs[k] for k in range(3))
    got = np.asarray(jax.nn.softmax(alg.predict(_one(personal, i), x)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


class _DropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3, name="head")(x)


def test_fedem_components_draw_their_own_dropout_masks(tiny_config, tiny_data):
  """With K identical components, only their dropout masks can tell their updates apart."""
  tiny_config.num_global_models = 2
  tiny_config.algorithm = "fedem"
  config = resolve(tiny_config)
  model = _DropoutNet()
  x0 = jnp.zeros(tiny_data.example_shape)
  alg = fedem.make(model, config, 5, x0, total_train_examples=int(tiny_data.train.counts.sum()))
  state = alg.init(jax.random.key(0))
  same = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), state.components)
  state = state.replace(components=same)
  new, _ = jax.jit(alg.round)(state, IDS, tiny_data.train.gather(IDS), RNG)
  moved = [jax.tree.map(lambda a, b: a[k] - b[k], new.components, same) for k in range(2)]
  gap = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(moved[0]), jax.tree.leaves(moved[1]))
  )
  assert gap > 1e-3
  # And in eval mode (no dropout) identical components give identical outputs.
  out = fedem.component_apply(model, 2)(same, tiny_data.test.client(0)[0], train=False)
  np.testing.assert_array_equal(out[0], out[1])


def test_communication_per_client(tiny_config, tiny_data):
  sizes = {}
  for name in ("fedmerge", "fedavg", "ditto", "ifca", "fedem", "local"):
    tiny_config.num_global_models = 3
    sizes[name] = _build(tiny_config, tiny_data, name)[2].communication
  p = sizes["fedavg"][0]
  assert sizes["fedmerge"] == (p, p)  # One merged model down, one update up.
  assert sizes["ditto"] == (p, p)
  assert sizes["ifca"] == (3 * p, p)
  assert sizes["fedem"] == (3 * p, 3 * p)
  assert sizes["local"] == (0, 0)


@pytest.mark.parametrize("algorithm", ["fedprox", "fedavg_ft", "local", "ditto", "ifca", "fedem"])
def test_every_algorithm_runs_end_to_end(tiny_config, tiny_data, tmp_path, algorithm):
  tiny_config.algorithm = algorithm
  summary = train.train_and_evaluate(tiny_config, str(tmp_path), data=tiny_data)
  assert np.isfinite(summary["test/acc_mean"]) and np.isfinite(summary["train/loss"])
  assert "comm/params_per_round" in summary
