"""Rounds timed as train.py runs them, the examples they compute, and the `round` and
`breakdown` rows."""

import functools
import glob
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from fedmerge_jax import client as client_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import evaluation
from fedmerge_jax import parallel
from fedmerge_jax import train
from fedmerge_jax.benchmark.flops import train_step_flops
from fedmerge_jax.benchmark.memory import StagePeaks
from fedmerge_jax.benchmark.reference import local_config, median_time, useful_examples
from fedmerge_jax.benchmark.workloads import data_bytes, setting
from fedmerge_jax.models.layers import resolve_conv_impl


def computed_examples(
  counts, local: client_lib.LocalConfig, parallelism: str, chunk_size: int, static_steps: int = 0
) -> int:
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


def round_schedule(config, num_clients: int, num_rounds: int) -> List[np.ndarray]:
  """The clients of rounds 1..num_rounds, sampled as train.py samples them."""
  sample_rng = jax.random.key(config.seed + 1)
  return [
    train.sample_clients(jax.random.fold_in(sample_rng, r), num_clients, config.clients_per_round)
    for r in range(1, num_rounds + 1)
  ]


def time_rounds(
  config,
  data: data_lib.FederatedData,
  num_rounds: int,
  warmup_rounds: int = 1,
  profile_kernels: int = 0,
  peaks: Optional[StagePeaks] = None,
) -> Dict[str, Any]:
  """Rounds run as train.py runs them: sampled clients largest first, padded to the round's
  bucket (`parallel.RoundGatherer`), the jitted, donated round of `train.compile_round`.

  `warmup_rounds` rounds run, then every bucket the timed rounds use is compiled, before
  timing. Returns compile_s, round_s (median), useful_examples_per_s and
  examples_per_s (medians of per-round rates), real_fraction (over the timed rounds), the
  chunk size and local loop used (`client_chunk_size=0` may be chosen: train.py's rule), the
  algorithm, the timed rounds' client ids in their order, the state after them and, with
  `profile_kernels`, the top kernels of one more round's profiler trace (`top_kernels`).
  `peaks` records the peak host memory of 'init', 'compile' and 'rounds'.
  """
  peaks = peaks or StagePeaks()
  with peaks.stage("init"):
    mesh = parallel.make_mesh(config.num_devices)
    config = config.copy_and_resolve_references()
    config.client_chunk_size = train.chosen_chunk_size(config, data, mesh)  # As train.py does.
    layout = parallel.client_layout(
      mesh.size, data.num_clients, config.clients_per_round, config.client_chunk_size
    )
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
  with peaks.stage("compile"):
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
    with peaks.stage("rounds"):
      ordered = one_round(ids)
    seconds.append(time.perf_counter() - start)
    padded = layout.pad_ids(ordered)
    counts = np.where(
      padded < data.num_clients, data.train.counts[np.minimum(padded, data.num_clients - 1)], 0
    )
    static_steps = (
      client_lib.num_local_steps(data.train.padded_length(ordered, config.batch_size), local)
      if loop == "static"
      else 0
    )
    useful.append(useful_examples(counts, config.local_epochs))
    computed.append(computed_examples(counts, local, parallelism, layout.chunk_size, static_steps))
    orders.append(ordered)
  kernels = None
  if profile_kernels:
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        one_round(timed[-1])
      kernels = top_kernels(trace_dir, profile_kernels)
  return {
    "compile_s": compile_s,
    "round_s": statistics.median(seconds),
    "useful_examples_per_s": statistics.median(u / s for u, s in zip(useful, seconds)),
    "examples_per_s": statistics.median(c / s for c, s in zip(computed, seconds)),
    "real_fraction": sum(useful) / sum(computed),
    "compiled_buckets": len(compiled),
    "client_chunk_size": layout.chunk_size,
    "local_loop": loop,
    "top_kernels": kernels,
    "algorithm": alg,
    "rounds": orders,
    "state": holder["state"],
  }


def top_kernels(trace_dir: str, top: int) -> List[List[Any]]:
  """[name, total ms, share of the device's time] of the `top` longest kernels of the
  profiler trace in `trace_dir`: the events of the device planes (GPU/TPU), or, on a
  backend without them (CPU), of the host's XLA threads."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    return []
  planes = list(jax.profiler.ProfileData.from_file(paths[0]).planes)
  devices = [p for p in planes if p.name.startswith("/device:")]
  lines = (
    [line for p in devices for line in p.lines]
    if devices
    else [
      line
      for p in planes
      if p.name == "/host:CPU"
      for line in p.lines
      if line.name.startswith("tf_XLA")
    ]
  )
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


def round_row(
  config,
  data,
  peaks: Dict[str, float],
  num_rounds: int,
  reference: Optional[Dict[str, Any]] = None,
  profile_kernels: int = 0,
) -> Dict[str, Any]:
  """One `round` result row for the resolved `config` on `data`; `peaks`: the measured
  matmul GFLOP/s per dtype, the row's fraction of peak against its compute dtype's."""
  timed = time_rounds(config, data, num_rounds, profile_kernels=profile_kernels)
  peak_gflops = peaks[config.compute_dtype]
  step_flops = train_step_flops(config, data.example_shape, data.num_classes, config.batch_size)
  flops_per_example = None if step_flops is None else step_flops / config.batch_size
  examples_per_s = timed["examples_per_s"]
  useful_per_s = timed["useful_examples_per_s"]
  achieved = None if flops_per_example is None else examples_per_s * flops_per_example / 1e9
  return {
    "kind": "round",
    "algorithm": config.algorithm,
    "num_global_models": config.num_global_models,
    **setting(config, data),
    "conv_impl": resolve_conv_impl(config.model.conv_impl),
    "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
    "client_chunk_size": timed["client_chunk_size"],
    "requested_chunk_size": config.client_chunk_size,
    "local_loop": timed["local_loop"],
    "local_unroll": config.local_unroll,
    "command_buffers": config.command_buffers,
    "compute_dtype": config.compute_dtype,
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "round_s": timed["round_s"],
    "compile_s": timed["compile_s"],
    "compiled_buckets": timed["compiled_buckets"],
    "useful_examples_per_s": useful_per_s,
    "examples_per_s": examples_per_s,
    "real_fraction": timed["real_fraction"],
    **data_bytes(data.train),
    "flops_per_example": flops_per_example,
    "achieved_gflops": achieved,
    "matmul_peak_gflops": peak_gflops,
    "matmul_peaks_gflops": peaks,
    "fraction_of_peak": None if achieved is None else achieved / peak_gflops,
    "top_kernels": timed["top_kernels"],
    "speedup_vs_loop": (
      None if reference is None else useful_per_s / reference["useful_examples_per_s"]
    ),
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
  evaluate = evaluation.make_evaluator(
    alg, data, config.client_chunk_size, compiler_options=options
  )
  stages = {
    "merge_s": lambda: merge(state, ids, batch),
    "train_s": lambda: train_stage(state, ids, batch, rng),
    "server_s": lambda: server(state, ids, batch, deltas),
    "eval_s": lambda: evaluate(state),
    "round_s": lambda: round_fn(state, ids, batch, rng),
  }
  row = {
    "kind": "breakdown",
    "algorithm": config.algorithm,
    "num_global_models": config.num_global_models,
    **setting(config, data),
    "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
    "client_chunk_size": config.client_chunk_size,
  }
  for name, fn in stages.items():
    jax.block_until_ready(fn())  # Compile.
    row[name] = median_time(lambda: jax.block_until_ready(fn()), num_rounds)
  return row
