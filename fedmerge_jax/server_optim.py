"""The server's update rules as optax transformations.

Both update modes take the same surrogate's gradients (`merge.server_gradients`); they
differ only in which chain of optax transformations turns those gradients into steps,
in which parameters feed the logit gradient (a mask), and in the order of the two steps.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedmerge_jax import choices

UPDATE_MODES = choices.UPDATE_MODES
LOGIT_STEPS = choices.LOGIT_STEPS  # `official` mode's logit step (config.logit_step).
LOGIT_GRADIENT_PARAMS = ("head", "all")


def scale_by_inverse_max_abs() -> optax.GradientTransformation:
  """g -> g / max|g| over the whole update (0 stays 0): the largest entry moves by lr."""

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
    scale = jnp.where(max_abs > 0, 1.0 / jnp.where(max_abs > 0, max_abs, 1.0), 0.0)
    return jax.tree.map(lambda x: x * scale.astype(x.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def authors_logit_step(
  learning_rate: float, inner_lr: float = 0.01, max_inner_steps: int = 10_000
) -> optax.GradientTransformationExtraArgs:
  """The authors' update_W in closed form, on the [N, K] logit gradient (extra arg `row_weights`).

  Theirs: G = dL/dA with the p_i factored out, G <- G / sum|G|, then repeat
  A <- A - inner_lr * p_i * G_ij until some entry moved more than `learning_rate`, at most
  max_inner_steps + 1 times. Here `updates` is p_i G_ij (the surrogate's gradient) and
  `row_weights` is p (0 for clients not trained); the step is -n inner_lr p G / sum|G| with
  n = min(floor(learning_rate / max|step|) + 1, max_inner_steps + 1). So the largest entry
  moves by lr..lr + one inner step, or by less when the cap binds (|p G| nearly uniform).
  """

  def update_fn(updates, state, params=None, *, row_weights, **extra_args):
    del params, extra_args
    p = row_weights.reshape((-1,) + (1,) * (updates.ndim - 1)).astype(updates.dtype)
    g = jnp.where(p > 0, updates / jnp.where(p > 0, p, 1.0), 0.0)
    l1 = jnp.sum(jnp.abs(g))
    step = inner_lr * updates / jnp.where(l1 > 0, l1, 1.0)
    largest = jnp.max(jnp.abs(step))
    n = jnp.minimum(
      jnp.floor(learning_rate / jnp.where(largest > 0, largest, 1.0)) + 1, max_inner_steps + 1
    )
    return jnp.where(largest > 0, -n * step, 0.0), state

  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update_fn)


def scale_by_inverse_model_mass() -> optax.GradientTransformationExtraArgs:
  """Per-model normalisation: leaf[k] / m_k with m_k = sum_i p_i w_ik (extra arg `model_mass`).

  Applied to dL/dTheta_k = sum_i p_i w_ik Delta_i it gives sum_i w_hat_ik Delta_i with
  w_hat_ik = p_i w_ik / sum_j p_j w_jk, the authors' per-model weighted average.
  """

  def update_fn(updates, state, params=None, *, model_mass, **extra_args):
    del params, extra_args
    safe = jnp.where(model_mass > 0, model_mass, 1.0)
    inverse = jnp.where(model_mass > 0, 1.0 / safe, 0.0)

    def scale(x):
      return x * inverse.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)

    return jax.tree.map(scale, updates), state

  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update_fn)


class ServerUpdate(NamedTuple):
  """How the server turns surrogate gradients into new globals and logits.

  `globals_tx.update` receives the extra argument `model_mass` (see above).
  """

  globals_tx: optax.GradientTransformationExtraArgs
  logits_tx: optax.GradientTransformation  # May take the extra argument `row_weights` (p).
  logit_gradient_params: str  # 'head' or 'all' (trainable 'params' only): what feeds dL/dA.
  logits_first: bool  # If True, the globals step uses the weights after the logit step.
  # If True, `logits_tx` runs on each client's logit row alone, with that row's own state
  # (`init_logits_state`, `sparse_logits_step`): unsampled rows never move.
  logits_rowwise: bool = False


def init_logits_state(server: ServerUpdate, logits):
  """The logit optimizer's state: one state per row (leaves [N, ...]) if `logits_rowwise`."""
  if server.logits_rowwise:
    return jax.vmap(server.logits_tx.init)(logits)
  return server.logits_tx.init(logits)


def sparse_logits_step(
  server: ServerUpdate, logits, opt_state, client_ids, grad_rows, row_weights=None
):
  """(new logits, new state) after the logit step of the clients `client_ids` (distinct).

  Row-wise (lazy, as sparse optimizers): gather the sampled rows and their state rows,
  run the optimizer on each row alone, scatter both back, so an unsampled client keeps its
  logits and its state rows bit for bit. A step count (adam's `count`) is per row: the
  number of rounds that client took part in, as if each client had its own optimizer.
  Otherwise the optimizer sees the whole [N, K] gradient, zero on unsampled rows (fit for
  stateless rules whose normalisation couples the round's rows, as the `official` mode);
  there `row_weights` ([C], the sampled clients' p) reach it as the extra argument
  `row_weights` ([N], zero on unsampled rows), which the authors' logit step needs.
  """
  if not server.logits_rowwise:
    grad = jnp.zeros_like(logits).at[client_ids].add(grad_rows)
    extra = {}
    if row_weights is not None:
      extra["row_weights"] = (
        jnp.zeros(logits.shape[0], row_weights.dtype).at[client_ids].add(row_weights)
      )
    updates, opt_state = optax.with_extra_args_support(server.logits_tx).update(
      grad, opt_state, logits, **extra
    )
    return optax.apply_updates(logits, updates), opt_state
  rows = logits[client_ids]
  state_rows = jax.tree.map(lambda s: s[client_ids], opt_state)
  updates, new_state_rows = jax.vmap(server.logits_tx.update)(grad_rows, state_rows, rows)
  new_logits = logits.at[client_ids].set(optax.apply_updates(rows, updates))
  new_state = jax.tree.map(lambda s, r: s.at[client_ids].set(r), opt_state, new_state_rows)
  return new_logits, new_state


def named_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """An optax optimizer by its function name, e.g. 'sgd', 'adam', 'adamw'."""
  factory = getattr(optax, name, None)
  if factory is None or not callable(factory):
    raise ValueError(f"Optimizer {name!r} is not an optax optimizer (try 'sgd' or 'adam').")
  return factory(learning_rate=learning_rate)


def official_logits_tx(config) -> optax.GradientTransformation:
  """`official` mode's logit step: config.logit_step 'authors' or 'max_normalized'."""
  if config.logit_step == "authors":
    return authors_logit_step(config.server_lr_logits)
  if config.logit_step == "max_normalized":  # One step in which the largest entry moves lr_A.
    return optax.chain(scale_by_inverse_max_abs(), optax.sgd(config.server_lr_logits))
  raise ValueError(f"logit_step={config.logit_step!r}; expected one of {LOGIT_STEPS}.")


def make_server_update(config) -> ServerUpdate:
  """The `config.update_mode` rules, with the config's server learning rates."""
  if config.update_mode == "official":
    # The authors' released code: their logit step from the head only, first; then
    # per-model normalised weighted averaging of the deltas (server lr 1 in the paper).
    return ServerUpdate(
      globals_tx=optax.chain(scale_by_inverse_model_mass(), optax.sgd(config.server_lr_globals)),
      logits_tx=official_logits_tx(config),
      logit_gradient_params="head",
      logits_first=True,
    )
  if config.update_mode == "gradient":
    return ServerUpdate(
      globals_tx=optax.with_extra_args_support(
        named_optimizer(config.server_optimizer_globals, config.server_lr_globals)
      ),
      logits_tx=named_optimizer(config.server_optimizer_logits, config.server_lr_logits),
      logit_gradient_params="all",
      logits_first=False,
      logits_rowwise=True,
    )
  raise ValueError(f"update_mode={config.update_mode!r}; expected one of {UPDATE_MODES}.")
