"""Ditto (Li et al. 2021): FedAvg for a global model w, plus a personal model per client.

Each sampled client also trains its personal v_i on F_i(v) + lambda/2 ||v - w||^2, w being
the global model it received this round; it predicts with v_i. `config.ditto_lambda` is
lambda. The global model is trained exactly as FedAvg trains it.
"""

from typing import Any

import flax
import jax

from fedmerge_jax.algorithms import base, fedavg
from fedmerge_jax.algorithms.local import broadcast, scatter

PERSONAL_STREAM = 1  # Personal training keys: fold_in(round key, this), then the client id.


@flax.struct.dataclass
class State:
  server: Any  # FedAvg's state (one global model).
  personal: Any  # Every client's personal model, leaves [N, ...].


def make(model, config, num_clients, example_input):
  global_algorithm = fedavg.make(model, config, num_clients, example_input)
  local = base.local_config(config, prox_mu=config.ditto_lambda / 2)

  def init(rng) -> State:
    server = global_algorithm.init(rng)
    personal = broadcast(jax.tree.map(lambda x: x[0], server.globals), num_clients)
    return State(server, personal)

  def round_fn(state: State, client_ids, data, rng):
    received = global_algorithm.personalized(state.server, client_ids, data)
    mine = jax.tree.map(lambda x: x[client_ids], state.personal)
    trained, personal_metrics = base.trained_models(
      model,
      mine,
      data,
      jax.random.fold_in(rng, PERSONAL_STREAM),
      client_ids,
      local,
      config.client_chunk_size,
      anchors=received["params"],
      parallelism=config.client_parallelism,
    )
    server, metrics = global_algorithm.round(state.server, client_ids, data, rng)
    metrics["train/personal_loss"] = base.training_metrics(data, personal_metrics)["train/loss"]
    return State(server, scatter(state.personal, client_ids, trained)), metrics

  def personalized(state: State, client_ids, train_data):
    del train_data
    return jax.tree.map(lambda x: x[client_ids], state.personal)

  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=base.model_predict(model, config.compute_dtype),
    communication=global_algorithm.communication,
    received=lambda state, ids, data: global_algorithm.personalized(
      state.server, ids, data
    ),  # The server sends w (gap metric).
    client_rows=lambda state: State(
      global_algorithm.client_rows(state.server), base.row_leaves(state.personal, num_clients)
    ),
  )
