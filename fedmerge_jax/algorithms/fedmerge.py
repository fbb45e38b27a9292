"""FedMerge: K stacked global models, per-client merging logits, updates through the merge.

The same machinery, with other server rules or weights, is FedAvg (K = 1), FedProx and
IFCA (one-hot weights from the lowest-loss model): see those modules.

Memory: where the globals step is linear in the deltas with weights known before training
(K = 1, the `gradient` mode, FedAvg, FedProx, IFCA), each chunk of clients' deltas is
folded into the server's gradient sums as soon as it is trained, so a round holds
`client_chunk_size` deltas, not one per sampled client. The `official` mode with K > 1
weights the globals step by the logits *after* their step, which is normalised by the
largest logit gradient over all sampled clients: no fixed set of running sums gives it,
so that case keeps every sampled client's delta (C x model size floats, e.g. 3,400
EMNIST-CNN clients: 16.4 GB) and sums them chunk by chunk once the logits are known.
"""

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from fedmerge_jax import client as client_lib
from fedmerge_jax import gap
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base
from fedmerge_jax.merge import globals_gradients, logit_gradients, merge, merging_weights
from fedmerge_jax.server_optim import (
  ServerUpdate,
  init_logits_state,
  make_server_update,
  sparse_logits_step,
)


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


