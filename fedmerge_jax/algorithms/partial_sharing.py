"""Methods that share part of every client's model and keep the rest on the client.

FedBN (BatchNorm local), FedPer and FedRep (the head local), APFL (a personal model and its
mixing weight local) and Per-FedAvg (nothing local) are one algorithm here, differing in
what is personal and how a client trains:
- the shared part (one copy) is averaged as FedAvg averages a model: the sampled clients'
  deltas weighted by p_i = n_i / sum_{sampled} n, then `server_optimizer_globals` at
  `server_lr_globals` ('sgd', 1: the plain average);
- the personal part, rows [N, ...] of the state, changes only when its client is sampled;
- a sampled client joins the shared part to its own personal part (one flax variable dict),
  trains it with `client.local_train` in one or more phases (FedRep: the head with the body
  frozen, then the body with the head frozen), and uploads the shared part's delta.
Which leaves are personal is a mask over the variable tree: `personal_layers_mask`
(top-level layers by name, e.g. the 'head' every model has), `models.batch_norm_mask`.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from fedmerge_jax import client as client_lib
from fedmerge_jax import config as config_lib
from fedmerge_jax import gap
from fedmerge_jax import models as models_lib
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base
from fedmerge_jax.algorithms.fedavg import averaging_server
from fedmerge_jax.algorithms.fedmerge import init_stacked
from fedmerge_jax.algorithms.local import broadcast, scatter
from fedmerge_jax.models import layers_mask

TRAINS = ("all", "personal", "shared")  # What a phase trains; the rest of 'params' is frozen.


@flax.struct.dataclass
class State:
  # The shared part of the variables, one copy, every leaf [1, ...]: a leading axis that
  # cannot be mistaken for the per-client one (train.py tells them apart by its length).
  shared: Any
  opt_state: Any  # The server optimizer's state over `shared`.
  personal: Any  # The personal part, every leaf [N, ...]; {} when nothing is personal.


class Phase(NamedTuple):
  """`epochs` local epochs training the `trains` part of 'params' (one of TRAINS)."""

  epochs: int
  trains: str = "all"


def personal_layers_mask(variables, names: Sequence[str]):
  """`models.layers_mask` for `config.personal_layers`; a missing layer fails in one line."""
  top = sorted(dict(variables).get("params", {}))
  missing = [name for name in names if name not in top]
  if missing:
    raise config_lib.ConfigError(
      f"config.personal_layers={tuple(names)!r}: the model has no top-level layer "
      f"{missing[0]!r}; its top-level layers are {top}."
    )
  return layers_mask(variables, tuple(names))


def split(variables, personal_keys):
  """(shared, personal): the leaves whose flattened path is not / is in `personal_keys`."""
  flat = traverse_util.flatten_dict(dict(variables))
  part = lambda personal: traverse_util.unflatten_dict(
    {k: v for k, v in flat.items() if (k in personal_keys) == personal}
  )
  return part(False), part(True)


def combine(shared, personal):
  """One variable dict from its shared and personal parts (`split`'s inverse)."""
  return traverse_util.unflatten_dict(
    {**traverse_util.flatten_dict(shared), **traverse_util.flatten_dict(personal)}
  )


def weighted_sum(p, trees):
  """sum_i p_i trees_i over the leading axis of every leaf."""
  return jax.tree.map(lambda d: jnp.einsum("c,c...->...", p, d), trees)


def make(
  model,
  config,
  num_clients: int,
  example_input,
  *,
  personal_mask: Callable[[Any], Any],
  phases: Optional[Sequence[Phase]] = None,
  init_variables: Optional[Callable[[Any], Any]] = None,
  apply_fn: Optional[Callable[..., Any]] = None,
  local: Optional[client_lib.LocalConfig] = None,
  predict: Optional[Callable[..., Any]] = None,
  adapt: Optional[Callable[..., Any]] = None,
  sent: Optional[Callable[[Any], Any]] = None,
  **train_kwargs,
) -> base.Algorithm:
  """The algorithm for `num_clients` whose personal leaves are `personal_mask(variables)`.

  phases: how a sampled client trains (default: `local_epochs` on everything).
  init_variables(rng): one client's variables (default: the model's, FedAvg's init).
  apply_fn / predict: training and prediction with those variables (default: the model's).
  local: local training's hyper-parameters (default: the config's, no proximal term);
  `train_kwargs` go to `client.local_train` (example_loss, optimizer, objective).
  adapt(models, train_data, client_ids): what a client predicts with, from its joined
  variables (Per-FedAvg's one step); sent(models): the model the server sends, as a
  variable dict `predict` takes (gap metric). Both default to the joined variables.
  """
  init_variables = init_variables or (
    lambda rng: jax.tree.map(lambda x: x[0], init_stacked(model, rng, 1, example_input))
  )
  apply_fn = apply_fn or model.apply  # A wrapper forwards `mask=` as the model takes it.
  takes_mask = models_lib.takes_mask(model)
  predict = predict or base.model_predict(model)
  phases = tuple(phases or (Phase(config.local_epochs),))
  local = local or base.local_config(config, prox_mu=0.0)
  server = averaging_server(config).globals_tx
  abstract = jax.eval_shape(init_variables, jax.random.key(0))
  personal_keys = frozenset(
    k
    for k, is_personal in traverse_util.flatten_dict(dict(personal_mask(abstract))).items()
    if is_personal
  )
  shared_size = base.num_floats(split(abstract, personal_keys)[0])

  def trainable(trains: str):
    """Bools over 'params': which leaves a phase trains (None: all)."""
    if trains not in TRAINS:
      raise ValueError(f"Phase trains={trains!r}; expected one of {TRAINS}.")
    if trains == "all":
      return None
    flat = traverse_util.flatten_dict(dict(abstract["params"]))
    return traverse_util.unflatten_dict(
      {k: (("params",) + k in personal_keys) == (trains == "personal") for k in flat}
    )

  masks = [trainable(phase.trains) for phase in phases]

  def init(rng) -> State:
    shared, personal = split(init_variables(rng), personal_keys)
    shared = jax.tree.map(lambda x: x[None], shared)
    return State(shared, server.init(shared), broadcast(personal, num_clients))

  def unstacked(state: State):
    return jax.tree.map(lambda x: x[0], state.shared)

  def joined(state: State, client_ids):
    """The clients' variables: the shared part (broadcast) joined to each one's personal part."""
    rows = jax.tree.map(lambda x: x[client_ids], state.personal)
    return combine(broadcast(unstacked(state), client_ids.shape[0]), rows)

  def train_one(shared, personal_row, data, key):
    variables = combine(shared, personal_row)
    metrics = {"train_loss": jnp.zeros((), jnp.float32)}
    for i, (phase, mask) in enumerate(zip(phases, masks)):
      if phase.epochs == 0:
        continue
      delta, metrics = client_lib.local_train(
        apply_fn,
        variables,
        gap.train_part(data),
        key if i == 0 else jax.random.fold_in(key, i),
        local._replace(local_epochs=phase.epochs),
        takes_mask=takes_mask,
        trainable=mask,
        **train_kwargs,
      )
      variables = jax.tree.map(jnp.subtract, variables, delta)
    new_shared, new_personal = split(variables, personal_keys)
    shared_delta = jax.tree.map(jnp.subtract, shared, new_shared)
    return shared_delta, new_personal, gap.probe(metrics, predict, variables, data)

  def round_fn(state: State, client_ids, data, rng):
    def summarize(chunk, outputs):
      """sum_i p_i Delta_i over a chunk (never all clients' deltas at once); personal rows."""
      deltas, personal, metrics = outputs
      return weighted_sum(chunk[1], deltas), (personal, metrics)

    rows, shared = jax.tree.map(lambda x: x[client_ids], state.personal), unstacked(state)
    grad, (personal, metrics) = parallel.map_clients(
      lambda row, _, d, key: train_one(shared, row, d, key),
      (rows, base.sample_weights(data), data, base.client_keys(rng, client_ids)),
      config.client_chunk_size,
      config.client_parallelism,
      reduce=summarize,
    )
    updates, opt_state = server.update(
      jax.tree.map(lambda g: g[None], grad),
      state.opt_state,
      state.shared,
      model_mass=jnp.ones((1,)),
    )
    state = State(
      optax.apply_updates(state.shared, updates),
      opt_state,
      scatter(state.personal, client_ids, personal),
    )
    return state, base.training_metrics(data, metrics)

  def personalized(state: State, client_ids, train_data):
    models = joined(state, client_ids)
    return models if adapt is None else adapt(models, train_data, client_ids)

  received = None  # The gap metric's default: what the client predicts with.
  if adapt is not None or sent is not None:
    received = lambda state, ids, data: (sent or (lambda m: m))(joined(state, ids))
  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=predict,
    communication=(shared_size, shared_size),
    received=received,
    client_rows=lambda state: State(
      base.whole_leaves(state.shared),
      base.whole_leaves(state.opt_state),
      base.row_leaves(state.personal, num_clients),
    ),
  )
