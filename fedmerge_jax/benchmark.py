"""Times federated rounds on synthetic data and compares them with the matmul peak.

  python -m fedmerge_jax.benchmark --algorithm=fedavg,fedmerge --model=emnist_cnn \
      --num_global_models=5 --clients=10 --examples_per_client=200 --batch_size=20 \
      --local_epochs=1 --conv_impl=auto --client_chunk_size=0 --rounds=5 --seed=0

Prints one JSON line per algorithm: the median round time (after one warm-up round that
includes compilation, reported as `compile_s`), examples/s, the training step's FLOPs
per example from XLA's cost analysis, and the achieved fraction of the f32 matmul peak.
"""

import json
import statistics
import time
from typing import Any, Dict, Optional, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import models
from fedmerge_jax import train
from fedmerge_jax.models.layers import CONV_IMPLS, resolve_conv_impl

FLAGS = flags.FLAGS
flags.DEFINE_list("algorithm", ["fedmerge"], "Comma-separated algorithms, run in turn.")
flags.DEFINE_integer("num_global_models", 5, "K for fedmerge (fedavg always uses 1).",
                     lower_bound=1)
flags.DEFINE_enum("model", "emnist_cnn", models.MODEL_NAMES, "Model name.")
flags.DEFINE_integer("clients", 10, "Number of clients, all trained every round.", lower_bound=1)
flags.DEFINE_integer("examples_per_client", 200, "Training examples per client.", lower_bound=1)
flags.DEFINE_integer("batch_size", 20, "Local batch size.", lower_bound=1)
flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.", lower_bound=1)
flags.DEFINE_enum("conv_impl", "auto", CONV_IMPLS, "Convolution implementation.")
flags.DEFINE_integer("client_chunk_size", 0, "Clients trained at once; 0: all.", lower_bound=0)
flags.DEFINE_integer("rounds", 5, "Timed rounds, after one warm-up (compile) round.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for data, init and rounds.")

NUM_CLASSES = 62
TEST_EXAMPLES_PER_CLIENT = 10
EXAMPLE_SHAPES = {"emnist_cnn": (28, 28, 1), "leaf_femnist_cnn": (28, 28, 1), "mlp": (8, 8, 1)}


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Best-of-`repeats` GFLOP/s of a jitted f32 `a @ b` of two n x n matrices."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def synthetic_data(example_shape: Tuple[int, ...], num_clients: int, examples_per_client: int,
                   seed: int) -> data_lib.FederatedData:
  """Random-normal inputs with random labels in [0, NUM_CLASSES), per client."""
  rng = np.random.default_rng(seed)

  def split(n):
    return {f"client_{i}": (rng.standard_normal((n, *example_shape)).astype(np.float32),
                            rng.integers(0, NUM_CLASSES, n).astype(np.int32))
            for i in range(num_clients)}

  return data_lib.FederatedData.from_arrays(
      split(examples_per_client), split(TEST_EXAMPLES_PER_CLIENT), num_classes=NUM_CLASSES,
      name="synthetic")


def make_config(algorithm: str):
  """The resolved config for `algorithm` from the command-line flags."""
  config = config_lib.base_config()
  config.algorithm = algorithm
  config.num_global_models = FLAGS.num_global_models
  config.model.name = FLAGS.model
  config.model.conv_impl = FLAGS.conv_impl
  config.local_epochs = FLAGS.local_epochs
  config.batch_size = FLAGS.batch_size
  config.client_chunk_size = FLAGS.client_chunk_size
  config.clients_per_round = 0
  config.seed = FLAGS.seed
  return config_lib.resolve(config)


def time_rounds(config, data: data_lib.FederatedData, num_rounds: int) -> Tuple[float, float]:
  """(compile + first round seconds, median seconds of `num_rounds` further rounds)."""
  _, alg = train.build(config, data)
  init_rng, round_rng = jax.random.split(jax.random.key(config.seed))
  state = jax.jit(alg.init)(init_rng)
  jax.block_until_ready(state)
  round_fn = jax.jit(alg.round, donate_argnums=0)
  ids = np.arange(data.num_clients)
  batch = data.train.gather(ids)

  def one_round(state, r):
    start = time.perf_counter()
    state, _ = round_fn(state, ids, batch, jax.random.fold_in(round_rng, r))
    jax.block_until_ready(state)
    return state, time.perf_counter() - start

  state, compile_s = one_round(state, 0)
  times = []
  for r in range(1, num_rounds + 1):
    state, seconds = one_round(state, r)
    times.append(seconds)
  return compile_s, statistics.median(times)


def cost_flops(compiled) -> Optional[float]:
  """'flops' from a compiled computation's cost analysis (dict or list of dicts), or None."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def train_step_flops(config, example_shape: Tuple[int, ...], batch_size: int) -> Optional[float]:
  """XLA's FLOP count of one SGD step (forward + backward of mean CE) on one batch."""
  model = models.get_model(config.model, NUM_CLASSES)
  x = jnp.zeros((batch_size, *example_shape), jnp.float32)
  y = jnp.zeros((batch_size,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]

  def loss_fn(params, x, y, rng):
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def sgd_step(params, x, y, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, rng)
    return jax.tree.map(lambda p, g: p - config.client_lr * g, params, grads), loss

  rng = jax.eval_shape(lambda: jax.random.key(0))
  return cost_flops(jax.jit(sgd_step).lower(params, x, y, rng).compile())


def benchmark(config, data: data_lib.FederatedData, peak_gflops: float) -> Dict[str, Any]:
  """One JSON-ready result row for the resolved `config` on `data`."""
  algorithm = config.algorithm
  compile_s, round_s = time_rounds(config, data, FLAGS.rounds)
  step_flops = train_step_flops(config, data.example_shape, config.batch_size)
  flops_per_example = None if step_flops is None else step_flops / config.batch_size
  examples_per_s = data.num_clients * FLAGS.examples_per_client * config.local_epochs / round_s
  achieved = None if flops_per_example is None else examples_per_s * flops_per_example / 1e9
  return {
      "algorithm": algorithm,
      "model": config.model.name,
      "num_global_models": 1 if algorithm == "fedavg" else config.num_global_models,
      "clients": data.num_clients,
      "examples_per_client": FLAGS.examples_per_client,
      "batch_size": config.batch_size,
      "local_epochs": config.local_epochs,
      "conv_impl": resolve_conv_impl(config.model.conv_impl),
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "round_s": round_s,
      "compile_s": compile_s,
      "examples_per_s": examples_per_s,
      "flops_per_example": flops_per_example,
      "achieved_gflops": achieved,
      "matmul_peak_gflops": peak_gflops,
      "fraction_of_peak": None if achieved is None else achieved / peak_gflops,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  configs = [make_config(algorithm) for algorithm in FLAGS.algorithm]  # Fail fast.
  peak = matmul_peak_gflops()
  data = synthetic_data(EXAMPLE_SHAPES[FLAGS.model], FLAGS.clients, FLAGS.examples_per_client,
                        FLAGS.seed)
  for config in configs:
    print(json.dumps(benchmark(config, data, peak)), flush=True)


if __name__ == "__main__":
  app.run(main)
