"""Times federated rounds on synthetic data against a Python loop of jitted SGD steps.

  python -m fedmerge_jax.benchmark --algorithm=fedavg,fedmerge --model=emnist_cnn \
      --num_global_models=1,5,15 --clients=10 --examples_per_client=200 --batch_size=20 \
      --local_epochs=1 --rounds=5 --breakdown --scaling --scaling_clients=10,100,1000,3400 \
      --targets

Prints JSON lines, each with a `kind`:
- `reference`: per model, FedJAX's way of running a round (one jitted SGD step per batch,
  called from a Python loop over clients and batches), on the same data and batches;
- `round`: per model, algorithm and K, the median round time (after a compile round,
  `compile_s`), examples/s, XLA's FLOPs per training example, the achieved fraction of
  the machine's f32 matmul peak and `speedup_vs_loop` (over the `reference` line);
- `breakdown` (--breakdown): merge, local training, server update and evaluation, each
  jitted on its own from the algorithm's `RoundStages`, and the whole round;
- `scaling` (--scaling): per number of clients, in a fresh process (peak RSS only grows),
  the round time, peak host RSS and peak device memory (None where the backend has none);
- `targets` (--targets): each of the project's targets, the measured value, pass/fail.
"""

import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmerge_jax import cli
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
flags.DEFINE_integer("clients", 10, "Number of clients, all trained every round.", lower_bound=1)
flags.DEFINE_integer("examples_per_client", 200, "Training examples per client.", lower_bound=1)
flags.DEFINE_integer("batch_size", 20, "Local batch size.", lower_bound=1)
flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.", lower_bound=1)
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
flags.DEFINE_integer("peak_size", 2048, "Matrix size of the matmul that measures peak FLOP/s.")

# Per model: (example shape, classes). 'mlp' is sized for the 8x8 digits data.
MODELS = {"mlp": ((8, 8, 1), 10), "emnist_cnn": ((28, 28, 1), 62),
          "leaf_femnist_cnn": ((28, 28, 1), 62), "resnet9": ((32, 32, 3), 100)}
TEST_EXAMPLES_PER_CLIENT = 10
FEDJAX_EXAMPLES_PER_S = 1400  # FedJAX 0.0.17, EMNIST CNN, 10 x 200, batch 20, 2-core CPU.
TARGET_SETTING = {"model": "emnist_cnn", "clients": 10, "examples_per_client": 200,
                  "batch_size": 20, "local_epochs": 1}
MEMORY_BUDGET_BYTES = 24 * 2**30


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


def _client_arrays(rng, num_clients, num_examples, example_shape, num_classes, dtype):
  """Random-normal pixels (made 100 clients at a time, stored as `dtype`), random labels."""
  x = np.empty((num_clients, num_examples, *example_shape), dtype)
  for start in range(0, num_clients, 100):
    stop = min(start + 100, num_clients)
    x[start:stop] = rng.standard_normal((stop - start, num_examples, *example_shape), np.float32)
  y = rng.integers(0, num_classes, (num_clients, num_examples)).astype(np.int32)
  return data_lib.ClientArrays(x, y, np.full(num_clients, num_examples, np.int32))


def synthetic_data(model_name: str, num_clients: int, examples_per_client: int, seed: int,
                   dtype=np.float32) -> data_lib.FederatedData:
  """Every client `examples_per_client` random examples shaped for `model_name`.

  Built as padded arrays directly (no per-client dicts), so that 3,400 FEMNIST-sized
  clients in float16 take ~1 GiB.
  """
  example_shape, num_classes = MODELS[model_name]
  rng = np.random.default_rng(seed)
  split = lambda n: _client_arrays(rng, num_clients, n, example_shape, num_classes, dtype)
  return data_lib.FederatedData(
      client_ids=tuple(map(str, range(num_clients))), train=split(examples_per_client),
      test=split(TEST_EXAMPLES_PER_CLIENT), val=None, num_classes=num_classes, name="synthetic")


