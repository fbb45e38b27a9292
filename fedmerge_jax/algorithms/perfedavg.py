"""Per-FedAvg (Fallah et al. 2020): FedAvg on the MAML objective; one local step at test.

Follows the paper (Algorithm 1 and its first-order and Hessian-free variants). Each local
step of a sampled client draws a batch D and a batch D' and takes
  w_tmp = w - alpha grad f_i(w; D)
  w <- w - beta grad f_i(w_tmp; D')                                 ('fo', first order)
  w <- w - beta (I - alpha Hess f_i(w; D)) grad f_i(w_tmp; D')     ('hf')
with alpha = `config.perfedavg_alpha`, beta = `client_lr`; the server averages the sampled
clients' models (FedAvg's rule; the paper's Algorithm 1 samples a fraction of users each
round and averages theirs, as here; unsampled users hold no state). A client predicts
with its model after one gradient step of size alpha on its own training data.
As in PFLlib's Per-FedAvg, a step's batch holds 2 x `batch_size` examples: D its first
half, D' its second (a partial last batch leaves D' short, or empty: then no step).

Where this differs from the paper, and why:
- Weights: the paper's Algorithm 1 writes a plain mean over the sampled users; here
  n_i / sum n, the engine's one averaging rule (the same on equal clients).
- 'hf' computes the Hessian-vector product exactly, by automatic differentiation, on D;
  the paper estimates it by finite differences on a third, independent batch D''. Exact
  and with no extra batch, it is MAML's own second-order gradient.
- 'hf' differentiates twice: it needs layers with a second derivative (on CPU set
  `model.conv_impl='xla'`; the canonical convolutions' hand-written backward has none).
- The test-time step uses all the client's training examples (one full-batch step): the
  paper's one stochastic step, without its batch noise; deterministic per client.
"""

import jax
import jax.numpy as jnp

from fedmerge_jax import choices
from fedmerge_jax import client as client_lib
from fedmerge_jax import models as models_lib
from fedmerge_jax import parallel
from fedmerge_jax.algorithms import base, partial_sharing

VARIANTS = choices.PERFEDAVG_VARIANTS  # config.perfedavg_variant
ADAPT_STREAM = 0xADA  # Test-time step keys (dropout): fold_in(key(seed), this), then the id.


def maml_objective(alpha: float, first_order: bool):
  """A step's loss f(w - alpha grad f(w; D); D'), D / D' the batch's first / second half."""

  def objective(batch_loss, params, other, idx, mask, rng):
    half = mask.shape[0] // 2
    first = mask & (jnp.arange(mask.shape[0]) < half)
    inner_rng, outer_rng = jax.random.split(rng)
    # First order: the inner step sees constants, so nothing differentiates through it (and
    # layers with a hand-written backward, canonical convolutions, need no second derivative).
    inner = jax.lax.stop_gradient(params) if first_order else params
    grads, other = jax.grad(batch_loss, has_aux=True)(inner, other, idx, first, inner_rng)
    adapted = jax.tree.map(lambda p, g: p - alpha * g, params, grads)
    return batch_loss(adapted, other, idx, mask & ~first, outer_rng)

  return objective


def make(model, config, num_clients, example_input):
  local = base.local_config(config, prox_mu=0.0)._replace(batch_size=2 * config.batch_size)
  adapt_rng = jax.random.fold_in(jax.random.key(config.seed), ADAPT_STREAM)

  def adapt(models, train_data, client_ids):
    """Each client's model after one full-batch gradient step of size alpha on its data."""
    one_step = client_lib.LocalConfig(1, train_data.x.shape[1], config.perfedavg_alpha, 0.0)

    def one(variables, data, key):
      delta, _ = client_lib.local_train(
        model.apply, variables, data, key, one_step, takes_mask=models_lib.takes_mask(model)
      )
      return jax.tree.map(jnp.subtract, variables, delta)

    return parallel.map_clients(
      one,
      (models, train_data, base.client_keys(adapt_rng, client_ids)),
      config.client_chunk_size,
      config.client_parallelism,
    )

  return partial_sharing.make(
    model,
    config,
    num_clients,
    example_input,
    personal_mask=lambda v: jax.tree.map(lambda _: False, v),
    local=local,
    adapt=adapt,
    objective=maml_objective(config.perfedavg_alpha, config.perfedavg_variant == "fo"),
  )
