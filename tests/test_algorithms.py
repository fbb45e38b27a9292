"""Every baseline's round against a plain per-client reference written here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmerge_jax import client, train
from fedmerge_jax.algorithms import fedavg_ft, fedem
from fedmerge_jax.algorithms.ditto import PERSONAL_STREAM
from fedmerge_jax.config import resolve


def _build(config, data, algorithm):
  config.algorithm = algorithm
  config = resolve(config)
  model, alg = train.build(config, data)
  return config, model, alg


def _local(config, prox_mu=0.0, epochs=None):
  return client.LocalConfig(epochs or config.local_epochs, config.batch_size, config.client_lr,
                            prox_mu)


def _one(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _client_data(data, cid):
  return jax.tree.map(lambda a: jnp.asarray(a[0]), data.train.gather([cid]))


def _trained(model, variables, data, key, local, anchor=None):
  delta, _ = client.local_train(model.apply, variables, data, key, local, anchor=anchor)
  return jax.tree.map(jnp.subtract, variables, delta)


IDS = np.array([0, 2, 3])
RNG = jax.random.key(11)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_average_the_clients_models(tiny_config, tiny_data, algorithm):
  config, model, alg = _build(tiny_config, tiny_data, algorithm)
  state = alg.init(jax.random.key(0))
  new, _ = jax.jit(alg.round)(state, IDS, tiny_data.train.gather(IDS), RNG)
  received = _one(state.globals, 0)
  mu = config.prox_mu if algorithm == "fedprox" else 0.0
  trained = [_trained(model, received, _client_data(tiny_data, c),
                      jax.random.fold_in(RNG, c), _local(config, mu)) for c in IDS]
  p = tiny_data.train.counts[IDS] / tiny_data.train.counts[IDS].sum()
  expected = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(p, xs)), *trained)
  _close(_one(new.globals, 0), expected)
  # Nothing personal: every client predicts with the same model.
  models = alg.personalized(new, np.arange(5), tiny_data.train.gather(np.arange(5)))
  for i in range(1, 5):
    _close(_one(models, i), _one(models, 0), rtol=0, atol=0)


def test_fedprox_differs_from_fedavg_only_by_the_prox_term(tiny_config, tiny_data):
  tiny_config.prox_mu = 1.0
  _, _, avg = _build(tiny_config, tiny_data, "fedavg")
  _, _, prox = _build(tiny_config, tiny_data, "fedprox")
  state = avg.init(jax.random.key(0))
  a, _ = avg.round(state, IDS, tiny_data.train.gather(IDS), RNG)
  b, _ = prox.round(state, IDS, tiny_data.train.gather(IDS), RNG)
  drift = lambda s: sum(float(jnp.sum((x - y) ** 2)) for x, y in
                        zip(jax.tree.leaves(s.globals), jax.tree.leaves(state.globals)))
  assert drift(b) < drift(a)


def test_fedavg_ft_fine_tunes_the_global_model_per_client(tiny_config, tiny_data):
  tiny_config.finetune_epochs = 3
  config, model, alg = _build(tiny_config, tiny_data, "fedavg_ft")
  state = alg.init(jax.random.key(0))
  ids = np.arange(5)
  models = alg.personalized(state, ids, tiny_data.train.gather(ids))
  rng = jax.random.fold_in(jax.random.key(config.seed), fedavg_ft.FINETUNE_STREAM)
  for c in ids:
    expected = _trained(model, _one(state.globals, 0), _client_data(tiny_data, c),
                        jax.random.fold_in(rng, c), _local(config, 0.0, epochs=3))
    _close(_one(models, c), expected)


def test_local_trains_only_the_sampled_clients_own_models(tiny_config, tiny_data):
  config, model, alg = _build(tiny_config, tiny_data, "local")
  state = alg.init(jax.random.key(0))
  # Give every client a different model so that mixing them up would show.
  state = state.replace(personal=jax.tree.map(
      lambda x: x + jnp.arange(5.0).reshape((5,) + (1,) * (x.ndim - 1)), state.personal))
  new, _ = jax.jit(alg.round)(state, IDS, tiny_data.train.gather(IDS), RNG)
  for c in range(5):
    if c in IDS:
      expected = _trained(model, _one(state.personal, c), _client_data(tiny_data, c),
                          jax.random.fold_in(RNG, c), _local(config))
      _close(_one(new.personal, c), expected)
    else:
      _close(_one(new.personal, c), _one(state.personal, c), rtol=0, atol=0)
  assert alg.communication == (0, 0)


def test_ditto_personal_models_follow_their_objective(tiny_config, tiny_data):
  tiny_config.ditto_lambda = 2.0
  config, model, alg = _build(tiny_config, tiny_data, "ditto")
  _, _, avg = _build(tiny_config, tiny_data, "fedavg")
  state = alg.init(jax.random.key(0))
  state = state.replace(personal=jax.tree.map(lambda x: x * 0.5, state.personal))
  new, _ = jax.jit(alg.round)(state, IDS, tiny_data.train.gather(IDS), RNG)
  global_received = _one(state.server.globals, 0)
  personal_rng = jax.random.fold_in(RNG, PERSONAL_STREAM)
  for c in range(5):
    if c in IDS:  # argmin F_c(v) + lambda/2 ||v - w||^2 by SGD, from the old v_c.
      expected = _trained(model, _one(state.personal, c), _client_data(tiny_data, c),
                          jax.random.fold_in(personal_rng, c), _local(config, 1.0),
                          anchor=global_received["params"])
      _close(_one(new.personal, c), expected)
    else:
      _close(_one(new.personal, c), _one(state.personal, c), rtol=0, atol=0)
  # The global model is trained exactly as FedAvg trains it.
  fedavg_state, _ = avg.round(state.server, IDS, tiny_data.train.gather(IDS), RNG)
  _close(new.server.globals, fedavg_state.globals)


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
    trained = [_trained(model, _one(state.globals, k), _client_data(tiny_data, c),
                        jax.random.fold_in(RNG, c), _local(config)) for c in members]
    w = p[members] / p[members].sum()
    expected = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *trained)
    _close(_one(new.globals, k), expected, rtol=1e-4, atol=1e-5)
  # Each client predicts with the cluster model that fits its training data best.
  models = alg.personalized(new, ids, tiny_data.train.gather(ids))
  train_losses = np.asarray(jax.jit(lambda s, d: __import__(
      "fedmerge_jax.algorithms.ifca", fromlist=["x"]).training_losses(model, s.globals, d))(
          new, tiny_data.train.gather(ids)))
  for c in ids:
    _close(_one(models, c), _one(new.globals, int(train_losses[c].argmin())), rtol=0, atol=0)
  assert alg.communication[0] == 3 * alg.communication[1]


def test_fedem_e_step_weights_sum_to_one_and_follow_the_likelihoods(tiny_config, tiny_data):
  tiny_config.num_global_models = 3
  config, model, alg = _build(tiny_config, tiny_data, "fedem")
  state = alg.init(jax.random.key(1))
  d = _client_data(tiny_data, 4)
  prior = jnp.array([0.5, 0.3, 0.2])
  q, pi = fedem.e_step(model, state.components, prior, d)
  n = int(d.count)
  np.testing.assert_allclose(np.asarray(q[:n]).sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(float(pi.sum()), 1.0, rtol=1e-5)
  # Reference: q_k(x) = pi_k p_k(y|x) / sum_j pi_j p_j(y|x), pi_new = mean_x q(x).
  lik = np.stack([np.asarray(jax.nn.softmax(model.apply(_one(state.components, k), d.x[:n])))
                  [np.arange(n), np.asarray(d.y[:n])] for k in range(3)], 1)
  joint = lik * np.asarray(prior)
  expected_pi = (joint / joint.sum(1, keepdims=True)).mean(0)
  np.testing.assert_allclose(pi, expected_pi, rtol=1e-4)
  # A component that explains the data better gains weight.
  better = int(np.log(lik).mean(0).argmax())
  assert pi[better] / prior[better] == pytest.approx(float((pi / prior).max()))


def test_fedem_round_updates_sampled_mixtures_and_averages_components(tiny_config, tiny_data):
  tiny_config.num_global_models = 2
  config, model, alg = _build(tiny_config, tiny_data, "fedem")
  state = alg.init(jax.random.key(1))
  new, _ = jax.jit(alg.round)(state, IDS, tiny_data.train.gather(IDS), RNG)
  np.testing.assert_allclose(np.asarray(new.mixture).sum(1), 1.0, rtol=1e-5)
  for c in range(5):
    if c not in IDS:
      np.testing.assert_array_equal(new.mixture[c], state.mixture[c])
  # Reference for one component average: each client's weighted M-step from the same start.
  p = tiny_data.train.counts[IDS] / tiny_data.train.counts[IDS].sum()
  deltas = []
  for c in IDS:
    d = _client_data(tiny_data, c)
    q, _ = fedem.e_step(model, state.components, state.mixture[c], d)
    def loss(outputs, labels, idx, q=q):
      ce = jax.vmap(lambda o: optax.softmax_cross_entropy_with_integer_labels(o, labels))(outputs)
      return jnp.sum(q[idx].T * ce, axis=0)
    stacked_apply = lambda v, x, **kw: jax.vmap(lambda vi: model.apply(vi, x, **kw))(v)
    delta, _ = client.local_train(stacked_apply, state.components, d, jax.random.fold_in(RNG, c),
                                  _local(config), example_loss=loss)
    deltas.append(delta)
  expected = jax.tree.map(lambda s, *ds: s - sum(w * x for w, x in zip(p, ds)),
                          state.components, *deltas)
  _close(new.components, expected, rtol=1e-4, atol=1e-5)
  # Predictions are the mixture: probabilities sum to one.
  personal = alg.personalized(new, IDS, tiny_data.train.gather(IDS))
  probs = jax.nn.softmax(alg.predict(_one(personal, 0), tiny_data.test.client(0)[0]))
  np.testing.assert_allclose(np.asarray(probs).sum(1), 1.0, rtol=1e-5)


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
