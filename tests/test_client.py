"""Local training against a plain loop over one client's own batches: 'epoch' and 'stream'
batching, partial last batches, padding, BatchNorm statistics over real rows only, prox."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmerge_jax import client, models
from fedmerge_jax.models.layers import BatchNorm
from fedmerge_jax.models.mlp import MLP
from conftest import TinyBN

LOCAL = client.LocalConfig(local_epochs=2, batch_size=4, client_lr=0.1, prox_mu=0.05)


def _setup(n=7, max_n=9, seed=0, model=None):
  model = model or MLP(num_classes=3, hidden_sizes=(5,))
  rng = np.random.default_rng(seed)
  x = np.zeros((max_n, 6), np.float32)
  y = np.zeros((max_n,), np.int32)
  x[:n] = rng.normal(size=(n, 6))
  y[:n] = rng.integers(0, 3, n)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 6)))
  return model, variables, client.ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(n))


def _reference_batches(order, n, local):
  """The documented batches of one client, written out with Python lists (no padding)."""
  epochs = [list(np.asarray(order[e, :n])) for e in range(local.local_epochs)]
  b = local.batch_size
  if local.batching == "epoch":  # PyTorch's DataLoader: per epoch, the last batch is partial.
    return [perm[i : i + b] for perm in epochs for i in range(0, n, b)]
  stream = sum(epochs, [])  # FedJAX: the epochs concatenated, then batched.
  return [stream[i : i + b] for i in range(0, len(stream), b)]


def _reference_train(model, variables, data, key, local):
  """A plain Python loop of SGD steps on the real examples only (BatchNorm sees no padding)."""
  n = int(data.count)
  order = client.epoch_orders(jax.random.fold_in(key, 0), n, n, local.local_epochs)
  batches = _reference_batches(order, n, local)
  params0 = variables["params"]
  params, stats = params0, variables.get("batch_stats")
  x, y = np.asarray(data.x)[:n], np.asarray(data.y)[:n]
  for idx in batches:

    def loss(p):
      v = {"params": p} if stats is None else {"params": p, "batch_stats": stats}
      out = model.apply(
        v, x[idx], train=True, mutable=["batch_stats"] if stats is not None else False
      )
      logits, new = out if stats is not None else (out, None)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
      prox = sum(
        jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params0))
      )
      return ce + local.prox_mu * prox, new

    grads, new = jax.grad(loss, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - local.client_lr * g, params, grads)
    stats = None if new is None else new["batch_stats"]
  trained = {"params": params} if stats is None else {"params": params, "batch_stats": stats}
  return [len(i) for i in batches], jax.tree.map(lambda a, b: a - b, dict(variables), trained)


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize(
  "batching,n,sizes",
  [
    ("epoch", 7, [4, 3, 4, 3]),  # Each epoch ends with its own partial batch.
    ("stream", 7, [4, 4, 4, 2]),  # Batches cross the epoch boundary; one partial at the end.
    ("epoch", 5, [4, 1, 4, 1]),
    ("stream", 5, [4, 4, 2]),
  ],
)
@pytest.mark.parametrize("model", [None, TinyBN()], ids=["mlp", "batchnorm"])
def test_local_train_equals_a_loop_over_the_clients_own_batches(batching, n, sizes, model):
  local = LOCAL._replace(batching=batching)
  model, variables, data = _setup(n=n, max_n=12, model=model)
  key = jax.random.key(3)
  delta, _ = jax.jit(
    lambda v, d: client.local_train(
      model.apply, v, d, key, local, takes_mask=models.takes_mask(model)
    )
  )(variables, data)
  batch_sizes, expected = _reference_train(model, variables, data, key, local)
  assert batch_sizes == sizes
  assert int(client.num_local_steps(data.count, local)) == len(sizes)
  _close(delta, expected)  # BatchNorm: running statistics too, as if never padded.


def test_padding_does_not_change_the_update():
  model, variables, data = _setup(n=5, max_n=5, model=TinyBN())
  key = jax.random.key(1)
  delta, metrics = client.local_train(model.apply, variables, data, key, LOCAL, takes_mask=True)
  # Same five real examples, 11 padding rows full of garbage.
  pad_x = jnp.concatenate([data.x, 100.0 * jnp.ones((11, 6))])
  pad_y = jnp.concatenate([data.y, 2 * jnp.ones((11,), jnp.int32)])
  padded = client.ClientData(pad_x, pad_y, data.count)
  delta_padded, metrics_padded = client.local_train(
    model.apply, variables, padded, key, LOCAL, takes_mask=True
  )
  # The example order only depends on the real slots: it is unchanged by padding.
  np.testing.assert_array_equal(
    client.epoch_orders(key, 5, 5, 2), client.epoch_orders(key, 5, 16, 2)[:, :5]
  )
  _close(delta, delta_padded)
  np.testing.assert_allclose(metrics["train_loss"], metrics_padded["train_loss"], rtol=1e-5)


def test_steps_past_a_clients_count_do_not_run_under_vmap():
  """Two clients in one vmap: the smaller one's result equals its training alone."""
  model, variables, small = _setup(n=3, max_n=16, model=TinyBN())
  _, _, large = _setup(n=16, max_n=16, seed=1, model=TinyBN())
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), small, large)
  keys = jax.random.split(jax.random.key(0), 2)
  together, _ = jax.vmap(
    lambda d, k: client.local_train(model.apply, variables, d, k, LOCAL, takes_mask=True)
  )(both, keys)
  alone, _ = client.local_train(model.apply, variables, small, keys[0], LOCAL, takes_mask=True)
  _close(jax.tree.map(lambda a: a[0], together), alone)


