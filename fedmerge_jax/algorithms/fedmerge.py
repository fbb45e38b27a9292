"""FedMerge: K stacked global models, per-client merging logits, updates through the merge.

The same machinery, with other server rules or weights, is FedAvg (K = 1), FedProx and
IFCA (one-hot weights from the lowest-loss model): see those modules.
"""

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from fedmerge_jax import client as client_lib
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base
from fedmerge_jax.merge import merge, merging_weights, server_gradients
from fedmerge_jax.server_optim import ServerUpdate, make_server_update


@flax.struct.dataclass
class State:
  globals: Any  # The K global models' variables, every leaf [K, ...].
  logits: jax.Array  # [N, K] merging logits of every client in the population.
  globals_opt_state: Any
  logits_opt_state: Any


def init_stacked(model, rng, num_models: int, example_input):
  """K models of one architecture, each with its own random init, stacked on axis 0."""
  keys = jax.random.split(rng, num_models)
  return jax.vmap(lambda k: flax.core.unfreeze(model.init(k, example_input[None])))(keys)


def make(model, config, num_clients: int, example_input, *,
         num_global_models: Optional[int] = None,
         server_update: Optional[ServerUpdate] = None,
         prox_mu: Optional[float] = None,
         assign_logits: Optional[Callable[..., Any]] = None,
         models_down: Optional[int] = None) -> base.Algorithm:
  """FedMerge for a population of `num_clients`; `example_input` is one unbatched input.

  Overrides let other methods reuse this machinery: `assign_logits(state, ids, data)`
  replaces the sampled clients' logit rows before training (IFCA's assignment);
  `models_down` is how many models a client downloads (1: the merged one).
  """
  k_models = num_global_models or config.num_global_models
  server = server_update or make_server_update(config)
  local = base.local_config(config, prox_mu=prox_mu)
  one_model = jax.eval_shape(lambda: model.init(jax.random.key(0), example_input[None]))
  size = base.num_floats(one_model)

  def init(rng) -> State:
    stacked = init_stacked(model, rng, k_models, example_input)
    logits = jnp.zeros((num_clients, k_models), jnp.float32)  # Uniform 1/K weights.
    return State(stacked, logits, server.globals_tx.init(stacked), server.logits_tx.init(logits))

  def client_logits(state: State, client_ids, data):
    if assign_logits is None:
      return state.logits[client_ids]
    return assign_logits(state, client_ids, data)

  def personalized(state: State, client_ids, train_data):
    return merge(state.globals, merging_weights(client_logits(state, client_ids, train_data)))

  def train_one(stacked, weights_row, data, key):
    received = jax.tree.map(lambda leaf: leaf[0], merge(stacked, weights_row[None]))
    return client_lib.local_train(model.apply, received, data, key, local)

  def round_fn(state: State, client_ids, data: client_lib.ClientData, rng):
    if assign_logits is not None:
      state = state.replace(
          logits=state.logits.at[client_ids].set(assign_logits(state, client_ids, data)))
    weights = merging_weights(state.logits[client_ids])
    deltas, client_metrics = parallel.map_clients(
        lambda w, d, k: train_one(state.globals, w, d, k),
        (weights, data, base.client_keys(rng, client_ids)), config.client_chunk_size)
    state = server_step(state, client_ids, deltas, base.sample_weights(data))
    return state, base.training_metrics(data, client_metrics)

  if server.logit_gradient_params == "head":
    mask_fn = models.head_mask
  else:
    mask_fn = lambda variables: jax.tree.map(lambda _: True, variables)

  def logits_step(state: State, client_ids, deltas, p) -> State:
    mask = mask_fn(state.globals)
    masked = jax.tree.map(lambda d, m: d if m else jnp.zeros_like(d), deltas, mask)
    _, grad_rows = server_gradients(state.globals, state.logits[client_ids], masked, p)
    grad = jnp.zeros_like(state.logits).at[client_ids].add(grad_rows)
    updates, opt_state = server.logits_tx.update(grad, state.logits_opt_state, state.logits)
    return state.replace(logits=optax.apply_updates(state.logits, updates),
                         logits_opt_state=opt_state)

  def globals_step(state: State, client_ids, deltas, p, logits) -> State:
    rows = logits[client_ids]
    grad, _ = server_gradients(state.globals, rows, deltas, p)
    model_mass = jnp.einsum("c,ck->k", p, merging_weights(rows))
    updates, opt_state = server.globals_tx.update(
        grad, state.globals_opt_state, state.globals, model_mass=model_mass)
    return state.replace(globals=optax.apply_updates(state.globals, updates),
                         globals_opt_state=opt_state)

  def server_step(state: State, client_ids, deltas, p) -> State:
    new = logits_step(state, client_ids, deltas, p)
    weights_from = new.logits if server.logits_first else state.logits
    return globals_step(new, client_ids, deltas, p, weights_from)

  down = size * (models_down or 1)
  return base.Algorithm(init=init, round=round_fn, personalized=personalized,
                        predict=base.model_predict(model), communication=(down, size),
                        merging_weights=(lambda state: merging_weights(state.logits))
                        if k_models > 1 else None)
