"""pFedMe (T. Dinh et al. 2020): personal models theta_i bound to the global w by a Moreau envelope.

Follows the authors' code (CharlieDinh/pFedMe, `UserpFedMe.train`, `pFedMeOptimizer`,
`Server.persionalized_aggregate_parameters`). A client receives w and sets both its local
copy w_i and its personal model theta to it; then for every batch:
  K times: theta <- theta - personal_lr (grad f(theta; batch) + lambda (theta - w_i) + l2 theta);
  once:    w_i  <- w_i - eta lambda (w_i - theta)        (eta = config.client_lr);
and the server sets w <- (1 - beta) w + beta sum_i n_i / n_S w_i. A client predicts with its
theta from the last round it trained (the reference's `persionalized_model_bar`).
`config.pfedme_*` hold lambda, K, personal_lr, beta and the l2 term (the reference's defaults:
15, 5, 0.09, 1, and its optimizer's mu = 0.001).

Where this differs from the reference, and why:
- Partial participation: the reference trains *every* client each round and only averages
  the sampled ones' w_i. Here only the sampled clients train (the engine's meaning of a
  round, and what every other method does); an unsampled client keeps its last theta.
- Local work: the reference's `local_epochs` (R = 20) counts batches; here a client runs
  the engine's batching (`local_epochs` epochs of ceil(n/B) batches, a partial last one),
  so clients of different sizes do their own amount of work, as in every other method.
- BatchNorm: the reference's models have none. Here the statistics follow theta's forward
  passes (K per batch, as PyTorch's train mode would), and w_i carries theta's at the end.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from fedmerge_jax import client as client_lib
from fedmerge_jax import gap
from fedmerge_jax import models as models_lib
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base
from fedmerge_jax.algorithms.local import broadcast, scatter


@flax.struct.dataclass
class State:
  global_model: Any  # w: one model's variables.
  personal: Any  # Every client's theta, leaves [N, ...].


THETA = "pfedme_theta"  # theta rides through local training's carry as a collection of its own.


def moreau_objective(config):
  """`client.local_train`'s step objective for pFedMe, training w_i as its params.

  Per batch: `pfedme_inner_steps` steps of theta (carried in the THETA collection) on the
  batch's loss + lambda/2 ||theta - w_i||^2 + l2/2 ||theta||^2; then a loss whose gradient in
  w_i is lambda (w_i - theta), so that local_train's SGD step at client_lr is the reference's
  w_i <- w_i - eta lambda (w_i - theta), and whose value is theta's batch loss at its last
  inner step (the reported train loss).
  """
  lam, lr, l2 = config.pfedme_lambda, config.pfedme_personal_lr, config.pfedme_l2

  def objective(batch_loss, w, other, idx, mask, rng):
    theta = other[THETA]
    stats = {k: v for k, v in other.items() if k != THETA}  # BatchNorm's follow theta's passes.
    w_now = jax.lax.stop_gradient(w)  # So theta, hence the pull's target, is constant in w.

    def inner(i, carry):
      theta, stats, _ = carry
      (loss, stats), grads = jax.value_and_grad(batch_loss, has_aux=True)(
        theta, stats, idx, mask, jax.random.fold_in(rng, i)
      )
      theta = jax.tree.map(
        lambda th, g, wi: th - lr * (g + lam * (th - wi) + l2 * th), theta, grads, w_now
      )
      return theta, dict(stats), loss

    theta, stats, loss = jax.lax.fori_loop(
      0, config.pfedme_inner_steps, inner, (theta, stats, jnp.zeros((), jnp.float32))
    )
    pull = 0.5 * lam * client_lib.squared_distance(w, theta)
    value = loss + (pull - jax.lax.stop_gradient(pull))  # The gradient of pull, the value of loss.
    return value, {**stats, THETA: theta}

  return objective


def make(model, config, num_clients, example_input):
  local = base.local_config(config, prox_mu=0.0)
  predict = base.model_predict(model)
  takes_mask = models_lib.takes_mask(model)

  def init(rng) -> State:
    variables = flax.core.unfreeze(model.init(rng, example_input[None]))
    return State(variables, broadcast(variables, num_clients))

  def round_fn(state: State, client_ids, data, rng):
    def one(d, key):
      w = state.global_model  # w_i and theta both start from it.
      delta, metrics = client_lib.local_train(
        model.apply,
        {**w, THETA: w["params"]},
        gap.train_part(d),
        key,
        local,
        takes_mask=takes_mask,
        objective=moreau_objective(config),
      )
      theta_delta = delta.pop(THETA)  # w - theta; the rest is w - w_i (statistics: theta's).
      theta = {
        k: jax.tree.map(jnp.subtract, w[k], theta_delta if k == "params" else delta[k]) for k in w
      }
      return delta, theta, gap.probe(metrics, predict, theta, d)

    def summarize(chunk, outputs):
      """sum_i p_i (w - w_i) over a chunk: never every client's w_i at once."""
      deltas, theta, metrics = outputs
      weights = chunk[0].count.astype(jnp.float32) / total  # p_i = n_i / n_S over the round.
      return jax.tree.map(lambda d: jnp.einsum("c,c...->...", weights, d), deltas), (theta, metrics)

    total = jnp.maximum(jnp.sum(data.count.astype(jnp.float32)), 1.0)
    mean_delta, (theta, metrics) = parallel.map_clients(
      one,
      (data, base.client_keys(rng, client_ids)),
      config.client_chunk_size,
      config.client_parallelism,
      reduce=summarize,
    )
    beta = config.pfedme_beta  # w <- (1 - beta) w + beta sum p_i w_i = w - beta sum p_i (w - w_i).
    global_model = jax.tree.map(lambda w, d: w - beta * d, state.global_model, mean_delta)
    return (
      State(global_model, scatter(state.personal, client_ids, theta)),
      base.training_metrics(data, metrics),
    )

  def personalized(state: State, client_ids, train_data):
    del train_data
    return jax.tree.map(lambda x: x[client_ids], state.personal)

  def received(state: State, client_ids, train_data):
    del train_data
    return broadcast(state.global_model, client_ids.shape[0])  # The server sends w (gap metric).

  size = base.model_floats(model, example_input)
  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=predict,
    communication=(size, size),
    received=received,
    client_rows=lambda state: State(
      base.whole_leaves(state.global_model), base.row_leaves(state.personal, num_clients)
    ),
  )
