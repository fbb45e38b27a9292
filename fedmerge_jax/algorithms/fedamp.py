"""FedAMP (Huang et al. 2021): each client's cloud model is an attention-weighted mix of all models.

Follows PFLlib (`serveramp.py`, `clientamp.py`; the authors released no code). The server
holds each client's personal model w_j. For a sampled client i it builds the cloud model
  u_i = xi_ii w_i + sum_{j != i, j uploaded} xi_ij w_j,
  xi_ij = alpha e^{-||w_i - w_j||^2 / sigma} / sigma,   xi_ii = 1 - sum_{j != i} xi_ij,
(distances over the trainable parameters), and the client trains its own w_i further on
F_i(w) + lambda / (2 alpha) ||w - u_i||^2, then uploads it. It predicts with w_i.
`config.fedamp_alpha`, `fedamp_lambda`, `fedamp_sigma` are alpha, lambda, sigma (PFLlib's
defaults 1, 1, 1).

With PFLlib's defaults xi_ii < 0 whenever the models are close (sum of the others' xi up to
alpha (M - 1) / sigma for M uploaders): u_i then extrapolates away from w_i. The paper's
convex mix needs alpha <= sigma / (M - 1); both are kept as given.

Partial participation, as PFLlib: the attention runs over the clients that uploaded in the
previous round (`State.uploaded`); in the first round nobody has, so u_i = w_i. An
unsampled client keeps its model.

Where this differs from PFLlib, and why:
- The proximal term is the paper's squared norm lambda/(2 alpha) ||w - u||^2; PFLlib's
  client adds 0.5 lambda/alpha ||w - u|| (not squared), whose gradient has unit length
  whatever the distance.
- BatchNorm statistics of the cloud model are mixed with the same xi (PFLlib's u keeps its
  initial buffers); only u's parameters enter the loss, so training is unaffected. The
  cloud model is what the gap metric evaluates as "received".
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base
from fedmerge_jax.algorithms.local import broadcast, scatter


@flax.struct.dataclass
class State:
  personal: Any  # Every client's model w_j, leaves [N, ...].
  uploaded: jax.Array  # [N] 1.0 where the client uploaded its model in the last round.


def attention_row(personal_params, client_id, uploaded, alpha, sigma):
  """[N] xi_i: alpha e^{-d_ij/sigma}/sigma over the other uploaders j, 1 - their sum on i."""
  mine = jax.tree.map(lambda x: x[client_id], personal_params)
  distance = sum(
    jnp.sum(jnp.square(all_ - one).reshape(all_.shape[0], -1), axis=1)
    for all_, one in zip(jax.tree.leaves(personal_params), jax.tree.leaves(mine))
  )
  others = uploaded * (jnp.arange(uploaded.shape[0]) != client_id)
  xi = others * alpha * jnp.exp(-distance / sigma) / sigma
  return xi.at[client_id].add(1.0 - jnp.sum(xi))


def make(model, config, num_clients, example_input):
  local = base.local_config(config, prox_mu=config.fedamp_lambda / (2 * config.fedamp_alpha))

  def init(rng) -> State:
    variables = flax.core.unfreeze(model.init(rng, example_input[None]))
    return State(broadcast(variables, num_clients), jnp.zeros((num_clients,), jnp.float32))

  def cloud_models(state: State, client_ids, train_data=None):
    """u_i for each of `client_ids` (leading axis C), all collections mixed by xi_i."""
    del train_data

    def one(client_id):
      xi = attention_row(
        state.personal["params"],
        client_id,
        state.uploaded,
        config.fedamp_alpha,
        config.fedamp_sigma,
      )
      return jax.tree.map(
        lambda x: jnp.einsum("n,n...->...", xi.astype(x.dtype), x), state.personal
      )

    return parallel.map_clients(
      one, (client_ids,), config.client_chunk_size, config.client_parallelism
    )

  def round_fn(state: State, client_ids, data, rng):
    cloud = cloud_models(state, client_ids)
    mine = jax.tree.map(lambda x: x[client_ids], state.personal)
    trained, metrics = base.trained_models(
      model,
      mine,
      data,
      rng,
      client_ids,
      local,
      config.client_chunk_size,
      anchors=cloud["params"],
      parallelism=config.client_parallelism,
    )
    uploaded = (
      jnp.zeros_like(state.uploaded).at[client_ids].set((data.count > 0).astype(jnp.float32))
    )  # Phantom clients (no examples) upload nothing.
    return (
      State(scatter(state.personal, client_ids, trained), uploaded),
      base.training_metrics(data, metrics),
    )

  def personalized(state: State, client_ids, train_data):
    del train_data
    return jax.tree.map(lambda x: x[client_ids], state.personal)

  size = base.model_floats(model, example_input)
  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=base.model_predict(model),
    communication=(size, size),
    received=cloud_models,
    client_rows=lambda state: State(  # `uploaded` changes everywhere: whole.
      base.row_leaves(state.personal, num_clients), False
    ),
  )
