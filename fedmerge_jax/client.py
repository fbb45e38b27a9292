"""What one client does in a round: E epochs of SGD on its own padded, masked data.

Written for a single client; `parallel.map_clients` runs it for many clients at once.
A client holding n real examples runs exactly its own steps (`num_local_steps`). Two loops
(`LocalConfig.loop`): 'while', a `lax.while_loop` that stops at the client's count (one
client at a time does no padded step at all; under `vmap` a chunk loops to its own largest
count), and 'static', a `lax.fori_loop` of the padded length's step count, known from the
shapes (so no host round-trip per step on GPUs, and no compile beyond the round's bucket).
In both, a member past its own count leaves its carry untouched. Padded rows are masked out
of the loss and, for a model that local training is told takes a `mask` (`takes_mask=True`),
out of BatchNorm's batch statistics; a model with BatchNorm statistics that takes no mask is
refused (`check_takes_mask`).

`LocalConfig.compute_dtype` 'bfloat16' runs the forward and backward pass in bf16 (params
and inputs cast inside the loss); parameters, optimizer state, loss and deltas stay f32.

Two batchings (`LocalConfig.batching`):
- 'epoch': every epoch a fresh permutation of the n examples in ceil(n/B) batches, the last
  holding n mod B (PyTorch's DataLoader with shuffle=True, drop_last=False; the authors').
- 'stream': the E permutations concatenated, then cut into ceil(nE/B) batches, so batches
  run across epoch boundaries (FedJAX's shuffle-repeat-batch).
"""

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from fedmerge_jax import choices

BATCHINGS = choices.LOCAL_BATCHINGS
LOCAL_LOOPS = ("while", "static")
COMPUTE_DTYPES = choices.COMPUTE_DTYPES


class LocalConfig(NamedTuple):
  """Static hyper-parameters of local training."""

  local_epochs: int
  batch_size: int
  client_lr: float
  prox_mu: float
  batching: str = "epoch"  # 'epoch' | 'stream' (module docstring).
  loop: str = "while"  # 'while' | 'static' (module docstring).
  unroll: int = 1  # Steps per iteration of the 'static' loop (`lax.fori_loop`'s unroll).
  compute_dtype: str = "float32"  # 'float32' | 'bfloat16' (module docstring).


class ClientData(NamedTuple):
  """One client's (or, with a leading axis, several clients') padded examples."""

  x: jax.Array  # [max_n, ...]
  y: jax.Array  # [max_n]
  count: jax.Array  # [] number of real examples


def num_local_steps(count, local: LocalConfig):
  """A client's own number of SGD steps for `count` examples."""
  batches = lambda n: (n + local.batch_size - 1) // local.batch_size
  if local.batching == "epoch":
    return local.local_epochs * batches(count)
  if local.batching == "stream":
    return batches(count * local.local_epochs)
  raise ValueError(f"local_batching={local.batching!r}; expected one of {BATCHINGS}.")


def batch_slots(t, count, local: LocalConfig):
  """Step t's rows: (epoch [B], slot within that epoch's order [B], real-row mask [B])."""
  batch = local.batch_size
  n = jnp.maximum(count, 1)
  if local.batching == "epoch":
    per_epoch = (n + batch - 1) // batch
    epoch = jnp.full((batch,), t // per_epoch)
    slot = (t % per_epoch) * batch + jnp.arange(batch)
    mask = slot < count
  else:
    position = t * batch + jnp.arange(batch)
    mask = position < count * local.local_epochs
    epoch, slot = position // n, position % n
  epoch = jnp.minimum(epoch, local.local_epochs - 1)
  return epoch, jnp.where(mask, slot, 0), mask


def masked_cross_entropy(logits, labels, mask):
  """(sum of masked CE, number of real examples)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(ce * mask), jnp.sum(mask)


def squared_distance(a, b):
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def epoch_orders(key, count, max_n, num_epochs):
  """[E, max_n] example indices: each row a fresh permutation of the first `count` slots.

  The permutation of the real slots does not depend on `max_n` (how far a round pads).
  """

  def one(k):
    scores = jnp.where(jnp.arange(max_n) < count, jax.random.uniform(k, (max_n,)), 2.0)
    return jnp.argsort(scores)

  return jax.vmap(one)(jax.random.split(key, num_epochs))


def to_compute_dtype(tree, compute_dtype: str):
  """`tree`'s floating leaves in `compute_dtype` ('float32': `tree` itself, untouched)."""
  if compute_dtype == "float32":
    return tree
  dtype = jnp.dtype(compute_dtype)
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def cross_entropy_loss(outputs, labels, idx):
  """The default per-example loss: softmax cross-entropy of the model's logits."""
  del idx
  return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)


def check_takes_mask(variables, takes_mask: bool) -> None:
  """Refuses BatchNorm statistics ('batch_stats') without a mask: padded rows would enter them."""
  if "batch_stats" in variables and not takes_mask:
    raise ValueError(
      "local_train: the model keeps BatchNorm statistics ('batch_stats') but takes no mask, "
      "so the padded rows of partial batches would enter them; give its __call__ a "
      "`mask=None` argument passed on to every BatchNorm (models.layers.BatchNorm(...)(x, mask)"
      " or nn.BatchNorm(...)(x, mask=...)) and pass local_train(..., takes_mask=True)."
    )


