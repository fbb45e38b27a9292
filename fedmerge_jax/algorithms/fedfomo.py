"""FedFomo (Zhang et al. 2021): each client downloads other clients' models and moves toward the
ones that lower its own validation loss, weighted by loss gain per unit of distance.

Follows the authors' code (NVlabs/FedFomo: `Client.get_federating_clients`,
`compute_fomo_weights`, `Federation.update_client_weights`, `federate`). A sampled client i
holding theta_i, at the start of its round:
1. picks M = `config.fedfomo_downloads` of the models uploaded in the previous round (not
   its own): each slot explores (a random one) with chance eps_t = max(eps - t decay, 0),
   t the round index, else takes the next best by its affinity row P_i (ties broken at
   random); the reference's e-greedy with `fedfomo_epsilon`, `fedfomo_epsilon_decay` (0.3, 0.05);
2. weighs them on its validation examples: w_n = (L_i(theta_i) - L_i(theta_n)) /
   ||theta_n - theta_i||_1 (the reference's default L1 `model_delta_norm`);
3. adds P_i[n] += w_n / |sum_m w_m|, and, if any w_n > 0, sets
   theta_i <- theta_i + sum_{w_n > 0} w_n / (sum_{w_m > 0} w_m) (theta_n - theta_i);
   otherwise it keeps theta_i (the reference's `UPDATE_POSITIVE_ONLY`);
4. trains theta_i locally and uploads it. It predicts with theta_i.
In the first round nobody has uploaded: every sampled client only trains, as the
reference's round 0. Under partial participation the reference draws candidates from the
previous round's uploaders (`server.uploaded_clients`); so does this (`State.uploaded`).

Validation examples: a fixed `fedfomo_val_fraction` (0.2, the reference's 0.8 train split)
of each client's training examples, chosen by a permutation from the client's id and the
seed, never trained on, as the reference holds a split of local data out. Not the
dataset's own val split: the engine keeps that for model selection (`best/...`), and not
every dataset has one. A client with one example has no validation example and only trains.

Where this differs from the reference, and why:
- The baseline theta_i is the client's current model (the paper's Eq. 4, theta_i^{t-1});
  the reference's default `first_model` baseline is the model *before* the client's last
  training, with the client's own trained model as an extra candidate: a second model per
  client to store. Both weigh candidates the same way.
- Distances are over the trainable parameters; BatchNorm statistics are combined with the
  same weights (the reference combines whole state_dicts).
- The reference's hierarchical sub-federation models (spectral clustering of P) are not
  candidates; its README's runs use none.
- `received` (the gap metric) is the model the client would start from next round with
  greedy choice (eps = 0).
Checkpoints resume on the same number of devices: P has a column per padded client.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import client as client_lib
from fedmerge_jax import evaluation
from fedmerge_jax import gap
from fedmerge_jax import models as models_lib
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base
from fedmerge_jax.algorithms.local import broadcast, scatter

VALIDATION_STREAM = 0xF0D0  # Validation splits: fold_in(key(seed), this), then the client id.
RECEIVED_STREAM = 0xF0D1  # Tie-breaks of the greedy choice `received` makes.


@flax.struct.dataclass
class State:
  personal: Any  # Every client's model theta_j, leaves [N, ...].
  affinity: jax.Array  # [N, N] P: P[i, j], how much client i gained from j's models so far.
  uploaded: jax.Array  # [N] 1.0 where the client uploaded its model in the last round.
  rounds_done: jax.Array  # [] int32.


def validation_rows(padded_length: int, fraction: float) -> int:
  """Rows that hold every client's validation part: the most any count up to the padded
  length holds out (float32 as `validation_split` computes it), at least 1."""
  held = int(np.floor(np.float32(fraction) * np.float32(padded_length))) if fraction > 0 else 0
  return min(max(held, 1), padded_length)


def validation_split(data: client_lib.ClientData, key, fraction: float):
  """(training part, validation part) of a client's examples: a fixed random `fraction` held out.

  The validation part is `validation_rows` long, not the padded length: candidates are
  evaluated on its rows alone (about `fraction` of the padded rows' work).
  """
  n = data.count
  held = jnp.where(
    (fraction > 0) & (n >= 2), jnp.maximum(jnp.floor(fraction * n).astype(n.dtype), 1), 0
  )
  length = data.x.shape[0]
  order = client_lib.epoch_orders(key, n, length, 1)[0]
  train_n = n - held
  rows = order[(train_n + jnp.arange(validation_rows(length, fraction))) % length]
  return (
    client_lib.ClientData(data.x[order], data.y[order], train_n),
    client_lib.ClientData(data.x[rows], data.y[rows], held),
  )


def per_client_uniform(key, num_clients: int):
  """[N] uniforms, client j's from fold_in(key, j): the same whatever N pads to."""
  return jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j)))(jnp.arange(num_clients))


def choose_candidates(key, affinity_row, available, num: int, epsilon):
  """(indices [num], valid [num]): e-greedy picks among `available` clients.

  Each of the `num` slots explores with chance `epsilon`: the explored slots take random
  available clients, the others the best by affinity (random tie-breaks), none twice.
  """
  explore_key, tie_key, random_key = jax.random.split(key, 3)
  n = affinity_row.shape[0]
  explored = jnp.sum(jax.random.uniform(explore_key, (num,)) < epsilon)
  ranked = jnp.lexsort(
    (per_client_uniform(tie_key, n), -jnp.where(available, affinity_row, -jnp.inf))
  )
  rank = jnp.zeros_like(ranked).at[ranked].set(jnp.arange(n))
  top = available & (rank < num - explored)
  score = jnp.where(top, 2.0, jnp.where(available, per_client_uniform(random_key, n), -1.0))
  best, chosen = jax.lax.top_k(score, num)
  return chosen, best >= 0


