"""FedMerge's merge and the server's gradients through it.

The server keeps K global models stacked along a leading axis (every leaf `[K, ...]`) and
a logit matrix A. A client's model is the softmax(A_i)-weighted sum of the globals. The
clients' updates Delta_i are pushed back through this merge by differentiating the
surrogate L(Theta, A) = sum_i p_i <stop_gradient(Delta_i), merge(Theta, A)_i>.
"""

import jax
import jax.numpy as jnp


def merging_weights(logits: jax.Array) -> jax.Array:
  """Row softmax of client logits `[C, K]` -> merging weights `[C, K]`."""
  return jax.nn.softmax(logits, axis=-1)


def merge(stacked_params, weights: jax.Array):
  """theta_c = sum_k weights[c, k] * Theta_k, for every leaf: `[K, ...]` -> `[C, ...]`."""
  return jax.tree.map(
      lambda leaf: jnp.einsum("ck,k...->c...", weights.astype(leaf.dtype), leaf), stacked_params)


def surrogate_loss(stacked_params, logits, deltas, sample_weights):
  """sum_i p_i <Delta_i, merge(Theta, softmax(A))_i>: its gradients are the server's."""
  merged = merge(stacked_params, merging_weights(logits))
  deltas = jax.lax.stop_gradient(deltas)
  per_client = sum(
      jnp.sum((d * m).reshape(d.shape[0], -1), axis=1)
      for d, m in zip(jax.tree.leaves(deltas), jax.tree.leaves(merged)))
  return jnp.sum(sample_weights * per_client)


def server_gradients(stacked_params, logits, deltas, sample_weights):
  """Plain chain-rule gradients (dL/dTheta, dL/dA) of `surrogate_loss`.

  Args:
    stacked_params: pytree, leaves `[K, ...]`.
    logits: `[C, K]`, the logit rows of the C clients.
    deltas: pytree like `stacked_params` with leading axis C: theta_received - theta_trained.
    sample_weights: `[C]`, p_i.
  Returns:
    (grad_params with leaves `[K, ...]`, grad_logits `[C, K]`).
  """
  return jax.grad(surrogate_loss, argnums=(0, 1))(stacked_params, logits, deltas, sample_weights)
