"""FedEM (Marfoq et al. 2021): K shared components, per-client mixture weights by EM.

A client predicts with the mixture sum_k pi_ik p_k(y|x) of its components' outputs (the
mixture-of-experts family). Each round a sampled client runs, on its own data:
  E-step: q_k(x) = pi_k p_k(y|x) / sum_j pi_j p_j(y|x); pi_k <- mean over examples of q_k(x);
  M-step: E epochs of SGD on sum_k q_k(x) CE(h_k(x), y), all K components at once;
and the server averages each component's updates over clients, weighted by n_i.

Under client sampling this follows the reference implementation (omarfoq/FedEM,
`CentralizedAggregator.mix`): the server averages every client's copy of each component
with weights n_i / (sum of n over the whole population), and an unsampled client's copy is
the last global component, unchanged. So Theta_k <- Theta_k - sum_{i sampled} n_i / n_total
* Delta_ik: the step shrinks with the share of data sampled. Only sampled clients update
their pi. With all clients sampled this is the plain n_i-weighted average.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fedmerge_jax import client as client_lib
from fedmerge_jax import gap
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base
from fedmerge_jax.algorithms.fedavg import averaging_server
from fedmerge_jax.algorithms.fedmerge import init_stacked


@flax.struct.dataclass
class State:
  components: Any  # K shared models, leaves [K, ...].
  mixture: jax.Array  # [N, K] every client's mixture weights pi.
  opt_state: Any


def component_log_likelihoods(model, components, x, y):
  """[n, K] log p_k(y | x) of every component on every example."""
  logits = jax.vmap(lambda v: model.apply(v, x, train=False))(components)  # [K, n, C]
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_p, y[None, :, None], axis=-1)[..., 0].T


def e_step(model, components, mixture_row, data: client_lib.ClientData):
  """(responsibilities q [max_n, K], new pi [K]) over the client's real examples."""
  log_joint = component_log_likelihoods(model, components, data.x, data.y) + jnp.log(mixture_row)
  q = jax.nn.softmax(log_joint, axis=-1)
  real = (jnp.arange(data.y.shape[0]) < data.count)[:, None]
  pi = jnp.sum(q * real, axis=0) / jnp.maximum(data.count, 1)
  return q, jnp.where(data.count > 0, pi, mixture_row)


def component_apply(model, num_components: int):
  """All K components on one batch: outputs [K, B, classes] (and their new state).

  Each component draws its own randomness (dropout masks): every key in `rngs` is split
  into K, one per component. Other arguments (`train`, `mutable`, BatchNorm's `mask`) reach
  every component alike; the caller tells local training whether `model` takes a mask.
  """

  def stacked_apply(variables, x, rngs=None, **kwargs):
    if not rngs:
      return jax.vmap(lambda v: model.apply(v, x, **kwargs))(variables)
    keys = {name: jax.random.split(key, num_components) for name, key in rngs.items()}
    return jax.vmap(lambda v, r: model.apply(v, x, rngs=r, **kwargs))(variables, keys)

  return stacked_apply


def make(model, config, num_clients, example_input, total_train_examples=None):
  """FedEM for `num_clients`; `total_train_examples` (sum of n over the population) scales
  the server step as the reference does under sampling (None: the sampled clients' sum,
  i.e. full participation's average whoever is sampled)."""
  k_models = config.num_global_models
  server = averaging_server(config).globals_tx
  local = base.local_config(config, prox_mu=0.0)
  size = base.num_floats(jax.eval_shape(lambda: model.init(jax.random.key(0), example_input[None])))

  stacked_apply = component_apply(model, k_models)

  def population_weights(data):
    """n_i / n_total: the reference's weights (the sampled share if the total is unknown)."""
    if total_train_examples is None:
      return base.sample_weights(data)
    return data.count.astype(jnp.float32) / total_train_examples

  def init(rng) -> State:
    components = init_stacked(model, rng, k_models, example_input)
    mixture = jnp.full((num_clients, k_models), 1.0 / k_models, jnp.float32)
    return State(components, mixture, server.init(components))

  def train_one(components, mixture_row, data, key):
    q, pi = e_step(model, components, mixture_row, data)

    def weighted_loss(outputs, labels, idx):
      ce = jax.vmap(lambda out: optax.softmax_cross_entropy_with_integer_labels(out, labels))(
        outputs
      )
      return jnp.sum(q[idx].T * ce, axis=0)

    delta, metrics = client_lib.local_train(
      stacked_apply,
      components,
      gap.train_part(data),
      key,
      local,
      example_loss=weighted_loss,
      takes_mask=models.takes_mask(model),
    )
    trained = (jax.tree.map(jnp.subtract, components, delta), pi)  # Gap metric (gap.py) only.
    return delta, pi, gap.probe(metrics, predict, trained, data)

  def round_fn(state: State, client_ids, data, rng):
    def summarize(chunk, outputs):
      """sum_i p_i Delta_i over a chunk (never all clients' deltas at once); pi, metrics."""
      deltas, pi, metrics = outputs
      return jax.tree.map(lambda d: jnp.einsum("c,c...->...", chunk[1], d), deltas), (pi, metrics)

    p = population_weights(data)
    grad, (mixture, client_metrics) = parallel.map_clients(
      lambda pi, _, d, k: train_one(state.components, pi, d, k),
      (state.mixture[client_ids], p, data, base.client_keys(rng, client_ids)),
      config.client_chunk_size,
      config.client_parallelism,
      reduce=summarize,
    )
    updates, opt_state = server.update(
      grad, state.opt_state, state.components, model_mass=jnp.ones((k_models,))
    )
    state = State(
      optax.apply_updates(state.components, updates),
      state.mixture.at[client_ids].set(mixture),
      opt_state,
    )
    return state, base.training_metrics(data, client_metrics)

  def personalized(state: State, client_ids, train_data):
    del train_data
    n = client_ids.shape[0]
    components = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), state.components)
    return components, state.mixture[client_ids]

  def predict(personal, x):
    components, mixture_row = personal
    logits = stacked_apply(components, x, train=False)  # [K, B, classes]
    log_mix = jax.nn.logsumexp(
      jax.nn.log_softmax(logits, -1) + jnp.log(mixture_row)[:, None, None], axis=0
    )
    return log_mix  # log sum_k pi_k p_k(y|x): its softmax is the mixture itself.

  return base.Algorithm(
    init=init,
    round=round_fn,
    personalized=personalized,
    predict=predict,
    communication=(k_models * size, k_models * size),
    merging_weights=lambda state, ids, train: state.mixture[ids],
    client_rows=lambda state: State(
      base.whole_leaves(state.components), True, base.whole_leaves(state.opt_state)
    ),
  )
