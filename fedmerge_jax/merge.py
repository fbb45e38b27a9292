"""FedMerge's merge and the server's gradients through it.

The server keeps K global models stacked along a leading axis (every leaf `[K, ...]`) and
a logit matrix A. A client's model is the softmax(A_i)-weighted sum of the globals. The
clients' updates Delta_i are pushed back through this merge by differentiating the
surrogate L(Theta, A) = sum_i p_i <stop_gradient(Delta_i), merge(Theta, A)_i>.

Every contraction runs at full float32 precision (`HIGHEST`): on NVIDIA GPUs JAX's default
for float32 matmuls is TF32, whose 10-bit mantissa would blur the merged models by ~1e-3.
"""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def merging_weights(logits: jax.Array) -> jax.Array:
  """Row softmax of client logits `[C, K]` -> merging weights `[C, K]`."""
  return jax.nn.softmax(logits, axis=-1)


def merge(stacked_params, weights: jax.Array):
  """theta_c = sum_k weights[c, k] * Theta_k, for every leaf: `[K, ...]` -> `[C, ...]`."""
  return jax.tree.map(
    lambda leaf: jnp.einsum("ck,k...->c...", weights.astype(leaf.dtype), leaf, precision=HIGHEST),
    stacked_params,
  )


def surrogate_loss(stacked_params, logits, deltas, sample_weights):
  """sum_i p_i <Delta_i, merge(Theta, softmax(A))_i>: its gradients are the server's."""
  merged = merge(stacked_params, merging_weights(logits))
  deltas = jax.lax.stop_gradient(deltas)
  per_client = sum(
    jnp.sum((d * m).reshape(d.shape[0], -1), axis=1)
    for d, m in zip(jax.tree.leaves(deltas), jax.tree.leaves(merged))
  )
  return jnp.sum(sample_weights * per_client)


def globals_gradients(stacked_params, logits, deltas, sample_weights):
  """dL/dTheta_j = sum_i p_i w_ij Delta_i: `jax.grad` of `surrogate_loss` (leaves [K, ...])."""
  return jax.grad(surrogate_loss)(stacked_params, logits, deltas, sample_weights)


def logit_gradients(stacked_params, logits, deltas, sample_weights):
  """dL/dA_ij = p_i w_ij <Delta_i, Theta_j - theta_i> (`[C, K]`), the globals' differences first.

  Autodiff of `surrogate_loss` computes <Delta_i, Theta_j> - <Delta_i, theta_i>: two float32
  sums over all parameters that cancel once the globals are close, late in training (0.1%
  apart: relative error ~5e-4). Here Theta_j - theta_i = sum_k w_ik (Theta_j - Theta_k), so
  G_ij = p_i w_ij sum_k w_ik <Delta_i, Theta_j - Theta_k>: each difference is exact, and
  the error stays below 1e-6 however close the globals are (tests/test_merge.py measures both
  against float64). Any pytrees with leaves `[K, ...]` and `[C, ...]` (e.g. the head only).
  """
  weights = merging_weights(logits)
  thetas = [leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(stacked_params)]
  rows = [leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(deltas)]

  def against(theta_j):  # [C, K]: <Delta_i, Theta_j - Theta_k>; one j at a time, K x P memory.
    return sum(
      jnp.einsum("cp,kp->ck", d, t_j - t, precision=HIGHEST)
      for d, t, t_j in zip(rows, thetas, theta_j)
    )

  inner = jax.lax.map(against, thetas)  # [K (j), C, K (k)]
  return (
    sample_weights[:, None] * weights * jnp.einsum("jck,ck->cj", inner, weights, precision=HIGHEST)
  )


def server_gradients(stacked_params, logits, deltas, sample_weights):
  """Plain chain-rule gradients (dL/dTheta, dL/dA) of `surrogate_loss`; dL/dA computed the
  stable way (`logit_gradients`).

  Args:
    stacked_params: pytree, leaves `[K, ...]`.
    logits: `[C, K]`, the logit rows of the C clients.
    deltas: pytree like `stacked_params` with leading axis C: theta_received - theta_trained.
    sample_weights: `[C]`, p_i.
  Returns:
    (grad_params with leaves `[K, ...]`, grad_logits `[C, K]`).
  """
  return (
    globals_gradients(stacked_params, logits, deltas, sample_weights),
    logit_gradients(stacked_params, logits, deltas, sample_weights),
  )
