"""What one client does in a round: E epochs of SGD on its own padded, masked data.

Written for a single client; `parallel.map_clients` runs it for many clients at once.
A client holding n of the `max_n` padded examples takes its own ceil(n*E/B) steps; the
scan runs the largest client's count and the extra steps leave parameters untouched.
Padded examples are masked out of every loss.
"""

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax


class LocalConfig(NamedTuple):
  """Static hyper-parameters of local training."""
  local_epochs: int
  batch_size: int
  client_lr: float
  prox_mu: float


class ClientData(NamedTuple):
  """One client's (or, with a leading axis, several clients') padded examples."""
  x: jax.Array  # [max_n, ...]
  y: jax.Array  # [max_n]
  count: jax.Array  # [] number of real examples


def num_local_steps(count, local: LocalConfig):
  """ceil(n * E / B): batches run across epoch boundaries, the last may be partial."""
  return (count * local.local_epochs + local.batch_size - 1) // local.batch_size


def masked_cross_entropy(logits, labels, mask):
  """(sum of masked CE, number of real examples)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(ce * mask), jnp.sum(mask)


def squared_distance(a, b):
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def epoch_orders(key, count, max_n, num_epochs):
  """[E, max_n] example indices: each row a fresh permutation of the first `count` slots."""
  def one(k):
    scores = jnp.where(jnp.arange(max_n) < count, jax.random.uniform(k, (max_n,)), 2.0)
    return jnp.argsort(scores)
  return jax.vmap(one)(jax.random.split(key, num_epochs))


def cross_entropy_loss(outputs, labels, idx):
  """The default per-example loss: softmax cross-entropy of the model's logits."""
  del idx
  return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)


def local_train(apply_fn: Callable[..., Any], variables, data: ClientData, key, local: LocalConfig,
                anchor=None, example_loss: Callable[..., Any] = cross_entropy_loss):
  """Trains one client's copy of `variables`; returns (delta = received - trained, metrics).

  `variables` is a flax variable dict: 'params' are trained by SGD on the batch mean of
  `example_loss(outputs, labels, example_indices)` + prox_mu * ||params - anchor||^2, the
  anchor being the received params unless given (Ditto anchors to the global model);
  other collections (BatchNorm's 'batch_stats') follow the model's own updates in train
  mode. Delta covers both.
  """
  data = ClientData(*map(jnp.asarray, data))
  max_n = data.x.shape[0]
  max_steps = -(-max_n * local.local_epochs // local.batch_size)
  count = data.count
  total = count * local.local_epochs
  order = epoch_orders(jax.random.fold_in(key, 0), count, max_n, local.local_epochs)
  dropout_key = jax.random.fold_in(key, 1)
  received = variables
  params0 = variables["params"]
  anchor = params0 if anchor is None else anchor
  tx = optax.sgd(local.client_lr)
  mutable = [name for name in variables if name != "params"]

  def loss_fn(params, other, idx, mask, rng):
    out = apply_fn({"params": params, **other}, data.x[idx], train=True,
                   rngs={"dropout": rng}, mutable=mutable or False)
    outputs, new_other = out if mutable else (out, {})
    losses = example_loss(outputs, data.y[idx], idx)
    loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss + local.prox_mu * squared_distance(params, anchor), (loss, new_other)

  def step(carry, t):
    params, other, opt_state = carry
    position = t * local.batch_size + jnp.arange(local.batch_size)
    mask = position < total
    position = jnp.where(mask, position, 0)
    per_epoch = jnp.maximum(count, 1)
    idx = order[jnp.minimum(position // per_epoch, local.local_epochs - 1), position % per_epoch]
    grads, (loss, new_other) = jax.grad(loss_fn, has_aux=True)(
        params, other, idx, mask.astype(jnp.float32), jax.random.fold_in(dropout_key, t))
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    active = t * local.batch_size < total
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
    carry = (keep(new_params, params), keep(dict(new_other), other), keep(new_opt_state, opt_state))
    return carry, (loss * active, active)

  other0 = {k: v for k, v in variables.items() if k != "params"}
  init = (params0, other0, tx.init(params0))
  (params, other, _), (losses, active) = jax.lax.scan(step, init, jnp.arange(max_steps))
  trained = {"params": params, **other}
  delta = jax.tree.map(lambda r, t: r - t, flax.core.unfreeze(received), trained)
  metrics = {"train_loss": jnp.sum(losses) / jnp.maximum(jnp.sum(active), 1)}
  return delta, metrics
