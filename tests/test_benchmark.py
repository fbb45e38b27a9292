"""The benchmark's modes run on a tiny setting and print JSON lines with the expected keys."""

import json
import os
import subprocess
import sys

import numpy as np

from fedmerge_jax import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_prints_every_kind_of_line():
  argv = [sys.executable, "-m", "fedmerge_jax.benchmark", "--model=mlp",
          "--algorithm=fedavg,fedmerge", "--num_global_models=2", "--clients=2",
          "--examples_per_client=8", "--batch_size=4", "--rounds=1", "--breakdown", "--scaling",
          "--scaling_clients=2,3", "--targets", "--peak_size=128"]
  result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  kinds = [r["kind"] for r in rows]
  assert kinds.count("reference") == 1 and kinds.count("round") == 2
  assert kinds.count("breakdown") == 2 and kinds.count("scaling") == 4
  assert kinds[-1] == "targets"
  for row in rows:
    if row["kind"] == "round":
      assert row["examples_per_s"] > 0 and row["speedup_vs_loop"] > 0
      assert 0 < row["fraction_of_peak"] and row["client_parallelism"] in ("vmap", "sequential")
    if row["kind"] == "breakdown":
      assert all(row[k] > 0 for k in ("merge_s", "train_s", "server_s", "eval_s", "round_s"))
    if row["kind"] == "scaling":
      assert row["round_s"] > 0 and row["peak_rss_bytes"] > 0 and "peak_device_bytes" in row
  checks = {c["name"]: c for c in rows[-1]["checks"]}
  assert checks["fedmerge_k5_overhead"]["pass"] is None  # Not the target setting: unmeasured.
  assert checks["round_time_linear_in_clients"]["measured"] > 0


def test_targets_pass_and_fail_on_given_rows():
  setting = dict(benchmark.TARGET_SETTING)
  rows = [{"kind": "reference", "model": "emnist_cnn", "examples_per_s": 1000.0},
          {"kind": "round", "algorithm": "fedavg", "num_global_models": 1, **setting,
           "examples_per_s": 3000.0, "speedup_vs_loop": 3.0, "fraction_of_peak": 0.4,
           "round_s": 1.0},
          {"kind": "round", "algorithm": "fedmerge", "num_global_models": 5, **setting,
           "examples_per_s": 2900.0, "speedup_vs_loop": 2.9, "fraction_of_peak": 0.4,
           "round_s": 1.05}]
  scale = lambda c, rss: {"kind": "scaling", "model": "emnist_cnn", "algorithm": "fedavg",
                          "num_global_models": 1, "clients": c,
                          "round_s": 0.1 * c, "peak_rss_bytes": rss, "data_bytes": 1000 * c,
                          "delta_bytes_per_client": 4_000_000}
  rows += [scale(100, 2e9), scale(3400, 2e9 + 3300 * 1000)]
  checks = {c["name"]: c["pass"] for c in benchmark.targets_row(rows)["checks"]}
  assert checks == {"fedavg_emnist_cnn_vs_fedjax": True, "fedavg_emnist_cnn_speedup_vs_loop": True,
                    "fedavg_emnist_cnn_fraction_of_peak": False, "fedmerge_k5_overhead": True,
                    "emnist_cnn_3400_clients_fit_24gib": True,
                    "memory_grows_with_chunk_not_clients": True,
                    "round_time_linear_in_clients": True}


def test_synthetic_data_is_compact_and_shaped_per_model():
  data = benchmark.synthetic_data("resnet9", 3, 5, seed=0, dtype=np.float16)
  assert data.train.x.shape == (3, 5, 32, 32, 3) and data.train.x.dtype == np.float16
  assert data.num_classes == 100 and data.train.y.max() < 100
