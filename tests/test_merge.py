"""merge and server_gradients against the closed form, finite differences and float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax.merge import (
  logit_gradients,
  merge,
  merging_weights,
  server_gradients,
  surrogate_loss,
)


def _problem(c=4, k=3, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  stacked = {
    "a": jax.random.normal(keys[0], (k, 3, 2)),
    "b": {"c": jax.random.normal(keys[1], (k, 5))},
  }
  logits = jax.random.normal(keys[2], (c, k))
  deltas = {
    "a": jax.random.normal(keys[3], (c, 3, 2)),
    "b": {"c": jax.random.normal(keys[4], (c, 5))},
  }
  p = jnp.arange(1.0, c + 1.0)
  return stacked, logits, deltas, p / p.sum()


def test_merging_weights_are_row_softmax():
  logits = jnp.array([[0.0, 0.0], [1.0, -1.0]])
  w = merging_weights(logits)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[0], [0.5, 0.5])
  np.testing.assert_allclose(w[1, 0] / w[1, 1], np.exp(2.0), rtol=1e-5)


def test_merge_is_weighted_sum_per_leaf():
  stacked, logits, _, _ = _problem()
  w = merging_weights(logits)
  merged = merge(stacked, w)
  chex.assert_shape(merged["a"], (4, 3, 2))
  for c in range(4):
    expected = sum(w[c, k] * stacked["b"]["c"][k] for k in range(3))
    np.testing.assert_allclose(merged["b"]["c"][c], expected, rtol=1e-5, atol=1e-6)


def test_server_gradients_match_closed_form():
  stacked, logits, deltas, p = _problem()
  g_params, g_logits = server_gradients(stacked, logits, deltas, p)
  w = np.asarray(merging_weights(logits))
  merged = merge(stacked, jnp.asarray(w))
  flat = lambda tree, i: np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(tree)])
  for j in range(3):
    # dL/dTheta_j = sum_i p_i w_ij Delta_i
    expected = sum(p[i] * w[i, j] * flat(deltas, i) for i in range(4))
    np.testing.assert_allclose(flat(g_params, j), expected, rtol=1e-5, atol=1e-6)
    for i in range(4):
      # dL/dA_ij = p_i w_ij <Delta_i, Theta_j - theta_i>
      expected = p[i] * w[i, j] * flat(deltas, i) @ (flat(stacked, j) - flat(merged, i))
      np.testing.assert_allclose(g_logits[i, j], expected, rtol=1e-4, atol=1e-6)


def test_server_gradients_match_finite_differences():
  jax.config.update("jax_enable_x64", True)
  try:
    stacked, logits, deltas, p = jax.tree.map(lambda x: x.astype(jnp.float64), _problem(seed=1))
    g_params, g_logits = server_gradients(stacked, logits, deltas, p)
    f = lambda s, a: surrogate_loss(s, a, deltas, p)
    eps = 1e-6
    for i, j in [(0, 0), (2, 1), (3, 2)]:
      bump = jnp.zeros_like(logits).at[i, j].set(eps)
      fd = (f(stacked, logits + bump) - f(stacked, logits - bump)) / (2 * eps)
      np.testing.assert_allclose(g_logits[i, j], fd, rtol=1e-6, atol=1e-9)
    bump = jax.tree.map(jnp.zeros_like, stacked)
    bump["a"] = bump["a"].at[1, 2, 0].set(eps)
    plus = jax.tree.map(jnp.add, stacked, bump)
    minus = jax.tree.map(jnp.subtract, stacked, bump)
    fd = (f(plus, logits) - f(minus, logits)) / (2 * eps)
    np.testing.assert_allclose(g_params["a"][1, 2, 0], fd, rtol=1e-6, atol=1e-9)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_logit_gradient_keeps_its_precision_when_the_globals_are_close():
  """Globals 0.1% apart (late in training): the float32 logit gradient against float64 NumPy.
  jax.grad of the surrogate, the oracle elsewhere, loses ~1e-3 here to cancellation."""
  rng = np.random.default_rng(0)
  k, c, size = 5, 10, 20_000
  base = rng.normal(size=size)
  theta = (base + 1e-3 * rng.normal(size=(k, size))).astype(np.float32)
  delta = (0.01 * rng.normal(size=(c, size))).astype(np.float32)
  logits = rng.normal(size=(c, k)).astype(np.float32)
  p = rng.random(c).astype(np.float32)
  p /= p.sum()
  split = lambda a: {
    "kernel": a[:, : size // 2].reshape(a.shape[0], 100, -1),
    "bias": a[:, size // 2 :],
  }
  t64, d64, a64 = (x.astype(np.float64) for x in (theta, delta, logits))
  w = np.exp(a64 - a64.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  merged = w @ t64
  want = (
    p[:, None] * w * np.stack([[d64[i] @ (t64[j] - merged[i]) for j in range(k)] for i in range(c)])
  )
  error = lambda g: np.linalg.norm(np.asarray(g, np.float64) - want) / np.linalg.norm(want)
  stable = error(jax.jit(logit_gradients)(split(theta), logits, split(delta), p))
  autodiff = error(
    jax.jit(jax.grad(surrogate_loss, argnums=1))(split(theta), logits, split(delta), p)
  )
  print(
    f"logit gradient, relative error against float64: autodiff {autodiff:.1e}, "
    f"differences first {stable:.1e}"
  )  # docs/pages/concepts.md's numbers: pytest -s -k precision.
  assert stable < 2e-6, stable
  assert autodiff > 100 * stable, (autodiff, stable)  # The case is one where precision matters.


def test_server_contractions_run_at_full_float32_precision():
  """On NVIDIA GPUs float32 matmuls default to TF32 (10-bit mantissa): every contraction of
  the merge and the server gradients asks for HIGHEST precision, as the lowered program shows."""
  stacked, logits, deltas, p = _problem()
  text = jax.jit(server_gradients).lower(stacked, logits, deltas, p).as_text()
  text += jax.jit(merge).lower(stacked, merging_weights(logits)).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) >= 5
  assert all("precision = [HIGHEST, HIGHEST]" in line for line in dots), dots