def test_client_without_examples_returns_zero_delta():
  model, variables, data = _setup(n=0, max_n=6, model=TinyBN())
  delta, _ = client.local_train(
    model.apply, variables, data, jax.random.key(0), LOCAL, takes_mask=True
  )
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
  norm = lambda t: sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(t))
  assert norm(held) < norm(free)


def test_batchnorm_matches_pytorchs_formulas_on_real_rows():
  """Normalise with the biased variance of the real rows; feed the unbiased one to the
  running average (torch.nn.BatchNorm2d, momentum 0.1), written out in NumPy."""
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(6, 3, 3, 4)).astype(np.float32)
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  layer = BatchNorm(use_running_average=False, unbiased_running_var=True)
  variables = layer.init(jax.random.key(0), x, mask)
  out, new = layer.apply(variables, x, mask, mutable=["batch_stats"])
  real = x[:4].reshape(-1, 4)
  mean, var = real.mean(0), real.var(0)
  np.testing.assert_allclose(out[:4], (x[:4] - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * real.var(0, ddof=1), rtol=1e-5)


def test_models_say_whether_they_take_a_mask():
  assert models.takes_mask(TinyBN()) and models.takes_mask(models.ResNet9(num_classes=3))
  assert not models.takes_mask(MLP(num_classes=3, hidden_sizes=(5,)))


def test_batch_stats_without_a_mask_are_refused_in_one_line():
  """Told nothing, a BatchNorm model (or any wrapper of its apply) would put padded rows into
  its statistics: local training refuses it, naming the fix."""
  model, variables, data = _setup(n=5, max_n=8, model=TinyBN())
  wrapped = lambda v, x, **kwargs: model.apply(v, x, **kwargs)  # The capability is not in here.
  with pytest.raises(ValueError, match=r"'batch_stats'.*takes_mask=True") as error:
    client.local_train(wrapped, variables, data, jax.random.key(0), LOCAL)
  assert "\n" not in str(error.value)
  # Told, the same wrapper trains as the module itself does.
  told, _ = client.local_train(wrapped, variables, data, jax.random.key(0), LOCAL, takes_mask=True)
  direct, _ = client.local_train(
    model.apply, variables, data, jax.random.key(0), LOCAL, takes_mask=True
  )
  _close(told, direct, rtol=0, atol=0)
