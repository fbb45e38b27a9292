"""The shape every algorithm has, and the pieces they share.

An algorithm is a handful of pure functions over its state (`Algorithm`); `train.py`
jits and drives them. Per-client state (personal models, merging logits, mixture
weights) lives in device arrays with a leading client axis, so it shards with clients.
"""

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from fedmerge_jax import client as client_lib
from fedmerge_jax import gap
from fedmerge_jax import models as models_lib
from fedmerge_jax import parallel


class RoundStages(NamedTuple):
  """A round split into separately callable stages (the benchmark times each).

  train(state, client_ids, data, rng) -> (per-client deltas, leading axis C; metrics);
  server(state, client_ids, data, deltas) -> state. `round` computes the same, but may
  fold each chunk of deltas into the server's sums instead of holding all of them.
  """

  train: Callable[..., Any]
  server: Callable[..., Any]


class Algorithm(NamedTuple):
  """The public protocol every algorithm follows: pure functions over its state.

  A factory `(model, config, num_clients, example_input) -> Algorithm`, registered with
  `fedmerge_jax.algorithms.register_algorithm(name, factory)`, makes `config.algorithm=name`
  work everywhere (train_and_evaluate, launch.py, compare). `train.py` jits `round`,
  donates its state, shards per-client leaves (leading axis `num_clients`) over devices,
  checkpoints the state and evaluates `personalized` models with `predict`. The state
  is any pytree of arrays; the simplest algorithms reuse `fedmerge.make` with their own
  `ServerUpdate` (see fedavg.py and docs/pages/extending.md, "Your own algorithm").

  init(rng) -> state.
  round(state, client_ids [C], data: ClientData with leading axis C, rng) -> (state, metrics);
    metrics are scalars named 'train/...', plus per-client arrays named 'clients/...'.
  personalized(state, client_ids [C], train_data) -> the C clients' models (leading axis C),
    what each client predicts with; some methods (IFCA, fine-tuning) look at train data.
  predict(one_client_model, x [B, ...]) -> logits (or log-probabilities) [B, classes].
  communication: (floats sent down, floats sent up) per sampled client per round.
  merging_weights(state, client_ids [C], train_data) -> [C, K] how much each client draws
    on each of the K shared models (FedMerge's softmax(A), FedEM's mixtures, IFCA's
    assignment recomputed as `personalized` does), for logs and plots; None if K = 1.
  stages: the round's `RoundStages`, where the algorithm has them (None otherwise).
  received(state, client_ids, train_data) -> the models the server sends those clients
    (for the gap metric, gap.py); None: `personalized`.
  client_rows(state) -> a pytree of bools shaped like the state: True on the per-client
    leaves that a round changes only at its `client_ids` rows (`row_leaves`), so the NaN
    guard (guard.py) saves and restores those rows alone; None: it keeps a copy of the
    whole state each round (safe for any algorithm, costly for per-client models).
  """

  init: Callable[..., Any]
  round: Callable[..., Any]
  personalized: Callable[..., Any]
  predict: Callable[..., Any]
  communication: Tuple[int, int]
  merging_weights: Optional[Callable[[Any], jax.Array]] = None
  stages: Optional[RoundStages] = None
  received: Optional[Callable[..., Any]] = None
  client_rows: Optional[Callable[[Any], Any]] = None


def row_leaves(tree, num_clients: int):
  """For `Algorithm.client_rows`: True on `tree`'s leaves with a leading `num_clients` axis
  (a part of the state a round changes only at its clients' rows), False on the others."""
  return jax.tree.map(lambda leaf: parallel.is_per_client(leaf, num_clients), tree)


def whole_leaves(tree):
  """For `Algorithm.client_rows`: False on every leaf (a part of the state kept whole)."""
  return jax.tree.map(lambda _: False, tree)


def local_config(config, prox_mu=None, local_epochs=None) -> client_lib.LocalConfig:
  """Local training hyper-parameters from the config, with per-method overrides."""
  return client_lib.LocalConfig(
    local_epochs=config.local_epochs if local_epochs is None else local_epochs,
    batch_size=config.batch_size,
    client_lr=config.client_lr,
    prox_mu=config.prox_mu if prox_mu is None else prox_mu,
    batching=config.local_batching,
    loop=parallel.resolve_local_loop(
      config.local_loop, config.client_parallelism, config.client_chunk_size
    ),
    unroll=config.local_unroll,
    compute_dtype=config.compute_dtype,
  )


def model_predict(model, compute_dtype: str = "float32"):
  """Prediction with a plain flax variable dict: the model in eval mode, computing in
  `compute_dtype` (params and inputs cast), returning float32 logits."""

  def predict(variables, x):
    cast = lambda tree: client_lib.to_compute_dtype(tree, compute_dtype)
    variables = {**variables, "params": cast(variables["params"])}
    return model.apply(variables, cast(x), train=False).astype(jnp.float32)

  return predict


def num_floats(tree) -> int:
  """Number of floats in a pytree (one model's size on the wire)."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def model_floats(model, example_input) -> int:
  """Number of floats in one model's variables (one model on the wire), without initialising it."""
  return num_floats(jax.eval_shape(lambda: model.init(jax.random.key(0), example_input[None])))


def sample_weights(data: client_lib.ClientData):
  """p_i = n_i / sum n over the sampled clients."""
  counts = data.count.astype(jnp.float32)
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def client_keys(rng, client_ids):
  """One key per client from its id: independent of who else is sampled or chunking."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(client_ids)


def training_metrics(data: client_lib.ClientData, client_metrics) -> dict:
  p = sample_weights(data)
  return {
    "train/loss": jnp.sum(p * client_metrics["train_loss"]),
    "train/num_examples": jnp.sum(data.count.astype(jnp.float32)),
    "clients/train_loss": client_metrics["train_loss"],
    **gap.forward(client_metrics),
  }  # The gap metric's per-client (a) on evaluation rounds.


def trained_models(
  model, models, data, rng, client_ids, local, chunk_size, anchors=None, parallelism="auto"
):
  """Each client trains its own copy of `model`'s variables `models` (leading axis C);
  returns (trained models, metrics).

  `anchors` (leading axis C), if given, are the params each client's prox term pulls to;
  `chunk_size` and `parallelism` say how clients run (`parallel.map_clients`).
  """
  takes_mask = models_lib.takes_mask(model)

  def one(variables, d, key, anchor=None):
    delta, metrics = client_lib.local_train(
      model.apply, variables, gap.train_part(d), key, local, anchor=anchor, takes_mask=takes_mask
    )
    trained = jax.tree.map(jnp.subtract, variables, delta)
    return trained, gap.probe(metrics, model_predict(model), trained, d)

  args = (models, data, client_keys(rng, client_ids))
  return parallel.map_clients(
    one, args if anchors is None else args + (anchors,), chunk_size, parallelism
  )
