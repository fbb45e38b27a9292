"""Times federated rounds on synthetic data against a Python loop of jitted SGD steps.

  python -m fedmerge_jax.benchmark --algorithm=fedavg,fedmerge --model=emnist_cnn \
      --num_global_models=1,5,15 --clients=100 --clients_per_round=10 \
      --client_sizes=equal,femnist --examples_per_client=200 --batch_size=20 \
      --local_epochs=1 --rounds=5 --breakdown --scaling --scaling_clients=10,100,1000,3400 \
      --targets

`--client_sizes` names one or more workloads (comma-separated): `equal` (every client
`--examples_per_client`), `femnist` (FEMNIST-like writers, `femnist_sizes`),
`cifar100_cluster` (the paper split's 50 clients, `cifar100_cluster_sizes`), or one explicit
list of sizes (`--client_sizes=30,200,418`). Data is ragged (real examples only).

Prints JSON lines, each with a `kind`:
- `reference`: per model and workload, FedJAX's way of running a round (one jitted SGD step
  per batch of the client's own examples, called from a Python loop over clients and
  batches), on the same data and clients;
- `round`: per model, workload, algorithm and K, timed as train.py runs rounds (largest
  first, padded to the round's bucket): the median round time (after compiling every
  bucket, `compile_s`), `examples_per_s` (examples computed, padding included),
  `useful_examples_per_s` (real examples x epochs / second), `real_fraction` (real / computed,
  `computed_examples`), the sizes (min/median/mean/max), XLA's FLOPs per training example,
  the achieved fraction of the machine's f32 matmul peak and `speedup_vs_loop` (useful
  examples/s over the `reference` line's);
- `breakdown` (--breakdown): merge, local training, server update and evaluation, each
  jitted on its own from the algorithm's `RoundStages`, and the whole round;
- `scaling` (--scaling): per number of clients, in a fresh process (peak RSS only grows),
  the round time, peak host RSS and peak device memory (None where the backend has none);
- `targets` (--targets): each of the project's targets, the measured value, pass/fail,
  or, where this run did not measure it, the flags it `needs`.
"""

import functools
import glob
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmerge_jax import cli
from fedmerge_jax import client as client_lib
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import evaluation
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax import train
from fedmerge_jax.models.layers import CONV_IMPLS, resolve_conv_impl

FLAGS = flags.FLAGS
flags.DEFINE_list("algorithm", ["fedmerge"], "Comma-separated algorithms, run in turn.")
flags.DEFINE_list("num_global_models", ["5"], "K values for fedmerge (fedavg always uses 1).")
flags.DEFINE_list("model", ["emnist_cnn"], f"Comma-separated models from {models.MODEL_NAMES}.")
flags.DEFINE_integer("clients", 10, "Clients in the population of `equal` and `femnist` sizes.",
                     lower_bound=1)
flags.DEFINE_integer("clients_per_round", 0, "Clients sampled a round (0: all, every round).",
                     lower_bound=0)
flags.DEFINE_list("client_sizes", ["equal"],
                  "Workloads: equal|femnist|cifar100_cluster (comma-separated), or one "
                  "comma-separated list of client sizes.")