def trainable_mask(variables):
  """True on the trainable 'params' leaves, False on BatchNorm's running statistics.

  The statistics are not arguments of the loss, so they have no place in dL/dA.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[0], "key", None) == "params", variables
  )


def make(
  model,
  config,
  num_clients: int,
  example_input,
  *,
  num_global_models: Optional[int] = None,
  server_update: Optional[ServerUpdate] = None,
  prox_mu: Optional[float] = None,
  assign_logits: Optional[Callable[..., Any]] = None,
  models_down: Optional[int] = None,
) -> base.Algorithm:
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
  takes_mask = models.takes_mask(model)

  def init(rng) -> State:
    stacked = init_stacked(model, rng, k_models, example_input)
    logits = jnp.zeros((num_clients, k_models), jnp.float32)  # Uniform 1/K weights.
    return State(
      stacked, logits, server.globals_tx.init(stacked), init_logits_state(server, logits)
    )

  def client_logits(state: State, client_ids, data):
    if assign_logits is None:
      return state.logits[client_ids]
    return assign_logits(state, client_ids, data)

  def personalized(state: State, client_ids, train_data):
    return merge(state.globals, merging_weights(client_logits(state, client_ids, train_data)))

  def train_one(stacked, weights_row, data, key):
    received = jax.tree.map(lambda leaf: leaf[0], merge(stacked, weights_row[None]))
    delta, metrics = client_lib.local_train(
      model.apply, received, gap.train_part(data), key, local, takes_mask=takes_mask
    )
    trained = jax.tree.map(jnp.subtract, received, delta)  # For the gap metric (gap.py) only.
    return delta, gap.probe(metrics, base.model_predict(model, config.compute_dtype), trained, data)

  if server.logit_gradient_params == "head":
    mask_fn = models.head_mask
    mask_fn(one_model)  # A model without a 'head' fails here in one line, not mid-trace.
  else:
    mask_fn = trainable_mask
  # The globals step is linear in the deltas with weights known before training unless it
  # uses the logits after their step (official mode) and K > 1: then every delta is kept.
  streaming = not server.logits_first or k_models == 1

  def chunk_gradients(stacked, rows, p, deltas):
    """A chunk of clients' share of the server's gradients.

    (dL/dTheta summed or None, dL/dA rows).
    """
    mask = jax.tree.leaves(mask_fn(stacked))
    picked = lambda tree: [leaf for leaf, m in zip(jax.tree.leaves(tree), mask) if m]
    grad_rows = logit_gradients(picked(stacked), rows, picked(deltas), p)
    return (globals_gradients(stacked, rows, deltas, p) if streaming else None), grad_rows

  def server_step(state: State, client_ids, p, grad, grad_rows, deltas=None) -> State:
    """The logit step, then the globals step (dL/dTheta from `deltas` unless streamed)."""
    rows = state.logits[client_ids]
    state = logits_step(state, client_ids, grad_rows, p)
    weight_rows = state.logits[client_ids] if server.logits_first else rows
    if grad is None:  # Summed chunk by chunk: no second copy of all clients' deltas.
      grad, _ = parallel.map_clients(
        lambda *_: None,
        (weight_rows, deltas, p),
        config.client_chunk_size,
        config.client_parallelism,
        reduce=lambda chunk, _: (globals_gradients(state.globals, *chunk), None),
      )
    return globals_step(state, grad, jnp.einsum("c,ck->k", p, merging_weights(weight_rows)))

  def assigned(state: State, client_ids, data) -> State:
    if assign_logits is None:
      return state
    return state.replace(
      logits=state.logits.at[client_ids].set(assign_logits(state, client_ids, data))
    )

  def train_clients(state: State, client_ids, data, rng, reduce=None):
    """Every sampled client's local training from its merged model, via `map_clients`."""
    stacked = state.globals
    args = (
      state.logits[client_ids],
      base.sample_weights(data),
      data,
      base.client_keys(rng, client_ids),
    )
    return parallel.map_clients(
      lambda row, _, d, key: train_one(stacked, merging_weights(row), d, key),
      args,
      config.client_chunk_size,
      config.client_parallelism,
      reduce=reduce,
    )

  def round_fn(state: State, client_ids, data: client_lib.ClientData, rng):
    state = assigned(state, client_ids, data)

    def summarize(chunk, outputs):
      chunk_rows, chunk_p, _, _ = chunk
      deltas, metrics = outputs
      grad, grad_rows = chunk_gradients(state.globals, chunk_rows, chunk_p, deltas)
      return grad, (grad_rows, metrics) + (() if streaming else (deltas,))

    grad, (grad_rows, metrics, *deltas) = train_clients(state, client_ids, data, rng, summarize)
    state = server_step(state, client_ids, base.sample_weights(data), grad, grad_rows, *deltas)
    return state, base.training_metrics(data, metrics)

  def logits_step(state: State, client_ids, grad_rows, p) -> State:
    # The authors' logit step needs p per row (server_optim.authors_logit_step).
    logits, opt_state = sparse_logits_step(
      server, state.logits, state.logits_opt_state, client_ids, grad_rows, row_weights=p
    )
    return state.replace(logits=logits, logits_opt_state=opt_state)

  def globals_step(state: State, grad, model_mass) -> State:
    updates, opt_state = server.globals_tx.update(
      grad, state.globals_opt_state, state.globals, model_mass=model_mass
    )
    return state.replace(
      globals=optax.apply_updates(state.globals, updates), globals_opt_state=opt_state
    )

  def server_from_deltas(state: State, client_ids, data, deltas) -> State:
    """The server's part of a round given every client's delta (the breakdown's stage)."""
    state = assigned(state, client_ids, data)  # IFCA: the rows its clients trained with.
    p = base.sample_weights(data)
    grad, grad_rows = chunk_gradients(state.globals, state.logits[client_ids], p, deltas)
    return server_step(state, client_ids, p, grad, grad_rows, deltas)

  def client_rows(state: State) -> State:
    """The logits and their optimizer's state change at the round's rows only where the
    step is row-wise; otherwise (the official mode's step sees all [N, K]) kept whole."""
    logits = base.row_leaves if server.logits_rowwise else lambda tree, _: base.whole_leaves(tree)
    return State(
      base.whole_leaves(state.globals),
      logits(state.logits, num_clients),
      base.whole_leaves(state.globals_opt_state),
      logits(state.logits_opt_state, num_clients),
    )

  stages = base.RoundStages(
    train=lambda state, ids, data, rng: train_clients(assigned(state, ids, data), ids, data, rng),
    server=server_from_deltas,
  )
  down = size * (models_down or 1)
  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=base.model_predict(model, config.compute_dtype),
    communication=(down, size),
    merging_weights=(lambda state, ids, train: merging_weights(client_logits(state, ids, train)))
    if k_models > 1
    else None,
    stages=stages,
    client_rows=client_rows,
  )
