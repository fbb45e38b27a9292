"""Local training: its own number of steps, masking, padding invariance, prox, shuffling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmerge_jax import client
from fedmerge_jax.models.mlp import MLP

LOCAL = client.LocalConfig(local_epochs=2, batch_size=4, client_lr=0.1, prox_mu=0.05)


def _setup(n=7, max_n=9, seed=0):
  model = MLP(num_classes=3, hidden_sizes=(5,))
  rng = np.random.default_rng(seed)
  x = np.zeros((max_n, 6), np.float32)
  y = np.zeros((max_n,), np.int32)
  x[:n] = rng.normal(size=(n, 6))
  y[:n] = rng.integers(0, 3, n)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 6)))
  return model, variables, client.ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(n))


def _reference_sgd(model, variables, data, key, local):
  """A plain Python loop of SGD steps over the same example order."""
  n = int(data.count)
  order = np.asarray(client.epoch_orders(jax.random.fold_in(key, 0), n, data.x.shape[0],
                                         local.local_epochs))
  stream = np.concatenate([order[e, :n] for e in range(local.local_epochs)])
  params0 = variables["params"]
  params = params0
  steps = -(-n * local.local_epochs // local.batch_size)
  for t in range(steps):
    idx = stream[t * local.batch_size:(t + 1) * local.batch_size]
    def loss(p):
      logits = model.apply({"params": p}, data.x[idx])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, data.y[idx]).mean()
      prox = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params0)))
      return ce + local.prox_mu * prox
    params = jax.tree.map(lambda p, g: p - local.client_lr * g, params, jax.grad(loss)(params))
  return steps, jax.tree.map(lambda a, b: a - b, params0, params)


def test_local_train_matches_plain_sgd_loop_with_ceil_steps():
  model, variables, data = _setup(n=7, max_n=9)
  key = jax.random.key(3)
  delta, _ = client.local_train(model.apply, variables, data, key, LOCAL)
  steps, expected = _reference_sgd(model, variables, data, key, LOCAL)
  assert steps == 4  # ceil(7 * 2 / 4): the last batch holds 2 examples.
  assert int(client.num_local_steps(data.count, LOCAL)) == steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               delta["params"], expected)


def test_padding_does_not_change_the_update():
  model, variables, data = _setup(n=5, max_n=5)
  key = jax.random.key(1)
  delta, metrics = client.local_train(model.apply, variables, data, key, LOCAL)
  # Same five real examples, 11 padding rows full of garbage.
  pad_x = jnp.concatenate([data.x, 100.0 * jnp.ones((11, 6))])
  pad_y = jnp.concatenate([data.y, 2 * jnp.ones((11,), jnp.int32)])
  padded = client.ClientData(pad_x, pad_y, data.count)
  delta_padded, metrics_padded = client.local_train(model.apply, variables, padded, key, LOCAL)
  # The example order only depends on the real slots: it is unchanged by padding.
  np.testing.assert_array_equal(
      client.epoch_orders(key, 5, 5, 2), client.epoch_orders(key, 5, 16, 2)[:, :5])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               delta, delta_padded)
  np.testing.assert_allclose(metrics["train_loss"], metrics_padded["train_loss"], rtol=1e-5)


def test_client_without_examples_returns_zero_delta():
  model, variables, data = _setup(n=0, max_n=6)
  delta, _ = client.local_train(model.apply, variables, data, jax.random.key(0), LOCAL)
  assert all(float(jnp.abs(d).max()) == 0.0 for d in jax.tree.leaves(delta))


def test_shuffling_comes_from_the_key():
  a = client.epoch_orders(jax.random.key(0), 10, 12, 3)
  b = client.epoch_orders(jax.random.key(0), 10, 12, 3)
  c = client.epoch_orders(jax.random.key(1), 10, 12, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for row in np.asarray(a):  # Each epoch is a permutation of the real examples, padding last.
    assert sorted(row[:10]) == list(range(10))
  assert not np.array_equal(a[0], a[1])  # A fresh order every epoch.


def test_prox_term_pulls_towards_received_model():
  model, variables, data = _setup(n=8, max_n=8)
  key = jax.random.key(2)
  free, _ = client.local_train(model.apply, variables, data, key, LOCAL._replace(prox_mu=0.0))
  held, _ = client.local_train(model.apply, variables, data, key, LOCAL._replace(prox_mu=5.0))
  norm = lambda t: sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(t))
  assert norm(held) < norm(free)
