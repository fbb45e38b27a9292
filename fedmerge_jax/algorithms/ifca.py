"""IFCA (Ghosh et al. 2020): K cluster models; a client joins the one that fits it best.

Each sampled client evaluates all K models on its training data, takes the one with the
lowest loss, trains it, and the server averages the updates per cluster. In FedMerge's
machinery that is one-hot merging weights and the per-model normalised average.
"""

import jax
import jax.numpy as jnp
import optax

from fedmerge_jax import evaluation
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import fedmerge
from fedmerge_jax.server_optim import ServerUpdate, scale_by_inverse_model_mass

EXCLUDED_LOGIT = -1e9  # softmax gives exactly 0 to it in float32.


def training_losses(model, stacked, data, chunk_size=0, parallelism="auto"):
  """[C, K] mean loss of every cluster model on every client's training examples."""

  def one_client(d):
    def one_model(variables):
      _, loss_sum = evaluation.evaluate_client(
        lambda v, x: model.apply(v, x, train=False), variables, d
      )
      return loss_sum / jnp.maximum(d.count, 1)

    return jax.vmap(one_model)(stacked)

  return parallel.map_clients(one_client, (data,), chunk_size, parallelism)


def one_hot_logits(cluster_ids, num_clusters: int):
  """Logit rows whose softmax is exactly one-hot on each client's cluster: [C, K]."""
  return jnp.where(jax.nn.one_hot(cluster_ids, num_clusters) > 0, 0.0, EXCLUDED_LOGIT)


def per_cluster_server(config) -> ServerUpdate:
  """Each model k steps by the n-weighted average of its members' updates; logits frozen."""
  return ServerUpdate(
    globals_tx=optax.chain(scale_by_inverse_model_mass(), optax.sgd(config.server_lr_globals)),
    logits_tx=optax.set_to_zero(),
    logit_gradient_params="all",
    logits_first=False,
  )


def make(model, config, num_clients, example_input):
  def assign(state, client_ids, data):
    losses = training_losses(
      model, state.globals, data, config.client_chunk_size, config.client_parallelism
    )
    return one_hot_logits(jnp.argmin(losses, axis=1), config.num_global_models)

  server = per_cluster_server(config)
  return fedmerge.make(
    model,
    config,
    num_clients,
    example_input,
    server_update=server,
    prox_mu=0.0,
    assign_logits=assign,
    models_down=config.num_global_models,
  )
