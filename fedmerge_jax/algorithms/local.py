"""Local training only: every client trains its own model on its own data, never talking.

The lower bound every personalised method should beat where clients have too little data.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from fedmerge_jax.algorithms import base


@flax.struct.dataclass
class State:
  personal: Any  # Every client's model, leaves [N, ...].


def broadcast(variables, num_clients: int):
  """One model copied for every client: leaves [N, ...]."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), variables)


def scatter(personal, client_ids, updated):
  """personal with the rows of `client_ids` replaced by `updated`."""
  return jax.tree.map(lambda all_, new: all_.at[client_ids].set(new), personal, updated)


def make(model, config, num_clients, example_input):
  local = base.local_config(config, prox_mu=0.0)

  def init(rng) -> State:
    variables = flax.core.unfreeze(model.init(rng, example_input[None]))
    return State(broadcast(variables, num_clients))

  def round_fn(state: State, client_ids, data, rng):
    mine = jax.tree.map(lambda x: x[client_ids], state.personal)
    trained, metrics = base.trained_models(
      model,
      mine,
      data,
      rng,
      client_ids,
      local,
      config.client_chunk_size,
      parallelism=config.client_parallelism,
    )
    return State(scatter(state.personal, client_ids, trained)), base.training_metrics(data, metrics)

  def personalized(state: State, client_ids, train_data):
    del train_data
    return jax.tree.map(lambda x: x[client_ids], state.personal)

  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=base.model_predict(model, config.compute_dtype),
    communication=(0, 0),
    client_rows=lambda state: base.row_leaves(state, num_clients),
  )