def l1_distance(a, b):
  return sum(jnp.sum(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def fomo_weights(predict, own, candidates, valid, validation, example_chunk: int = 0):
  """[M] w_n = (L(own) - L(theta_n)) / ||theta_n - own||_1 on the validation examples.

  0 where a candidate is invalid. The M + 1 models are evaluated one after another
  (`lax.map`), `example_chunk` rows at a time (`evaluation.evaluate_client`): a `vmap` over
  models would hold M models' activations at once and, on accelerators, make every
  convolution a grouped one.
  """
  models = jax.tree.map(lambda o, c: jnp.concatenate([o[None], c]), own, candidates)
  losses = jax.lax.map(
    lambda m: evaluation.evaluate_client(predict, m, validation, example_chunk)[1], models
  ) / jnp.maximum(validation.count, 1)
  gains = losses[0] - losses[1:]
  distance = jax.vmap(lambda c: l1_distance(c["params"], own["params"]))(candidates)
  usable = valid & (distance > 0) & (validation.count > 0)
  return jnp.where(usable, gains / jnp.where(usable, distance, 1.0), 0.0)


def federated_start(own, candidates, weights):
  """own + sum over positive w_n, normalised, of w_n (theta_n - own); own if none is positive."""
  positive = jnp.maximum(weights, 0.0)
  total = jnp.sum(positive)
  share = jnp.where(total > 0, positive / jnp.where(total > 0, total, 1.0), 0.0)
  return jax.tree.map(
    lambda o, c: o + jnp.einsum("m,m...->...", share.astype(c.dtype), c - o), own, candidates
  )


def affinity_increments(weights):
  """The reference's P update: w_n / |sum w| (|sum w| below 1e-9 gets 1e-9 added)."""
  norm = jnp.abs(jnp.sum(weights))
  return weights / jnp.where(norm < 1e-9, norm + 1e-9, norm)


def make(model, config, num_clients, example_input):
  local = base.local_config(config, prox_mu=0.0)
  predict = base.model_predict(model)
  downloads = max(min(config.fedfomo_downloads, num_clients - 1), 1)  # top_k needs <= N.
  split_key = jax.random.fold_in(jax.random.key(config.seed), VALIDATION_STREAM)
  example_chunk = config.eval_batch_size or evaluation.EVAL_EXAMPLES  # As evaluation's.

  def init(rng) -> State:
    variables = flax.core.unfreeze(model.init(rng, example_input[None]))
    return State(
      broadcast(variables, num_clients),
      jnp.zeros((num_clients, num_clients), jnp.float32),
      jnp.zeros((num_clients,), jnp.float32),
      jnp.zeros((), jnp.int32),
    )

  def start_of_round(state: State, client_id, data, key, epsilon):
    """(the client's federated start model, candidates [M], their weights [M], train part)."""
    train, validation = validation_split(
      data, jax.random.fold_in(split_key, client_id), config.fedfomo_val_fraction
    )
    available = (state.uploaded > 0) & (jnp.arange(state.uploaded.shape[0]) != client_id)
    chosen, valid = choose_candidates(key, state.affinity[client_id], available, downloads, epsilon)
    own = jax.tree.map(lambda x: x[client_id], state.personal)
    candidates = jax.tree.map(lambda x: x[chosen], state.personal)
    weights = fomo_weights(predict, own, candidates, valid, validation, example_chunk)
    return federated_start(own, candidates, weights), chosen, weights, train

  def round_fn(state: State, client_ids, data, rng):
    epsilon = jnp.maximum(
      config.fedfomo_epsilon - state.rounds_done * config.fedfomo_epsilon_decay, 0.0
    )

    def one(client_id, d, key):
      start, chosen, weights, train = start_of_round(
        state, client_id, gap.train_part(d), jax.random.fold_in(key, 0), epsilon
      )
      delta, metrics = client_lib.local_train(
        model.apply,
        start,
        train,
        jax.random.fold_in(key, 1),
        local,
        takes_mask=models_lib.takes_mask(model),
      )
      trained = jax.tree.map(jnp.subtract, start, delta)
      return trained, chosen, affinity_increments(weights), gap.probe(metrics, predict, trained, d)

    trained, chosen, increments, metrics = parallel.map_clients(
      one,
      (client_ids, data, base.client_keys(rng, client_ids)),
      config.client_chunk_size,
      config.client_parallelism,
    )
    affinity = state.affinity.at[client_ids[:, None], chosen].add(increments)
    uploaded = (
      jnp.zeros_like(state.uploaded).at[client_ids].set((data.count > 0).astype(jnp.float32))
    )  # Phantom clients (no examples) upload nothing.
    new = State(
      scatter(state.personal, client_ids, trained), affinity, uploaded, state.rounds_done + 1
    )
    return new, base.training_metrics(data, metrics)

  def personalized(state: State, client_ids, train_data):
    del train_data
    return jax.tree.map(lambda x: x[client_ids], state.personal)

  def received(state: State, client_ids, train_data):
    """What each client would start its next round from, choosing greedily (gap metric)."""
    keys = base.client_keys(jax.random.key(RECEIVED_STREAM), client_ids)
    return parallel.map_clients(
      lambda cid, d, key: start_of_round(state, cid, d, key, 0.0)[0],
      (client_ids, train_data, keys),
      config.client_chunk_size,
      config.client_parallelism,
    )

  size = base.model_floats(model, example_input)
  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=predict,
    communication=(downloads * size, size),
    received=received,
    client_rows=lambda state: State(  # `uploaded` changes everywhere: whole.
      base.row_leaves(state.personal, num_clients), True, False, False
    ),
  )
