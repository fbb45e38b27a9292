"""benchmarks/gpu_vmap.sh's CPU-checkable parts: its syntax, that every run it would start
passes flags the benchmark accepts, and its table."""

import copy
import importlib.util
import os
import shlex
import subprocess

from absl import flags

from fedmerge_jax.benchmark import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_vmap.sh")


def _benchmark_flags() -> flags.FlagValues:
  """The benchmark's own flags alone: absl's global FLAGS also holds what other test files
  imported (launch.py's required --config), which must not take part in the parse."""
  own = flags.FlagValues()
  for flag in options.FLAGS.get_flags_for_module(options.__name__):
    own[flag.name] = copy.deepcopy(flag)
  return own


def _dry_run(**env):
  result = subprocess.run(
    ["bash", SCRIPT],
    env={**os.environ, "DRY_RUN": "1", **env},
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": python" in line)


def test_script_parses_and_every_run_passes_flags_the_benchmark_accepts():
  subprocess.run(["bash", "-n", SCRIPT], check=True)
  runs = _dry_run(MATMUL_IMPL="xla")  # An impl the benchmark accepts here.
  assert {
    "chosen_xla",
    "chosen_matmul",
    "chosen_bf16",
    "loop_while_cb_default",
    "loop_static_cb_loops",
    "loop_static_unroll_4",
    "vmap_32",
    "vmap_128",
    "sequential",
  } <= set(runs)
  assert "--compute_dtype=bfloat16" in runs["chosen_bf16"]
  assert "--client_sizes=femnist,equal" in runs["chosen_xla"]
  assert "--model=emnist_cnn,leaf_femnist_cnn,resnet9" in runs["vmap_32"]
  assert "--conv_impl=xla" in runs["chosen_matmul"]  # MATMUL_IMPL is the one variable.
  # Parse every run's flags as the benchmark would, without running anything.
  own = _benchmark_flags()
  for cmd in runs.values():
    try:
      own(["benchmark", *shlex.split(cmd)[3:]])
    finally:
      own.unparse_flags()


def _table_module():
  spec = importlib.util.spec_from_file_location(
    "gpu_vmap_table", os.path.join(ROOT, "benchmarks", "gpu_vmap_table.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_table_marks_the_slowest_and_the_fastest_variants_kernels():
  def row(label, rate, chunk, requested, kernels):
    return {
      "kind": "round",
      "label": label,
      "model": "emnist_cnn",
      "workload": "femnist",
      "conv_impl": "xla",
      "compute_dtype": "float32",
      "local_loop": "while",
      "command_buffers": "default",
      "client_parallelism": "vmap",
      "client_chunk_size": chunk,
      "requested_chunk_size": requested,
      "useful_examples_per_s": rate,
      "real_fraction": 0.9,
      "fraction_of_peak": 0.01,
      "round_s": 1.0,
      "compile_s": 2.0,
      "backend": "gpu",
      "matmul_peaks_gflops": {"float32": 400e3, "bfloat16": 800e3},
      "top_kernels": kernels,
    }

  rows = [
    row("vmap_32", 10.0, 32, 32, [["slow_conv", 5.0, 0.5]]),
    row("chosen_xla", 99.0, 40, 0, [["fast_gemm", 1.0, 0.7]]),
    row("vmap_128", 50.0, 128, 128, None),
    {"kind": "targets"},
  ]
  text = _table_module().table(rows)
  assert text.count("| emnist_cnn |") == 3 and "chosen: 40" in text
  slowest, fastest = text.split("Slowest variant: ")[1].split("Fastest variant: ")
  assert slowest.startswith("vmap_32") and "slow_conv" in slowest
  assert fastest.startswith("chosen_xla") and "fast_gemm" in fastest
  assert "float32 400,000 GFLOP/s" in text and "bfloat16 800,000 GFLOP/s" in text