flags.DEFINE_integer("examples_per_client", 200, "Training examples per client of `equal`.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 20, "Local batch size.", lower_bound=1)
flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.", lower_bound=1)
flags.DEFINE_enum("local_batching", "epoch", client_lib.BATCHINGS,
                  "'epoch' (PyTorch DataLoader) or 'stream' (FedJAX); see client.py.")
flags.DEFINE_enum("data_dtype", "float32", ["float32", "float16"], "Synthetic pixels' dtype.")
flags.DEFINE_enum("conv_impl", "auto", CONV_IMPLS, "Convolution implementation.")
flags.DEFINE_integer("client_chunk_size", 0, "Clients held (vmap: trained) at once; 0: all.",
                     lower_bound=0)
flags.DEFINE_enum("client_parallelism", "auto", parallel.CLIENT_PARALLELISMS,
                  "How clients run (see parallel.py).")
flags.DEFINE_integer("rounds", 5, "Timed rounds, after one warm-up (compile) round.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for data, init and rounds.")
flags.DEFINE_bool("reference", True, "Also time the Python loop of jitted steps (FedJAX's way).")
flags.DEFINE_enum("reference_conv_impl", "xla", CONV_IMPLS,
                  "The reference's convolutions: 'xla' is what FedJAX's models use.")
flags.DEFINE_bool("breakdown", False, "Time merge, training, server update, evaluation apart.")
flags.DEFINE_bool("scaling", False, "Time rounds and measure memory for --scaling_clients.")
flags.DEFINE_list("scaling_clients", ["10", "100", "1000", "3400"], "Clients per round to scale.")
flags.DEFINE_integer("scaling_rounds", 1, "Timed rounds per scale (after compiling).",
                     lower_bound=1)
flags.DEFINE_integer("scaling_worker", 0, "Internal: run one scale in this process.")
flags.DEFINE_bool("targets", False, "Print a line checking the measurements against targets.")
flags.DEFINE_list("image_shape", [], "Synthetic examples' shape H,W,C instead of the model's "
                  "default (MODELS), e.g. 32,32,3 for the CIFAR-10 shape.")
flags.DEFINE_integer("num_classes", 0, "Synthetic labels' classes instead of the model's "
                     "default (0).", lower_bound=0)
flags.DEFINE_integer("peak_size", 2048, "Matrix size of the matmul that measures peak FLOP/s.")
flags.DEFINE_enum("compute_dtype", "float32", client_lib.COMPUTE_DTYPES,
                  "config.compute_dtype: local training's and evaluation's activations and matmuls.")
flags.DEFINE_enum("local_loop", "auto", parallel.LOCAL_LOOP_CHOICES,
                  "config.local_loop: 'while' | 'static' (fixed trip count) | 'auto'.")
flags.DEFINE_integer("local_unroll", 1, "config.local_unroll: steps per 'static' loop iteration.",
                     lower_bound=1)
flags.DEFINE_enum("command_buffers", "default", tuple(parallel.COMMAND_BUFFERS),
                  "config.command_buffers: XLA:GPU command buffers (CUDA graphs); GPU only.")
flags.DEFINE_integer("profile_kernels", 0, "After timing, trace one more round with the "
                     "profiler and report its top this many kernels by device time (0: off).",
                     lower_bound=0)

# Per model: (example shape, classes). 'mlp' is sized for the 8x8 digits data.
MODELS = {"mlp": ((8, 8, 1), 10), "emnist_cnn": ((28, 28, 1), 62),
          "leaf_femnist_cnn": ((28, 28, 1), 62), "resnet9": ((32, 32, 3), 100)}
WORKLOADS = ("equal", "femnist", "cifar100_cluster")
TEST_EXAMPLES_PER_CLIENT = 10
FEDJAX_EXAMPLES_PER_S = 1400  # FedJAX 0.0.17, EMNIST CNN, 10 x 200, batch 20, 2-core CPU.
TARGET_SETTING = {"model": "emnist_cnn", "clients": 10, "examples_per_client": 200,
                  "batch_size": 20, "local_epochs": 1}
# The unequal-clients targets: FEMNIST-like writers, 10 a round of 100, against equal sizes.
UNEQUAL_SETTING = {"model": "emnist_cnn", "batch_size": 20, "local_epochs": 1}
UNEQUAL_FLAGS = ("--model=emnist_cnn --batch_size=20 --local_epochs=1 --clients=100 "
                 "--clients_per_round=10")
MEMORY_BUDGET_BYTES = 24 * 2**30
# femnist_sizes: log-normal(FEMNIST_LOG_MEAN, FEMNIST_LOG_STD) rounded, clipped to
# [FEMNIST_MIN, FEMNIST_MAX]: 100 clients of seed 0 hold 56..418, median 184, mean 206.
FEMNIST_LOG_MEAN, FEMNIST_LOG_STD, FEMNIST_MIN, FEMNIST_MAX = 5.18, 0.5, 20, 418
CIFAR100_CLUSTER_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       "configs", "cifar100_cluster.py")


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


def femnist_sizes(num_clients: int, seed: int) -> np.ndarray:
  """[N] training-set sizes shaped like FEMNIST's writers (tens to 400+, mean ~206):
  a seeded log-normal (log-mean 5.18, log-std 0.5) rounded and clipped to [20, 418]
  (100 clients, seed 0: 56 to 418, median 184, mean 206)."""
  rng = np.random.default_rng(seed)
  sizes = np.rint(rng.lognormal(FEMNIST_LOG_MEAN, FEMNIST_LOG_STD, num_clients))
  return np.clip(sizes, FEMNIST_MIN, FEMNIST_MAX).astype(np.int64)