def make_config(algorithm: str, model: str, num_global_models: int):
  """The resolved config for one benchmark row, from the command-line flags."""
  config = config_lib.base_config()
  config.algorithm = algorithm
  config.num_global_models = 1 if algorithm == "fedavg" else num_global_models
  config.model.name = model
  config.model.conv_impl = FLAGS.conv_impl
  config.local_epochs = FLAGS.local_epochs
  config.batch_size = FLAGS.batch_size
  config.client_chunk_size = FLAGS.client_chunk_size
  config.client_parallelism = FLAGS.client_parallelism
  config.clients_per_round = 0
  config.seed = FLAGS.seed
  return config_lib.resolve(config)


def _median_time(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn()` (which blocks until done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_rounds(config, data: data_lib.FederatedData, num_rounds: int,
                warmup_rounds: int = 1) -> Tuple[float, float, Any]:
  """(seconds to compile and run `warmup_rounds`, median seconds of `num_rounds` further
  rounds, the algorithm) for the round runs use, all clients every round."""
  _, alg = train.build(config, data)
  init_rng, round_rng = jax.random.split(jax.random.key(config.seed))
  state = jax.block_until_ready(jax.jit(alg.init)(init_rng))
  ids = np.arange(data.num_clients)
  batch = data.train.gather(ids)
  start = time.perf_counter()
  round_fn = train.compile_round(alg, config).lower(state, ids, batch, round_rng).compile()
  holder = {"state": state, "round": 0}

  def one_round():
    holder["round"] += 1
    holder["state"], _ = round_fn(holder["state"], ids, batch,
                                  jax.random.fold_in(round_rng, holder["round"]))
    jax.block_until_ready(holder["state"])

  for _ in range(warmup_rounds):
    one_round()
  compile_s = time.perf_counter() - start
  return compile_s, _median_time(one_round, num_rounds), alg


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


def loop_reference(config, data: data_lib.FederatedData, num_rounds: int) -> Dict[str, Any]:
  """FedJAX's default backend: a jitted SGD step per batch from a Python loop; FedAvg server.

  Same model (with `config.model.conv_impl`), data, batch size and epochs as the rounds;
  each client shuffles its examples every epoch (NumPy, on the host, as FedJAX does) and
  starts from the global model; the server averages the trained models by examples.
  """
  model = models.get_model(config.model, data.num_classes)
  variables = model.init(jax.random.key(config.seed), jnp.zeros((1, *data.example_shape)))
  step = jax.jit(sgd_step_fn(model, config.client_lr))
  average = jax.jit(lambda trained, p: jax.tree.map(lambda *xs: sum(w * x for w, x in zip(p, xs)),
                                                    *trained))
  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  counts = data.train.counts
  p = list(counts / counts.sum())

  def one_round(global_vars):
    trained = []
    for c in range(data.num_clients):
      params, n = global_vars, int(counts[c])
      for epoch in range(config.local_epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
          idx = order[start:start + config.batch_size]
          params = step(params, data.train.x[c, idx], data.train.y[c, idx],
                        jax.random.fold_in(key, start + epoch * n + c * n * config.local_epochs))
      trained.append(params)
    return jax.block_until_ready(average(trained, p))

  holder = {"vars": variables}

  def timed():
    holder["vars"] = one_round(holder["vars"])

  compile_s = _median_time(timed, 1)
  round_s = _median_time(timed, num_rounds)
  examples = int(counts.sum()) * config.local_epochs
  return {"kind": "reference", "execution": "python loop of jitted SGD steps (FedJAX)",
          **_setting(config, data),
          "conv_impl": resolve_conv_impl(config.model.conv_impl),
          "round_s": round_s, "compile_s": compile_s,
          "examples_per_s": examples / round_s}


def _setting(config, data) -> Dict[str, Any]:
  return {"model": config.model.name, "clients": data.num_clients,
          "examples_per_client": int(data.train.counts.max()), "batch_size": config.batch_size,
          "local_epochs": config.local_epochs}


def round_row(config, data, peak_gflops: float, num_rounds: int,
              reference: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """One `round` result row for the resolved `config` on `data`."""
  compile_s, round_s, _ = time_rounds(config, data, num_rounds)
  step_flops = train_step_flops(config, data.example_shape, data.num_classes, config.batch_size)
  flops_per_example = None if step_flops is None else step_flops / config.batch_size
  examples_per_s = int(data.train.counts.sum()) * config.local_epochs / round_s
  achieved = None if flops_per_example is None else examples_per_s * flops_per_example / 1e9
  return {
      "kind": "round", "algorithm": config.algorithm,
      "num_global_models": config.num_global_models, **_setting(config, data),
      "conv_impl": resolve_conv_impl(config.model.conv_impl),
      "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
      "client_chunk_size": config.client_chunk_size,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "round_s": round_s, "compile_s": compile_s, "examples_per_s": examples_per_s,
      "flops_per_example": flops_per_example, "achieved_gflops": achieved,
      "matmul_peak_gflops": peak_gflops,
      "fraction_of_peak": None if achieved is None else achieved / peak_gflops,
      "speedup_vs_loop": None if reference is None else examples_per_s / reference["examples_per_s"],
  }


def breakdown_row(config, data, num_rounds: int) -> Dict[str, Any]:
  """Median seconds of a round's stages, each jitted on its own, and of the whole round."""
  _, alg = train.build(config, data)
  if alg.stages is None:
    raise ValueError(f"{config.algorithm} has no RoundStages to break a round into.")
  state = jax.jit(alg.init)(jax.random.key(config.seed))
  ids = np.arange(data.num_clients)
  batch = jax.device_put(data.train.gather(ids))
  rng = jax.random.key(config.seed + 1)
  options = models.compiler_options(config.model)
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
  data = synthetic_data(config.model.name, num_clients, FLAGS.examples_per_client,
                        config.seed, np.float16)
  compile_s, round_s, alg = time_rounds(config, data, num_rounds, warmup_rounds=0)
  return {"kind": "scaling", "algorithm": config.algorithm,
          "num_global_models": config.num_global_models, **_setting(config, data),
          "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
          "client_chunk_size": config.client_chunk_size, "compile_s": compile_s,
          "round_s": round_s,
          "examples_per_s": num_clients * FLAGS.examples_per_client * config.local_epochs
                            / round_s,
          "data_bytes": int(data.train.x.nbytes + data.train.y.nbytes + data.test.x.nbytes),
          "delta_bytes_per_client": 4 * alg.communication[1],
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
        "examples_per_client", "batch_size", "local_epochs", "conv_impl", "client_chunk_size",
        "client_parallelism", "scaling_rounds", "seed")]
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


def _check(name: str, target: str, measured, passed) -> Dict[str, Any]:
  return {"name": name, "target": target, "measured": measured,
          "pass": None if measured is None else bool(passed)}


def targets_row(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  """The issue's targets against this run's rows (None where this run did not measure it)."""
  def find(kind, **match):
    found = [r for r in rows if r.get("kind") == kind
             and all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None

  fedavg = find("round", algorithm="fedavg", **TARGET_SETTING)
  fedmerge5 = find("round", algorithm="fedmerge", num_global_models=5, **TARGET_SETTING)
  checks = [
      _check("fedavg_emnist_cnn_vs_fedjax", f">= 2 x FedJAX's {FEDJAX_EXAMPLES_PER_S} examples/s",
             fedavg and fedavg["examples_per_s"],
             fedavg and fedavg["examples_per_s"] >= 2 * FEDJAX_EXAMPLES_PER_S),
      _check("fedavg_emnist_cnn_speedup_vs_loop", ">= 2 x this run's loop of jitted steps",
             fedavg and fedavg["speedup_vs_loop"],
             fedavg and (fedavg["speedup_vs_loop"] or 0) >= 2),
      _check("fedavg_emnist_cnn_fraction_of_peak", ">= 0.5 of the f32 matmul peak",
             fedavg and fedavg["fraction_of_peak"],
             fedavg and (fedavg["fraction_of_peak"] or 0) >= 0.5),
      _check("fedmerge_k5_overhead", "FedMerge K=5 round <= 1.10 x FedAvg round",
             fedavg and fedmerge5 and fedmerge5["round_s"] / fedavg["round_s"] - 1,
             fedavg and fedmerge5 and fedmerge5["round_s"] <= 1.1 * fedavg["round_s"]),
  ]
  scaled = [r for r in rows if r.get("kind") == "scaling" and "error" not in r]
  groups = {}
  for r in scaled:  # One series per (model, algorithm, K); EMNIST CNN FedAvg if measured.
    groups.setdefault((r["model"] != "emnist_cnn", r["algorithm"] != "fedavg", r["model"],
                       r["algorithm"], r["num_global_models"]), []).append(r)
  series = sorted(groups[min(groups)], key=lambda r: r["clients"]) if groups else []
  biggest = series[-1] if series and series[-1]["model"] == "emnist_cnn" else None
  checks.append(_check(
      "emnist_cnn_3400_clients_fit_24gib", "3,400 clients: peak RSS <= 24 GiB",
      biggest["peak_rss_bytes"] if biggest and biggest["clients"] >= 3400 else None,
      biggest and biggest["peak_rss_bytes"] <= MEMORY_BUDGET_BYTES))
  growth = linear = None
  if len(series) >= 2:
    small, big = series[0], series[-1]
    non_data = lambda r: r["peak_rss_bytes"] - r["data_bytes"]
    growth = ((non_data(big) - non_data(small)) / (big["clients"] - small["clients"])
              / big["delta_bytes_per_client"])
    per_client = [r["round_s"] / r["clients"] for r in series if r["clients"] >= 100] or \
                 [r["round_s"] / r["clients"] for r in series]
    linear = max(per_client) / min(per_client)
  on = series and {k: series[0][k] for k in ("model", "algorithm", "num_global_models")}
  checks.append(_check(
      "memory_grows_with_chunk_not_clients",
      "peak RSS beyond the data grows < 0.5 deltas per extra client (stacking: >= 1)",
      growth, growth is not None and growth < 0.5) | {"series": on or None})
  checks.append(_check(
      "round_time_linear_in_clients",
      "seconds per client (scales >= 100 clients) vary by <= 1.3x", linear,
      linear is not None and linear <= 1.3) | {"series": on or None})
  return {"kind": "targets", "checks": checks}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  ks = [int(k) for k in FLAGS.num_global_models]
  if FLAGS.scaling_worker:
    config = make_config(FLAGS.algorithm[0], FLAGS.model[0], ks[0])
    print(json.dumps(scaling_row(config, FLAGS.scaling_worker, FLAGS.scaling_rounds)), flush=True)
    return
  runs = [(m, a, k) for m in FLAGS.model for a in FLAGS.algorithm
          for k in (ks[:1] if a == "fedavg" else ks)]
  configs = [make_config(a, m, k) for m, a, k in runs]  # Fail fast.
  peak = matmul_peak_gflops(FLAGS.peak_size)
  rows: List[Dict[str, Any]] = []

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  for model in FLAGS.model:
    data = synthetic_data(model, FLAGS.clients, FLAGS.examples_per_client, FLAGS.seed)
    reference = None
    if FLAGS.reference:
      reference_config = make_config("fedavg", model, 1)
      reference_config.model.conv_impl = FLAGS.reference_conv_impl
      reference = loop_reference(reference_config, data, FLAGS.rounds)
      emit(reference)
    for config in (c for c in configs if c.model.name == model):
      emit(round_row(config, data, peak, FLAGS.rounds, reference))
      if FLAGS.breakdown:
        emit(breakdown_row(config, data, FLAGS.rounds))
  if FLAGS.scaling:
    for m, a, k in runs:
      rows.extend(run_scaling(a, m, k))
  if FLAGS.targets:
    emit(targets_row(rows))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)  # Quiet logs; --verbosity=1 for detail.
