"""One vectorised round against a plain per-client loop and the closed-form server rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import client, models, train
from fedmerge_jax.config import resolve

from test_logit_step import update_w_loop


def _build(config, data):
  config = resolve(config)
  return (config, *train.build(config, data))


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference_round(config, model, state, ids, data, rng):
  """Per-client Python loop + the server rules written out in NumPy."""
  local = client.LocalConfig(
    config.local_epochs, config.batch_size, config.client_lr, config.prox_mu
  )
  globals_ = jax.tree.map(np.asarray, state.globals)
  logits = np.array(state.logits)
  w = _softmax(logits[ids])
  leaves, treedef = jax.tree.flatten(globals_)
  head = np.concatenate(
    [np.full(x[0].size, m) for x, m in zip(leaves, jax.tree.leaves(models.head_mask(globals_)))]
  )
  theta_k = np.stack([_flat(jax.tree.map(lambda x: x[k], globals_)) for k in range(w.shape[1])])
  deltas = []
  for row, cid in enumerate(ids):
    received = jax.tree.map(lambda x: np.tensordot(w[row], x, 1), globals_)
    batch = jax.tree.map(lambda a: jnp.asarray(a[0]), data.train.gather([cid]))
    delta, _ = client.local_train(model.apply, received, batch, jax.random.fold_in(rng, cid), local)
    deltas.append(_flat(delta))
  deltas = np.stack(deltas)
  counts = data.train.counts[ids].astype(np.float64)
  p = counts / counts.sum()
  theta_i = w @ theta_k
  if config.update_mode == "official":
    g = p[:, None] * w * ((deltas * head) @ theta_k.T - np.sum(deltas * head * theta_i, 1)[:, None])
    if config.logit_step == "authors":  # Their update_W, looped as written.
      logits[ids] = update_w_loop(logits[ids], g / p[:, None], p, config.server_lr_logits)[0]
    else:
      logits[ids] -= config.server_lr_logits * g / np.abs(g).max()
    w_new = _softmax(logits[ids])
    w_hat = p[:, None] * w_new / (p[:, None] * w_new).sum(0)
    theta_k = theta_k - config.server_lr_globals * w_hat.T @ deltas
  else:
    g = p[:, None] * w * (deltas @ theta_k.T - np.sum(deltas * theta_i, 1)[:, None])
    theta_k = theta_k - config.server_lr_globals * (p[:, None] * w).T @ deltas
    logits[ids] -= config.server_lr_logits * g
  return theta_k, logits


@pytest.mark.parametrize(
  "update_mode,chunk,logit_step",
  [
    ("official", 0, "authors"),
    ("official", 2, "authors"),
    ("official", 0, "max_normalized"),
    ("gradient", 0, "authors"),
  ],
)
def test_vectorised_round_equals_per_client_loop(
  tiny_config, tiny_data, update_mode, chunk, logit_step
):
  tiny_config.update_mode = update_mode
  tiny_config.logit_step = logit_step
  tiny_config.client_chunk_size = chunk
  tiny_config.server_lr_globals = 1.0 if update_mode == "official" else 0.7
  config, model, alg = _build(tiny_config, tiny_data)
  state = alg.init(jax.random.key(0))
  # Make the logits non-uniform so that every term of the rules matters.
  state = state.replace(logits=jax.random.normal(jax.random.key(5), state.logits.shape))
  ids = np.array([0, 2, 3, 4])
  rng = jax.random.key(7)
  theta_ref, logits_ref = _reference_round(config, model, state, ids, tiny_data, rng)
  new_state, metrics = jax.jit(alg.round)(state, ids, tiny_data.train.gather(ids), rng)
  theta = np.stack(
    [
      _flat(jax.tree.map(lambda x: x[k], new_state.globals))
      for k in range(config.num_global_models)
    ]
  )
  np.testing.assert_allclose(new_state.logits, logits_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(theta, theta_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(new_state.logits[1], state.logits[1])  # Not sampled.
  assert np.isfinite(float(metrics["train/loss"]))


def test_official_with_one_global_model_is_fedavg(tiny_config, tiny_data):
  tiny_config.num_global_models = 1
  tiny_config.prox_mu = 0.0  # FedAvg trains without a proximal term.
  _, _, fedmerge = _build(tiny_config, tiny_data)
  tiny_config.algorithm = "fedavg"
  _, _, fedavg = _build(tiny_config, tiny_data)
  s1, s2 = fedmerge.init(jax.random.key(0)), fedavg.init(jax.random.key(0))
  ids = np.arange(tiny_data.num_clients)
  batch = tiny_data.train.gather(ids)
  for r in range(3):
    s1, _ = jax.jit(fedmerge.round)(s1, ids, batch, jax.random.key(r))
    s2, _ = jax.jit(fedavg.round)(s2, ids, batch, jax.random.key(r))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.globals, s2.globals
  )
  # And FedAvg is the example-weighted mean of the clients' trained models.
  s0 = fedavg.init(jax.random.key(0))
  s1, _ = jax.jit(fedavg.round)(s0, ids, batch, jax.random.key(0))
  local = client.LocalConfig(
    tiny_config.local_epochs, tiny_config.batch_size, tiny_config.client_lr, tiny_config.prox_mu
  )
  model = models.get_model(resolve(tiny_config).model, tiny_data.num_classes)
  received = jax.tree.map(lambda x: x[0], s0.globals)
  trained = []
  for cid in ids:
    d, _ = client.local_train(
      model.apply,
      received,
      jax.tree.map(lambda a: a[cid], batch),
      jax.random.fold_in(jax.random.key(0), cid),
      local,
    )
    trained.append(_flat(received) - _flat(d))
  p = tiny_data.train.counts / tiny_data.train.counts.sum()
  np.testing.assert_allclose(_flat(s1.globals), p @ np.stack(trained), rtol=1e-5, atol=1e-6)