def cifar100_cluster_sizes(config_path: str = CIFAR100_CLUSTER_CONFIG) -> np.ndarray:
  """[50] per-client training sizes of the paper's CIFAR-100 'cluster' split, as
  `data.cifar100.cluster_federation` makes it from the config file's data settings on
  synthetic CIFAR-shaped labels (500 per class in train, 100 in test; 1-pixel images)."""
  from fedmerge_jax.data import cifar100  # pylint: disable=g-import-not-at-top
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"--client_sizes=cifar100_cluster reads {config_path}; run from a "
                            "checkout of fedmerge_jax.")
  spec = importlib.util.spec_from_file_location("cifar100_cluster_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  classes = cifar100.NUM_CLASSES
  labels = lambda per_class: np.repeat(np.arange(classes), per_class).astype(np.int64)
  pixels = lambda n: np.zeros((n, 1, 1, 3), np.uint8)
  arrays = (pixels(500 * classes), labels(500), pixels(100 * classes), labels(100))
  return cifar100.cluster_federation(arrays, module.get_config().data).train.counts.astype(np.int64)


def client_sizes(workload: str, num_clients: int, examples_per_client: int,
                 seed: int) -> np.ndarray:
  """[N] training examples per client of a workload (see --client_sizes)."""
  if workload == "equal":
    return np.full(num_clients, examples_per_client, np.int64)
  if workload == "femnist":
    return femnist_sizes(num_clients, seed)
  if workload == "cifar100_cluster":
    return cifar100_cluster_sizes()
  try:
    sizes = np.array([int(s) for s in workload.split(",")], np.int64)
  except ValueError:
    raise ValueError(f"--client_sizes={workload!r}: expected {'|'.join(WORKLOADS)} or a "
                     "comma-separated list of sizes, e.g. 30,200,418.") from None
  if sizes.min() < 1:
    raise ValueError(f"--client_sizes={workload!r}: every client needs at least 1 example.")
  return sizes


def parse_workloads(values: Sequence[str]) -> List[str]:
  """--client_sizes' items: workload names, or (all integers) one explicit list of sizes."""
  values = [v.strip() for v in values if v.strip()]
  if values and all(v.isdigit() for v in values):
    return [",".join(values)]
  for v in values:
    if v not in WORKLOADS:
      raise ValueError(f"--client_sizes: unknown workload {v!r}; use {'|'.join(WORKLOADS)} "
                       "(comma-separated) or one comma-separated list of sizes.")
  return values


def _ragged_split(rng, sizes, example_shape, num_classes, dtype) -> data_lib.ClientArrays:
  """Random-normal pixels (made 100,000 rows at a time, stored as `dtype`), random labels,
  ragged: client i holds sizes[i] rows."""
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  total = int(offsets[-1])
  x = np.empty((total, *example_shape), dtype)
  for start in range(0, total, 100_000):
    stop = min(start + 100_000, total)
    x[start:stop] = rng.standard_normal((stop - start, *example_shape), np.float32)
  y = rng.integers(0, num_classes, total).astype(np.int32)
  return data_lib.ClientArrays(x, y, offsets)


def synthetic_data(model_name: str, sizes, seed: int, dtype=np.float32,
                   name: str = "synthetic", example_shape=None,
                   num_classes: int = 0) -> data_lib.FederatedData:
  """Clients with `sizes` random training examples (and 10 test ones each), shaped for
  `model_name` (or `example_shape`, `num_classes`), kept ragged, so host memory is the real
  examples' size."""
  default_shape, default_classes = MODELS[model_name]
  example_shape = tuple(int(d) for d in example_shape) if example_shape else default_shape
  num_classes = num_classes or default_classes
  sizes = np.asarray(sizes, np.int64)
  rng = np.random.default_rng(seed)
  split = lambda s: _ragged_split(rng, s, example_shape, num_classes, dtype)
  return data_lib.FederatedData(
      client_ids=tuple(map(str, range(len(sizes)))), train=split(sizes),
      test=split(np.full(len(sizes), TEST_EXAMPLES_PER_CLIENT)), val=None,
      num_classes=num_classes, name=name)


def make_config(algorithm: str, model: str, num_global_models: int):
  """The resolved config for one benchmark row, from the command-line flags."""
  config = config_lib.base_config()
  config.algorithm = algorithm
  config.num_global_models = 1 if algorithm == "fedavg" else num_global_models
  config.model.name = model
  config.model.conv_impl = FLAGS.conv_impl
  config.local_epochs = FLAGS.local_epochs
  config.batch_size = FLAGS.batch_size
  config.local_batching = FLAGS.local_batching
  config.client_chunk_size = FLAGS.client_chunk_size
  config.client_parallelism = FLAGS.client_parallelism
  config.clients_per_round = FLAGS.clients_per_round
  config.seed = FLAGS.seed
  config.compute_dtype = FLAGS.compute_dtype
  config.local_loop = FLAGS.local_loop
  config.local_unroll = FLAGS.local_unroll
  config.command_buffers = FLAGS.command_buffers
  return config_lib.resolve(config)


def local_config(config) -> client_lib.LocalConfig:
  return client_lib.LocalConfig(config.local_epochs, config.batch_size, config.client_lr,
                                config.prox_mu, config.local_batching)


def computed_examples(counts, local: client_lib.LocalConfig, parallelism: str,
                      chunk_size: int, static_steps: int = 0) -> int:
  """Example rows one round computes for clients with `counts` in the round's order
  (phantoms: 0). Each step computes a full batch of B rows. One at a time ('sequential')
  each client runs its own steps; under 'vmap' each chunk of `chunk_size` consecutive
  clients (all if 0; the remainder a chunk of its own) runs its largest member's steps
  for every member, or, with the static loop, every member runs `static_steps` (> 0)."""
  steps = np.array([client_lib.num_local_steps(int(n), local) for n in counts], np.int64)
  if parallelism == "sequential":
    return int(steps.sum()) * local.batch_size
  if static_steps:
    return len(steps) * static_steps * local.batch_size
  return parallel.computed_steps(steps, chunk_size) * local.batch_size


def useful_examples(counts, local_epochs: int) -> int:
  """Real examples x epochs: what a round of clients with `counts` must train on."""
  return int(np.sum(counts)) * local_epochs


def size_summary(counts) -> Dict[str, float]:
  counts = np.asarray(counts)
  return {"min": int(counts.min()), "median": float(np.median(counts)),
          "mean": float(counts.mean()), "max": int(counts.max())}


def _median_time(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn()` (which blocks until done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def round_schedule(config, num_clients: int, num_rounds: int) -> List[np.ndarray]:
  """The clients of rounds 1..num_rounds, sampled as train.py samples them."""
  sample_rng = jax.random.key(config.seed + 1)
  return [train.sample_clients(jax.random.fold_in(sample_rng, r), num_clients,
                               config.clients_per_round) for r in range(1, num_rounds + 1)]


def time_rounds(config, data: data_lib.FederatedData, num_rounds: int,
                warmup_rounds: int = 1, profile_kernels: int = 0) -> Dict[str, Any]:
  """Rounds run as train.py runs them: sampled clients largest first, padded to the round's
  bucket (`parallel.RoundGatherer`), the jitted, donated round of `train.compile_round`.

  `warmup_rounds` rounds run, then every bucket the timed rounds use is compiled, before
  timing. Returns compile_s, round_s (median), useful_examples_per_s and
  examples_per_s (medians of per-round rates), real_fraction (over the timed rounds), the
  chunk size and local loop used (`client_chunk_size=0` may be chosen: train.py's rule), the
  algorithm, the timed rounds' client ids in their order and, with `profile_kernels`, the top
  kernels of one more round's profiler trace (`top_kernels`).
  """
  mesh = parallel.make_mesh(config.num_devices)
  config = config.copy_and_resolve_references()
  config.client_chunk_size = train.chosen_chunk_size(config, data, mesh)  # As train.py does.
  layout = parallel.client_layout(mesh.size, data.num_clients, config.clients_per_round,
                                  config.client_chunk_size)
  _, alg = train.build(config, data, layout)
  init_rng, round_rng = jax.random.split(jax.random.key(config.seed))
  state, shardings = parallel.sharded_init(alg.init, mesh, layout.population, init_rng)
  state = jax.block_until_ready(state)
  round_fn = train.compile_round(alg, config, mesh, shardings)
  gather_round = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
  schedule = round_schedule(config, data.num_clients, num_rounds + warmup_rounds)
  warm, timed = schedule[:warmup_rounds], schedule[warmup_rounds:]
  holder = {"state": state, "round": 0}
  compiled = {}  # Per padded length (bucket): the compiled round.

  def prepare(ids):
    ordered, sharded_ids, batch = gather_round(ids)
    rng = jax.random.fold_in(round_rng, holder["round"] + 1)
    length = batch.x.shape[1]
    if length not in compiled:
      compiled[length] = round_fn.lower(holder["state"], sharded_ids, batch, rng).compile()
    return ordered, compiled[length], (sharded_ids, batch, rng)

  def one_round(ids):
    ordered, fn, args = prepare(ids)
    holder["round"] += 1
    holder["state"], _ = fn(holder["state"], *args)
    jax.block_until_ready(holder["state"])
    return ordered

  start = time.perf_counter()
  for ids in warm:
    one_round(ids)
  for ids in timed:  # Compile every bucket the timed rounds use, before timing.
    prepare(ids)
  compile_s = time.perf_counter() - start
  local = local_config(config)
  parallelism = parallel.resolve_parallelism(alg_parallelism(config, layout))
  loop = parallel.resolve_local_loop(config.local_loop, parallelism, layout.chunk_size)
  seconds, useful, computed, orders = [], [], [], []
  for ids in timed:
    start = time.perf_counter()
    ordered = one_round(ids)
    seconds.append(time.perf_counter() - start)
    padded = layout.pad_ids(ordered)
    counts = np.where(padded < data.num_clients,
                      data.train.counts[np.minimum(padded, data.num_clients - 1)], 0)
    static_steps = (client_lib.num_local_steps(data.train.padded_length(ordered, config.batch_size),
                                               local) if loop == "static" else 0)
    useful.append(useful_examples(counts, config.local_epochs))
    computed.append(computed_examples(counts, local, parallelism, layout.chunk_size,
                                      static_steps))
    orders.append(ordered)
  kernels = None
  if profile_kernels:
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        one_round(timed[-1])
      kernels = top_kernels(trace_dir, profile_kernels)
  return {"compile_s": compile_s, "round_s": statistics.median(seconds),
          "useful_examples_per_s": statistics.median(u / s for u, s in zip(useful, seconds)),
          "examples_per_s": statistics.median(c / s for c, s in zip(computed, seconds)),
          "real_fraction": sum(useful) / sum(computed), "compiled_buckets": len(compiled),
          "client_chunk_size": layout.chunk_size, "local_loop": loop, "top_kernels": kernels,
          "algorithm": alg, "rounds": orders}


def top_kernels(trace_dir: str, top: int) -> List[List[Any]]:
  """[name, total ms, share of the device's time] of the `top` longest kernels of the
  profiler trace in `trace_dir`: the events of the device planes (GPU/TPU), or, on a
  backend without them (CPU), of the host's XLA threads."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    return []
  planes = list(jax.profiler.ProfileData.from_file(paths[0]).planes)
  devices = [p for p in planes if p.name.startswith("/device:")]
  lines = ([line for p in devices for line in p.lines] if devices else
           [line for p in planes if p.name == "/host:CPU" for line in p.lines
            if line.name.startswith("tf_XLA")])
  totals: Dict[str, float] = {}
  for line in lines:
    for event in line.events:
      totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
  whole = sum(totals.values()) or 1.0
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return [[name, ns / 1e6, ns / whole] for name, ns in ranked]


def alg_parallelism(config, layout: parallel.ClientLayout) -> str:
  """The parallelism `train.build` gives the algorithm for `layout` (vmap on several devices)."""
  if layout.num_devices > 1 and config.client_parallelism == "auto":
    return "vmap"
  return config.client_parallelism


def cost_flops(compiled) -> Optional[float]:
  """'flops' from a compiled computation's cost analysis (dict or list of dicts), or None."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def sgd_step_fn(model, learning_rate: float):
  """One SGD step on one batch, mean CE (FedJAX's per-batch step): (params, x, y, rng) -> params."""
  def loss_fn(params, other, x, y, rng):
    mutable = list(other)  # BatchNorm statistics follow the model's train-mode updates.
    logits, new_other = model.apply({"params": params, **other}, x, train=True,
                                    rngs={"dropout": rng}, mutable=mutable)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new_other

  def step(variables, x, y, rng):
    other = {k: v for k, v in variables.items() if k != "params"}
    grads, new_other = jax.grad(loss_fn, has_aux=True)(variables["params"], other, x, y, rng)
    new = jax.tree.map(lambda p, g: p - learning_rate * g, variables["params"], grads)
    return {**new_other, "params": new}

  return step


def train_step_flops(config, example_shape: Tuple[int, ...], num_classes: int,
                     batch_size: int) -> Optional[float]:
  """XLA's FLOP count of one SGD step (forward + backward of mean CE) on one batch."""
  model = models.get_model(config.model, num_classes)
  x = jnp.zeros((batch_size, *example_shape), jnp.float32)
  y = jnp.zeros((batch_size,), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  step = jax.jit(sgd_step_fn(model, config.client_lr))
  return cost_flops(step.lower(variables, x, y, rng).compile())


def client_batches(rng, n: int, local: client_lib.LocalConfig) -> List[np.ndarray]:
  """One client's batches of example indices, in FedJAX's / PyTorch's way on the host:
  'epoch': per epoch a permutation cut into ceil(n/B) batches, the last partial; 'stream':
  the epochs' permutations concatenated, then cut into ceil(nE/B) batches."""
  orders = [rng.permutation(n) for _ in range(local.local_epochs)]
  b = local.batch_size
  if local.batching == "stream":
    order = np.concatenate(orders)
    return [order[i:i + b] for i in range(0, len(order), b)]
  return [order[i:i + b] for order in orders for i in range(0, n, b)]


def loop_reference(config, data: data_lib.FederatedData, rounds: Sequence[np.ndarray],
                   warmup_rounds: int = 1) -> Dict[str, Any]:
  """FedJAX's default backend: a jitted SGD step per batch from a Python loop; FedAvg server.

  Same model (with `config.model.conv_impl`), data, clients, batch size, epochs and
  batching as the rounds; each client runs its own batches of its own examples (shuffled
  with NumPy on the host, as FedJAX does; a partial last batch is a smaller shape, compiled
  once per size during the warm-up) from the global model; the server averages the trained
  models by examples. `rounds`: each timed round's client ids.
  """
  model = models.get_model(config.model, data.num_classes)
  variables = model.init(jax.random.key(config.seed), jnp.zeros((1, *data.example_shape)))
  step = jax.jit(sgd_step_fn(model, config.client_lr))
  average = jax.jit(lambda trained, p: jax.tree.map(lambda *xs: sum(w * x for w, x in zip(p, xs)),
                                                    *trained))
  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  local = local_config(config)
  counts = data.train.counts

  def one_round(global_vars, ids):
    trained = []
    for c in ids:
      params = global_vars
      x, y = data.train.client(int(c))
      for t, idx in enumerate(client_batches(rng, int(counts[c]), local)):
        params = step(params, x[idx], y[idx], jax.random.fold_in(key, int(c) * 100_000 + t))
      trained.append(params)
    p = counts[ids] / counts[ids].sum()
    return jax.block_until_ready(average(trained, list(p)))

  # Warm-up: every batch size (and every number of averaged clients) the timed rounds use.
  holder = {"vars": variables}
  sizes = {b for ids in rounds for c in ids
           for b in map(len, client_batches(np.random.default_rng(0), int(counts[c]), local))}
  start = time.perf_counter()
  for _ in range(warmup_rounds):
    holder["vars"] = one_round(holder["vars"], rounds[0])
  x, y = data.train.client(0)
  for b in sizes:
    idx = np.arange(b) % len(y)
    jax.block_until_ready(step(holder["vars"], x[idx], y[idx], key))
  compile_s = time.perf_counter() - start
  seconds, useful = [], []
  for ids in rounds:
    start = time.perf_counter()
    holder["vars"] = one_round(holder["vars"], ids)
    seconds.append(time.perf_counter() - start)
    useful.append(useful_examples(counts[ids], config.local_epochs))
  rate = statistics.median(u / s for u, s in zip(useful, seconds))
  return {"kind": "reference", "execution": "python loop of jitted SGD steps (FedJAX)",
          **_setting(config, data),
          "conv_impl": resolve_conv_impl(config.model.conv_impl),
          "round_s": statistics.median(seconds), "compile_s": compile_s,
          "examples_per_s": rate, "useful_examples_per_s": rate, "real_fraction": 1.0}


def _setting(config, data) -> Dict[str, Any]:
  counts = data.train.counts
  equal = bool(counts.min() == counts.max())
  return {"model": config.model.name, "example_shape": list(data.example_shape),
          "num_classes": data.num_classes, "workload": data.name, "clients": data.num_clients,
          "clients_per_round": config.clients_per_round or data.num_clients,
          "examples_per_client": int(counts.max()) if equal else None,
          "sizes": size_summary(counts), "total_examples": int(counts.sum()),
          "batch_size": config.batch_size, "local_epochs": config.local_epochs,
          "local_batching": config.local_batching}


def data_bytes(arrays: data_lib.ClientArrays) -> Dict[str, Any]:
  """Host bytes of a ragged split against its real examples' own size (x and y rows)."""
  total = int(arrays.counts.sum())
  per_example = int(np.prod(arrays.x.shape[1:])) * arrays.x.dtype.itemsize + arrays.y.dtype.itemsize
  return {"train_bytes": int(arrays.nbytes), "real_bytes": total * per_example,
          "memory_ratio": arrays.nbytes / max(total * per_example, 1)}


def round_row(config, data, peaks: Dict[str, float], num_rounds: int,
              reference: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """One `round` result row for the resolved `config` on `data`; `peaks`: the measured
  matmul GFLOP/s per dtype, the row's fraction of peak against its compute dtype's."""
  timed = time_rounds(config, data, num_rounds, profile_kernels=FLAGS.profile_kernels)
  peak_gflops = peaks[config.compute_dtype]
  step_flops = train_step_flops(config, data.example_shape, data.num_classes, config.batch_size)
  flops_per_example = None if step_flops is None else step_flops / config.batch_size
  examples_per_s = timed["examples_per_s"]
  useful_per_s = timed["useful_examples_per_s"]
  achieved = None if flops_per_example is None else examples_per_s * flops_per_example / 1e9
  return {
      "kind": "round", "algorithm": config.algorithm,
      "num_global_models": config.num_global_models, **_setting(config, data),
      "conv_impl": resolve_conv_impl(config.model.conv_impl),
      "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
      "client_chunk_size": timed["client_chunk_size"],
      "requested_chunk_size": config.client_chunk_size, "local_loop": timed["local_loop"],
      "local_unroll": config.local_unroll, "command_buffers": config.command_buffers,
      "compute_dtype": config.compute_dtype,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "round_s": timed["round_s"], "compile_s": timed["compile_s"],
      "compiled_buckets": timed["compiled_buckets"],
      "useful_examples_per_s": useful_per_s, "examples_per_s": examples_per_s,
      "real_fraction": timed["real_fraction"], **data_bytes(data.train),
      "flops_per_example": flops_per_example, "achieved_gflops": achieved,
      "matmul_peak_gflops": peak_gflops, "matmul_peaks_gflops": peaks,
      "fraction_of_peak": None if achieved is None else achieved / peak_gflops,
      "top_kernels": timed["top_kernels"],
      "speedup_vs_loop": (None if reference is None
                          else useful_per_s / reference["useful_examples_per_s"]),
  }


def breakdown_row(config, data, num_rounds: int) -> Dict[str, Any]:
  """Median seconds of a round's stages, each jitted on its own, and of the whole round
  (every client, largest first, padded to the round's bucket)."""
  _, alg = train.build(config, data)
  if alg.stages is None:
    raise ValueError(f"{config.algorithm} has no RoundStages to break a round into.")
  state = jax.jit(alg.init)(jax.random.key(config.seed))
  ids = parallel.largest_first(np.arange(data.num_clients), data.train.counts)
  batch = jax.device_put(data.train.gather(ids, data.train.padded_length(ids, config.batch_size)))
  rng = jax.random.key(config.seed + 1)
  options = train.compiler_options(config)
  jit = functools.partial(jax.jit, compiler_options=options)
  merge, train_stage, server = jit(alg.personalized), jit(alg.stages.train), jit(alg.stages.server)
  round_fn = jit(alg.round)
  deltas, _ = train_stage(state, ids, batch, rng)
  evaluate = evaluation.make_evaluator(alg, data, config.client_chunk_size,
                                       compiler_options=options)
  stages = {
      "merge_s": lambda: merge(state, ids, batch),
      "train_s": lambda: train_stage(state, ids, batch, rng),
      "server_s": lambda: server(state, ids, batch, deltas),
      "eval_s": lambda: evaluate(state),
      "round_s": lambda: round_fn(state, ids, batch, rng),
  }
  row = {"kind": "breakdown", "algorithm": config.algorithm,
         "num_global_models": config.num_global_models, **_setting(config, data),
         "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
         "client_chunk_size": config.client_chunk_size}
  for name, fn in stages.items():
    jax.block_until_ready(fn())  # Compile.
    row[name] = _median_time(lambda: jax.block_until_ready(fn()), num_rounds)
  return row


def peak_rss_bytes() -> int:
  """This process's peak resident memory: VmHWM (reset by exec, unlike ru_maxrss, which a
  child inherits from its parent on Linux), else ru_maxrss."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_bytes() -> Optional[int]:
  """Peak bytes in use on the first device, where the backend reports it (not on CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def scaling_row(config, num_clients: int, num_rounds: int) -> Dict[str, Any]:
  """One scale, measured in this process: data (float16), compile, then timed rounds."""
  config = config.copy_and_resolve_references()
  config.clients_per_round = 0
  data = synthetic_data(config.model.name, np.full(num_clients, FLAGS.examples_per_client),
                        config.seed, np.float16, name="equal", example_shape=FLAGS.image_shape,
                        num_classes=FLAGS.num_classes)
  timed = time_rounds(config, data, num_rounds, warmup_rounds=0)
  return {"kind": "scaling", "algorithm": config.algorithm,
          "num_global_models": config.num_global_models, **_setting(config, data),
          "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
          "client_chunk_size": config.client_chunk_size, "compile_s": timed["compile_s"],
          "round_s": timed["round_s"], "examples_per_s": timed["useful_examples_per_s"],
          "data_bytes": int(data.train.nbytes + data.test.nbytes),
          "delta_bytes_per_client": 4 * timed["algorithm"].communication[1],
          "peak_rss_bytes": peak_rss_bytes(),
          "peak_device_bytes": peak_device_bytes()}


def run_scaling(algorithm: str, model: str, num_global_models: int) -> List[Dict[str, Any]]:
  """Each scale in a fresh process of this module (peak RSS never decreases in a process)."""
  rows = []
  for num_clients in map(int, FLAGS.scaling_clients):
    argv = [sys.executable, "-m", "fedmerge_jax.benchmark", f"--scaling_worker={num_clients}",
            f"--algorithm={algorithm}", f"--model={model}",
            f"--num_global_models={num_global_models}"]
    argv += [f"--{name}={FLAGS[name].value}" for name in (
        "examples_per_client", "batch_size", "local_epochs", "local_batching", "conv_impl",
        "client_chunk_size", "client_parallelism", "scaling_rounds", "seed", "compute_dtype",
        "local_loop", "local_unroll", "command_buffers")]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode or not lines:
      row = {"kind": "scaling", "algorithm": algorithm, "model": model, "clients": num_clients,
             "error": (result.stderr.strip().splitlines() or ["exit %d" % result.returncode])[-1]}
    else:
      row = json.loads(lines[-1])
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def _check(name: str, target: str, measured, passed, needs: str, **extra) -> Dict[str, Any]:
  """One target: measured value and pass/fail, or (not measured) the flags it `needs`."""
  row = {"name": name, "target": target, "measured": measured,
         "pass": None if measured is None else bool(passed), **extra}
  if measured is None:
    row["needs"] = needs
  return row


def targets_row(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The issue's targets against this run's rows; where one was not measured, its `needs`."""
  def find(kind, **match):
    found = [r for r in rows if r.get("kind") == kind
             and all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None

  fedavg = find("round", algorithm="fedavg", workload="equal", **TARGET_SETTING)
  equal_needs = ("--model=emnist_cnn --algorithm=fedavg --client_sizes=equal --clients=10 "
                 "--examples_per_client=200 --batch_size=20 --local_epochs=1")
  checks = [
      _check("fedavg_emnist_cnn_vs_fedjax", f">= 2 x FedJAX's {FEDJAX_EXAMPLES_PER_S} examples/s",
             fedavg and fedavg["useful_examples_per_s"],
             fedavg and fedavg["useful_examples_per_s"] >= 2 * FEDJAX_EXAMPLES_PER_S, equal_needs),
      _check("fedavg_emnist_cnn_speedup_vs_loop", ">= 2 x this run's loop of jitted steps",
             fedavg and fedavg["speedup_vs_loop"],
             fedavg and (fedavg["speedup_vs_loop"] or 0) >= 2, equal_needs + " --reference"),
      _check("fedavg_emnist_cnn_fraction_of_peak", ">= 0.5 of the f32 matmul peak",
             fedavg and fedavg["fraction_of_peak"],
             fedavg and (fedavg["fraction_of_peak"] or 0) >= 0.5, equal_needs),
  ]
  # Unequal clients: FEMNIST-like sizes against equal ones, the loop, and FedMerge K = 5.
  femnist = find("round", algorithm="fedavg", workload="femnist", **UNEQUAL_SETTING)
  on = lambda r: {k: r[k] for k in ("clients", "clients_per_round")} if r else {}
  equal = find("round", algorithm="fedavg", workload="equal", **UNEQUAL_SETTING, **on(femnist))
  ratio = femnist and equal and femnist["useful_examples_per_s"] / equal["useful_examples_per_s"]
  checks.append(_check(
      "fedavg_femnist_vs_equal_sizes",
      ">= 0.9 x the useful examples/s of equal sizes (FedAvg, EMNIST CNN)", ratio,
      ratio and ratio >= 0.9,
      f"--algorithm=fedavg --client_sizes=equal,femnist {UNEQUAL_FLAGS} "
      "(--examples_per_client=206 for the same total examples)",
      totals=[r["total_examples"] for r in (femnist, equal) if r]))
  checks.append(_check(
      "fedavg_femnist_vs_loop", ">= 2 x the loop of jitted steps on the same run",
      femnist and femnist["speedup_vs_loop"], femnist and (femnist["speedup_vs_loop"] or 0) >= 2,
      f"--algorithm=fedavg --client_sizes=femnist --reference {UNEQUAL_FLAGS}"))
  rounds = [r for r in rows if r.get("kind") == "round"]
  pairs = [(a, b) for a in rounds for b in rounds
           if a["algorithm"] == "fedavg" and b["algorithm"] == "fedmerge"
           and b["num_global_models"] == 5
           and all(a[k] == b[k] for k in ("model", "workload", "clients", "clients_per_round",
                                          "batch_size", "local_epochs"))]
  pairs.sort(key=lambda p: (p[0]["workload"] != "femnist", p[0]["model"] != "emnist_cnn"))
  fedavg_k, fedmerge_k = pairs[0] if pairs else (None, None)
  overhead = fedavg_k and fedavg_k["useful_examples_per_s"] / fedmerge_k["useful_examples_per_s"] - 1
  checks.append(_check(
      "fedmerge_k5_overhead", "FedMerge K=5 useful examples/s within 10% of FedAvg's, same workload",
      overhead, overhead is not None and overhead <= 0.1,
      f"--algorithm=fedavg,fedmerge --num_global_models=5 --client_sizes=femnist {UNEQUAL_FLAGS}",
      workload=fedavg_k and fedavg_k["workload"]))
  shaped = [r for r in rounds if r["workload"] == "femnist" and r["model"] in (
      "emnist_cnn", "leaf_femnist_cnn")]
  memory = shaped[0]["memory_ratio"] if shaped else None
  checks.append(_check(
      "femnist_host_memory", "ragged FEMNIST-shaped training split <= 1.2 x its real size",
      memory, memory is not None and memory <= 1.2,
      "--model=emnist_cnn --client_sizes=femnist"))
  scaled = [r for r in rows if r.get("kind") == "scaling" and "error" not in r]
  groups = {}
  for r in scaled:  # One series per (model, algorithm, K); EMNIST CNN FedAvg if measured.
    groups.setdefault((r["model"] != "emnist_cnn", r["algorithm"] != "fedavg", r["model"],
                       r["algorithm"], r["num_global_models"]), []).append(r)
  series = sorted(groups[min(groups)], key=lambda r: r["clients"]) if groups else []
  biggest = series[-1] if series and series[-1]["model"] == "emnist_cnn" else None
  scaling_needs = "--model=emnist_cnn --algorithm=fedavg --scaling --scaling_clients=10,100,1000,3400"
  checks.append(_check(
      "emnist_cnn_3400_clients_fit_24gib", "3,400 clients: peak RSS <= 24 GiB",
      biggest["peak_rss_bytes"] if biggest and biggest["clients"] >= 3400 else None,
      biggest and biggest["peak_rss_bytes"] <= MEMORY_BUDGET_BYTES, scaling_needs))
  growth = linear = None
  if len(series) >= 2:
    small, big = series[0], series[-1]
    non_data = lambda r: r["peak_rss_bytes"] - r["data_bytes"]
    growth = ((non_data(big) - non_data(small)) / (big["clients"] - small["clients"])
              / big["delta_bytes_per_client"])
    per_client = [r["round_s"] / r["clients"] for r in series if r["clients"] >= 100] or \
                 [r["round_s"] / r["clients"] for r in series]
    linear = max(per_client) / min(per_client)
  series_on = series and {k: series[0][k] for k in ("model", "algorithm", "num_global_models")}
  checks.append(_check(
      "memory_grows_with_chunk_not_clients",
      "peak RSS beyond the data grows < 0.5 deltas per extra client (stacking: >= 1)",
      growth, growth is not None and growth < 0.5, scaling_needs, series=series_on or None))
  checks.append(_check(
      "round_time_linear_in_clients",
      "seconds per client (scales >= 100 clients) vary by <= 1.3x", linear,
      linear is not None and linear <= 1.3, scaling_needs, series=series_on or None))
  return {"kind": "targets", "checks": checks}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  ks = [int(k) for k in FLAGS.num_global_models]
  if FLAGS.scaling_worker:
    config = make_config(FLAGS.algorithm[0], FLAGS.model[0], ks[0])
    print(json.dumps(scaling_row(config, FLAGS.scaling_worker, FLAGS.scaling_rounds)), flush=True)
    return
  try:
    workloads = parse_workloads(FLAGS.client_sizes)
    sizes = {w: client_sizes(w, FLAGS.clients, FLAGS.examples_per_client, FLAGS.seed)
             for w in workloads}
  except (ValueError, FileNotFoundError) as error:
    raise app.UsageError(str(error)) from None
  runs = [(m, a, k) for m in FLAGS.model for a in FLAGS.algorithm
          for k in (ks[:1] if a == "fedavg" else ks)]
  configs = [make_config(a, m, k) for m, a, k in runs]  # Fail fast.
  peaks = {dtype: matmul_peak_gflops(FLAGS.peak_size, dtype=dtype)  # TF32 (GPU) and bf16.
           for dtype in client_lib.COMPUTE_DTYPES}
  rows: List[Dict[str, Any]] = []
  dtype = np.float16 if FLAGS.data_dtype == "float16" else np.float32

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  for model in FLAGS.model:
    for workload in workloads:
      name = workload if workload in WORKLOADS else "list"
      data = synthetic_data(model, sizes[workload], FLAGS.seed, dtype, name=name,
                            example_shape=FLAGS.image_shape, num_classes=FLAGS.num_classes)
      reference = None
      if FLAGS.reference:
        reference_config = make_config("fedavg", model, 1)
        reference_config.model.conv_impl = FLAGS.reference_conv_impl
        schedule = round_schedule(reference_config, data.num_clients, 1 + FLAGS.rounds)
        reference = loop_reference(reference_config, data, schedule[1:])
        emit(reference)
      for config in (c for c in configs if c.model.name == model):
        emit(round_row(config, data, peaks, FLAGS.rounds, reference))
        if FLAGS.breakdown:
          emit(breakdown_row(config, data, FLAGS.rounds))
  if FLAGS.scaling:
    for m, a, k in runs:
      rows.extend(run_scaling(a, m, k))
  if FLAGS.targets:
    emit(targets_row(rows))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)  # Quiet logs; --verbosity=1 for detail.