def batch_loss(
  apply_fn,
  params,
  other,
  data: ClientData,
  idx,
  mask,
  rng,
  example_loss: Callable[..., Any] = cross_entropy_loss,
  takes_mask: bool = False,
  compute_dtype: str = "float32",
):
  """(mean over the batch's real rows of `example_loss`, the model's new non-param collections).

  The batch is rows `idx` of `data`, `mask` marking the real ones; the model runs in train
  mode with dropout key `rng` and, where it takes `mask` (`takes_mask`), BatchNorm
  statistics of real rows. `compute_dtype`: params and inputs are cast to it for the
  forward and backward pass; the outputs come back as float32 for the loss.
  """
  mutable = list(other)
  kwargs = {"mask": mask} if takes_mask else {}
  compute = lambda tree: to_compute_dtype(tree, compute_dtype)
  out = apply_fn(
    {"params": compute(params), **other},
    compute(data.x[idx]),
    train=True,
    rngs={"dropout": rng},
    mutable=mutable or False,
    **kwargs,
  )
  outputs, new_other = out if mutable else (out, {})
  losses = example_loss(outputs.astype(jnp.float32), data.y[idx], idx)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0), new_other


def plain_objective(batch_loss, params, other, idx, mask, rng):
  """The default step objective: the batch loss itself, (mean loss, new other collections)."""
  return batch_loss(params, other, idx, mask, rng)


def local_train(
  apply_fn: Callable[..., Any],
  variables,
  data: ClientData,
  key,
  local: LocalConfig,
  anchor=None,
  example_loss: Callable[..., Any] = cross_entropy_loss,
  takes_mask: bool = False,
  trainable=None,
  optimizer=None,
  objective: Callable[..., Any] = plain_objective,
):
  """Trains one client's copy of `variables`; returns (delta = received - trained, metrics).

  `variables` is a flax variable dict: 'params' are trained by SGD on the mean over the
  batch's real rows of `example_loss(outputs, labels, example_indices)` + prox_mu *
  ||params - anchor||^2, the anchor being the received params unless given (Ditto anchors
  to the global model); other collections (BatchNorm's 'batch_stats') follow the model's
  own updates in train mode. Delta covers both. `takes_mask`: whether `apply_fn` accepts
  `mask=` (the batch's real rows [B], for BatchNorm's statistics), as `models.takes_mask`
  says of a module; required for variables with 'batch_stats'.
  `trainable` (bools over 'params'): the others get no gradient and stay as received
  (FedRep's phases). `optimizer`: an optax transformation instead of SGD at `client_lr`.
  `objective(batch_loss, params, other, idx, mask, rng) -> (loss, new other)` builds a
  step's loss from `batch_loss` (same arguments, the masked mean above): Per-FedAvg's
  inner-then-outer step.
  """
  check_takes_mask(variables, takes_mask)
  data = ClientData(*map(jnp.asarray, data))
  max_n = data.x.shape[0]
  count = data.count
  steps = num_local_steps(count, local)
  order = epoch_orders(jax.random.fold_in(key, 0), count, max_n, local.local_epochs)
  dropout_key = jax.random.fold_in(key, 1)
  received = variables
  params0 = variables["params"]
  anchor = params0 if anchor is None else anchor
  tx = optax.sgd(local.client_lr) if optimizer is None else optimizer

  def step_loss(params, other, idx, mask, rng):
    return batch_loss(
      apply_fn, params, other, data, idx, mask, rng, example_loss, takes_mask, local.compute_dtype
    )

  def loss_fn(params, other, idx, mask, rng):
    loss, new_other = objective(step_loss, params, other, idx, mask, rng)
    return loss + local.prox_mu * squared_distance(params, anchor), (loss, new_other)

  def step(carry):
    t, params, other, opt_state, loss_sum = carry
    epoch, slot, mask = batch_slots(t, count, local)
    grads, (loss, new_other) = jax.grad(loss_fn, has_aux=True)(
      params, other, order[epoch, slot], mask, jax.random.fold_in(dropout_key, t)
    )
    if trainable is not None:  # Frozen parameters: no gradient (their backward pass is dead code).
      grads = jax.tree.map(lambda g, train: g if train else jnp.zeros_like(g), grads, trainable)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (
      t + 1,
      optax.apply_updates(params, updates),
      dict(new_other),
      opt_state,
      loss_sum + loss,
    )

  other0 = {k: v for k, v in variables.items() if k != "params"}
  init = (jnp.zeros((), jnp.int32), params0, other0, tx.init(params0), jnp.zeros((), jnp.float32))
  if local.loop == "while":
    final = jax.lax.while_loop(lambda c: c[0] < steps, step, init)
  elif local.loop == "static":

    def masked_step(t, carry):  # Past its own count a client's carry stays as it is.
      return jax.tree.map(lambda new, old: jnp.where(t < steps, new, old), step(carry), carry)

    final = jax.lax.fori_loop(
      0, num_local_steps(max_n, local), masked_step, init, unroll=local.unroll
    )
  else:
    raise ValueError(f"local_loop={local.loop!r}; expected one of {LOCAL_LOOPS}.")
  _, params, other, _, loss_sum = final
  trained = {"params": params, **other}
  delta = jax.tree.map(lambda r, t: r - t, flax.core.unfreeze(received), trained)
  metrics = {"train_loss": loss_sum / jnp.maximum(steps, 1)}
  return delta, metrics
