"""The server's update rules as optax transformations.

Both update modes differentiate the same surrogate (`merge.server_gradients`); they
differ only in which chain of optax transformations turns those gradients into steps,
in which parameters feed the logit gradient (a mask), and in the order of the two steps.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

UPDATE_MODES = ("official", "gradient")
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
  logits_tx: optax.GradientTransformation
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


def sparse_logits_step(server: ServerUpdate, logits, opt_state, client_ids, grad_rows):
  """(new logits, new state) after the logit step of the clients `client_ids` (distinct).

  Row-wise (lazy, as sparse optimizers): gather the sampled rows and their state rows,
  run the optimizer on each row alone, scatter both back, so an unsampled client keeps its
  logits and its state rows bit for bit. A step count (adam's `count`) is per row: the
  number of rounds that client took part in, as if each client had its own optimizer.
  Otherwise the optimizer sees the whole [N, K] gradient, zero on unsampled rows (fit for
  stateless rules whose normalisation couples the round's rows, as the `official` mode).
  """
  if not server.logits_rowwise:
    grad = jnp.zeros_like(logits).at[client_ids].add(grad_rows)
    updates, opt_state = server.logits_tx.update(grad, opt_state, logits)
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


def make_server_update(config) -> ServerUpdate:
  """The `config.update_mode` rules, with the config's server learning rates."""
  if config.update_mode == "official":
    # The authors' released code: max-normalised logit step from the head only, first;
    # then per-model normalised weighted averaging of the deltas (server lr 1 in the paper).
    return ServerUpdate(
        globals_tx=optax.chain(scale_by_inverse_model_mass(), optax.sgd(config.server_lr_globals)),
        logits_tx=optax.chain(scale_by_inverse_max_abs(), optax.sgd(config.server_lr_logits)),
        logit_gradient_params="head",
        logits_first=True)
  if config.update_mode == "gradient":
    return ServerUpdate(
        globals_tx=optax.with_extra_args_support(
            named_optimizer(config.server_optimizer_globals, config.server_lr_globals)),
        logits_tx=named_optimizer(config.server_optimizer_logits, config.server_lr_logits),
        logit_gradient_params="all",
        logits_first=False,
        logits_rowwise=True)
  raise ValueError(f"update_mode={config.update_mode!r}; expected one of {UPDATE_MODES}.")
