"""FLOP counting: XLA's count of one SGD step, and the machine's measured matmul peak."""

import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from fedmerge_jax import models
from fedmerge_jax.benchmark.reference import sgd_step_fn


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
  """Best-of-`repeats` GFLOP/s of a jitted `a @ b` of two n x n `dtype` matrices (float32 at
  JAX's default precision: TF32 on NVIDIA GPUs, as the models' f32 matmuls run)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def cost_flops(compiled) -> Optional[float]:
  """'flops' from a compiled computation's cost analysis (dict or list of dicts), or None."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def train_step_flops(
  config, example_shape: Tuple[int, ...], num_classes: int, batch_size: int
) -> Optional[float]:
  """XLA's FLOP count of one SGD step (forward + backward of mean CE) on one batch."""
  model = models.get_model(config.model, num_classes)
  x = jnp.zeros((batch_size, *example_shape), jnp.float32)
  y = jnp.zeros((batch_size,), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  step = jax.jit(sgd_step_fn(model, config.client_lr))
  return cost_flops(step.lower(variables, x, y, rng).compile())
