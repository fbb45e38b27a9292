"""The authors' logit step (server_optim.authors_logit_step) against a literal loop of their
update_W (github.com/shutong043/FedMerge, server_merging.py), and its use by `official` mode."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import server_optim
from fedmerge_jax.config import base_config


def update_w_loop(w, grad, p, learning_rate_w):
  """Their update_W after W_grad (here `grad`, without p): NumPy float64, as written."""
  w_grad = grad / np.sum(np.abs(grad))
  w_init = w.copy()
  n = 0
  while True:
    w = w - 0.01 * np.array(p).reshape(-1, 1) * w_grad
    n = n + 1
    if np.any(np.abs(w - w_init) > learning_rate_w) or n > 10000:
      break
  return w, n


def authors_move(w, grad, p, learning_rate_w):
  """Ours: the transformation receives p_i G_ij (the surrogate's gradient) and p; its step."""
  tx = server_optim.authors_logit_step(learning_rate_w)
  surrogate_grad = jnp.asarray(p[:, None] * grad, jnp.float32)
  updates, _ = tx.update(
    surrogate_grad, tx.init(w), jnp.asarray(w, jnp.float32), row_weights=jnp.asarray(p, jnp.float32)
  )
  return np.asarray(updates, np.float64)


def authors_step(w, grad, p, learning_rate_w):
  return np.asarray(w, np.float32) + authors_move(w, grad, p, learning_rate_w)


@pytest.mark.parametrize("case", ["skewed", "cap_binds", "large_lr", "rows_not_trained"])
def test_authors_step_matches_a_literal_loop(case):
  rng = np.random.default_rng(0)
  clients, k = 50, 5
  w = rng.normal(0, 0.3, (clients, k))
  p = rng.integers(50, 1000, clients).astype(np.float64)
  grad = rng.normal(0, 1, (clients, k)) * rng.exponential(1, (clients, 1))
  lr = 0.01
  if case == "cap_binds":  # Nearly uniform |p G|: 10,001 inner steps move less than lr.
    p = np.ones(clients)
    grad = np.sign(rng.normal(size=(clients, k))) * (1 + 0.01 * rng.random((clients, k)))
  if case == "large_lr":
    lr = 0.05
  if case == "rows_not_trained":  # Partial participation: zero rows, p = 0 there.
    p[::3], grad[::3] = 0.0, 0.0
  p = p / p.sum()
  want, n = update_w_loop(w, grad, p, lr)
  if case == "cap_binds":
    assert n == 10001 and np.abs(want - w).max() < lr
  else:
    assert n < 10001 and np.abs(want - w).max() > lr
  np.testing.assert_allclose(authors_step(w, grad, p, lr), want, rtol=1e-5, atol=1e-6)
  # The moves themselves, and so the number of inner steps (a cap of 10,000 instead of
  # 10,001 moves each entry 1e-4 less: below the tolerance on the logits' values above).
  move = authors_move(w, grad, p, lr)
  np.testing.assert_allclose(move, want - w, rtol=1e-5, atol=1e-9)
  inner_step = 0.01 * p[:, None] * grad / np.sum(np.abs(grad))
  moved = inner_step != 0
  np.testing.assert_array_equal(np.round(move[moved] / -inner_step[moved]), n)


def test_zero_gradient_leaves_the_logits():
  w, p = np.ones((4, 3)), np.full(4, 0.25)
  np.testing.assert_array_equal(authors_step(w, np.zeros((4, 3)), p, 0.01), w)


def test_official_mode_uses_the_chosen_logit_step():
  config = base_config()
  config.server_lr_logits = 0.01
  g = jnp.array([[1.0, -3.0], [0.5, 0.0]])
  p = jnp.array([0.75, 0.25])
  for name in server_optim.LOGIT_STEPS:
    config.logit_step = name
    tx = server_optim.make_server_update(config).logits_tx
    updates, _ = (
      tx.update(g, tx.init(g), g, row_weights=p)
      if name == "authors"
      else tx.update(g, tx.init(g), g)
    )
    if name == "max_normalized":  # One step; the largest entry moves by exactly lr.
      np.testing.assert_allclose(updates, -0.01 * g / 3.0, rtol=1e-6)
    else:  # G = g / p, sum|G| = 1/.75 + 3/.75 + .5/.25 = 7.333; inner step 0.01 g / 7.333.
      step = 0.01 * np.asarray(g) / (4 / 0.75 + 2.0)
      np.testing.assert_allclose(
        updates, -(np.floor(0.01 / np.abs(step).max()) + 1) * step, rtol=1e-6
      )
  config.logit_step = "max_normalised"
  with pytest.raises(ValueError, match="logit_step='max_normalised'"):
    server_optim.make_server_update(config)
