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


def personal_rounds(apply_fn, variables, data: client_lib.ClientData, key, local, config,
                    takes_mask: bool = False):
  """One client's pFedMe local training from w; returns (w_i, theta, metrics).

  `takes_mask`: whether `apply_fn` accepts BatchNorm's real-row mask (`models.takes_mask`).
  """
  client_lib.check_takes_mask(variables, takes_mask)
  data = client_lib.ClientData(*map(jnp.asarray, data))
  count = data.count
  order = client_lib.epoch_orders(jax.random.fold_in(key, 0), count, data.x.shape[0],
                                  local.local_epochs)
  dropout_key = jax.random.fold_in(key, 1)
  lam, lr, l2 = config.pfedme_lambda, config.pfedme_personal_lr, config.pfedme_l2

  def batch_step(carry):
    t, w, theta, other, loss_sum = carry
    epoch, slot, mask = client_lib.batch_slots(t, count, local)
    idx = order[epoch, slot]

    def inner(i, inner_carry):
      theta, other, _ = inner_carry
      rng = jax.random.fold_in(jax.random.fold_in(dropout_key, t), i)
      (loss, other), grads = jax.value_and_grad(
          lambda p: client_lib.batch_loss(apply_fn, p, other, data, idx, mask, rng,
                                          takes_mask=takes_mask, compute_dtype=local.compute_dtype),
          has_aux=True)(theta)
      theta = jax.tree.map(lambda th, g, wi: th - lr * (g + lam * (th - wi) + l2 * th),
                           theta, grads, w)
      return theta, dict(other), loss

    theta, other, loss = jax.lax.fori_loop(
        0, config.pfedme_inner_steps, inner, (theta, other, jnp.zeros((), jnp.float32)))
    w = jax.tree.map(lambda wi, th: wi - local.client_lr * lam * (wi - th), w, theta)
    return t + 1, w, theta, other, loss_sum + loss

  params = variables["params"]
  other = {k: v for k, v in variables.items() if k != "params"}
  steps = client_lib.num_local_steps(count, local)
  init = (jnp.zeros((), jnp.int32), params, params, other, jnp.zeros((), jnp.float32))
  _, w, theta, other, loss_sum = jax.lax.while_loop(lambda c: c[0] < steps, batch_step, init)
  metrics = {"train_loss": loss_sum / jnp.maximum(steps, 1)}  # theta's loss at its last inner step.
  return {"params": w, **other}, {"params": theta, **other}, metrics


def make(model, config, num_clients, example_input):
  local = base.local_config(config, prox_mu=0.0)
  predict = base.model_predict(model)
  takes_mask = models_lib.takes_mask(model)

  def init(rng) -> State:
    variables = flax.core.unfreeze(model.init(rng, example_input[None]))
    return State(variables, broadcast(variables, num_clients))

  def round_fn(state: State, client_ids, data, rng):
    def one(d, key):
      w_i, theta, metrics = personal_rounds(model.apply, state.global_model, gap.train_part(d),
                                            key, local, config, takes_mask)
      delta = jax.tree.map(jnp.subtract, state.global_model, w_i)
      return delta, theta, gap.probe(metrics, predict, theta, d)

    def summarize(chunk, outputs):
      """sum_i p_i (w - w_i) over a chunk: never every client's w_i at once."""
      deltas, theta, metrics = outputs
      weights = chunk[0].count.astype(jnp.float32) / total  # p_i = n_i / n_S over the round.
      return jax.tree.map(lambda d: jnp.einsum("c,c...->...", weights, d), deltas), (theta, metrics)

    total = jnp.maximum(jnp.sum(data.count.astype(jnp.float32)), 1.0)
    mean_delta, (theta, metrics) = parallel.map_clients(
        one, (data, base.client_keys(rng, client_ids)), config.client_chunk_size,
        config.client_parallelism, reduce=summarize)
    beta = config.pfedme_beta  # w <- (1 - beta) w + beta sum p_i w_i = w - beta sum p_i (w - w_i).
    global_model = jax.tree.map(lambda w, d: w - beta * d, state.global_model, mean_delta)
    return (State(global_model, scatter(state.personal, client_ids, theta)),
            base.training_metrics(data, metrics))

  def personalized(state: State, client_ids, train_data):
    del train_data
    return jax.tree.map(lambda x: x[client_ids], state.personal)

  def received(state: State, client_ids, train_data):
    del train_data
    return broadcast(state.global_model, client_ids.shape[0])  # The server sends w (gap metric).

  size = base.model_floats(model, example_input)
  return base.Algorithm(init=init, round=round_fn, personalized=personalized, predict=predict,
                        communication=(size, size), received=received,
                        client_rows=lambda state: State(base.whole_leaves(state.global_model),
                                                        base.row_leaves(state.personal, num_clients)))
