"""FedMerge: K stacked global models, per-client merging logits, updates through the merge."""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from fedmerge_jax import client as client_lib
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax.algorithms.base import Algorithm
from fedmerge_jax.merge import merge, merging_weights, server_gradients
from fedmerge_jax.server_optim import ServerUpdate, make_server_update


@flax.struct.dataclass
class State:
  globals: Any  # The K global models' variables, every leaf [K, ...].
  logits: jax.Array  # [N, K] merging logits of every client in the population.
  globals_opt_state: Any
  logits_opt_state: Any


def local_config(config) -> client_lib.LocalConfig:
  return client_lib.LocalConfig(local_epochs=config.local_epochs, batch_size=config.batch_size,
                                client_lr=config.client_lr, prox_mu=config.prox_mu)


def make(model, config, num_clients: int, example_input,
         num_global_models: Optional[int] = None,
         server_update: Optional[ServerUpdate] = None) -> Algorithm:
  """FedMerge for a population of `num_clients`; `example_input` is one unbatched input."""
  k_models = num_global_models or config.num_global_models
  server = server_update or make_server_update(config)
  local = local_config(config)

  def init(rng) -> State:
    keys = jax.random.split(rng, k_models)  # Each global model gets its own random init.
    stacked = jax.vmap(lambda k: flax.core.unfreeze(model.init(k, example_input[None])))(keys)
    logits = jnp.zeros((num_clients, k_models), jnp.float32)  # Uniform 1/K weights.
    return State(stacked, logits, server.globals_tx.init(stacked), server.logits_tx.init(logits))

  def personalized(state: State, client_ids):
    return merge(state.globals, merging_weights(state.logits[client_ids]))

  def train_one(stacked, weights_row, data, key):
    received = jax.tree.map(lambda leaf: leaf[0], merge(stacked, weights_row[None]))
    return client_lib.local_train(model.apply, received, data, key, local)

  def round_fn(state: State, client_ids, data: client_lib.ClientData, rng):
    weights = merging_weights(state.logits[client_ids])
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(client_ids)
    deltas, client_metrics = parallel.map_clients(
        lambda w, d, k: train_one(state.globals, w, d, k), (weights, data, keys),
        config.client_chunk_size)
    counts = data.count.astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    state = server_step(state, client_ids, deltas, p)
    metrics = {"train/loss": jnp.sum(p * client_metrics["train_loss"]),
               "train/num_examples": jnp.sum(counts),
               "clients/train_loss": client_metrics["train_loss"]}
    return state, metrics

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

  return Algorithm(init=init, round=round_fn, personalized=personalized)
