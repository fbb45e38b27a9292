"""The benchmark's measures: useful examples/s and the real fraction, worked by hand; the
workloads' size distributions; ragged synthetic data; the targets line; one tiny full run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_base_config
from fedmerge_jax import benchmark
from fedmerge_jax import config as config_lib
from fedmerge_jax.client import LocalConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Clients of 45, 30 and 10 examples then a phantom, batch 20, 2 epochs: worked by hand.
# 'epoch': ceil(n/20) steps an epoch -> 6, 4, 2, 0 steps; 'stream': ceil(2n/20) -> 5, 3, 1, 0.
COUNTS = [45, 30, 10, 0]


@pytest.mark.parametrize(
  "batching, parallelism, chunk, steps",
  [
    ("epoch", "sequential", 0, 6 + 4 + 2),
    ("epoch", "vmap", 0, 4 * 6),  # One chunk of 4 runs the largest's 6 steps.
    ("epoch", "vmap", 2, 2 * 6 + 2 * 2),  # [45, 30] -> 6 steps each, [10, 0] -> 2 each.
    ("epoch", "vmap", 3, 3 * 6 + 1 * 0),  # The remainder [0] is a chunk of its own.
    ("stream", "sequential", 0, 5 + 3 + 1),
    ("stream", "vmap", 2, 2 * 5 + 2 * 1),
  ],
)
def test_computed_examples_by_hand(batching, parallelism, chunk, steps):
  local = LocalConfig(local_epochs=2, batch_size=20, client_lr=0.1, prox_mu=0.0, batching=batching)
  assert benchmark.computed_examples(COUNTS, local, parallelism, chunk) == steps * 20
  assert benchmark.useful_examples(COUNTS, 2) == 170


def test_a_remainder_chunk_computes_for_its_own_members_only():
  local = LocalConfig(2, 20, 0.1, 0.0, "epoch")  # [45, 30] -> 6 steps each, [10] alone -> 2.
  assert benchmark.computed_examples([45, 30, 10], local, "vmap", 2) == (2 * 6 + 2) * 20


def test_the_static_loop_computes_the_padded_lengths_steps_for_every_member():
  local = LocalConfig(2, 20, 0.1, 0.0, "epoch")  # Padded to 64: 2 x ceil(64/20) = 8 steps.
  assert benchmark.computed_examples([45, 30, 10], local, "vmap", 2, static_steps=8) == 3 * 8 * 20


def test_benchmark_flags_for_the_gpu_script_on_a_tiny_cpu_run():
  """bf16, the static loop, unroll, command buffers (ignored on CPU), the kernel profile and
  both dtypes' matmul peaks, as benchmarks/gpu_vmap.sh passes them."""
  argv = [
    sys.executable,
    "-m",
    "fedmerge_jax.benchmark",
    "--model=mlp",
    "--algorithm=fedavg",
    "--client_sizes=9,3,5",
    "--batch_size=4",
    "--rounds=1",
    "--reference=false",
    "--peak_size=64",
    "--client_parallelism=vmap",
    "--client_chunk_size=2",
    "--compute_dtype=bfloat16",
    "--local_loop=static",
    "--local_unroll=2",
    "--command_buffers=loops",
    "--profile_kernels=3",
  ]
  result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
  (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert (row["compute_dtype"], row["local_loop"], row["local_unroll"], row["command_buffers"]) == (
    "bfloat16",
    "static",
    2,
    "loops",
  )
  assert set(row["matmul_peaks_gflops"]) == {"float32", "bfloat16"}
  assert row["matmul_peak_gflops"] == row["matmul_peaks_gflops"]["bfloat16"]
  # Padded to 12 rows: 3 steps of 4 rows for every client under the static loop; 17 real.
  assert row["real_fraction"] == pytest.approx(17 / 36)
  assert 0 < len(row["top_kernels"]) <= 3 and all(ms >= 0 for _, ms, _ in row["top_kernels"])


def test_timed_rounds_report_the_real_fraction_of_largest_first_vmap_chunks():
  # Sizes 9, 3, 5, batch 4, 2 epochs 'stream': 34 real examples; ceil(2n/4) = 5, 2, 3 steps.
  # Largest first [9, 5, 3] in chunks of 2: [9, 5] run 5 steps each, [3] 2 steps -> 12 steps
  # x 4 rows = 48 computed. ('epoch' would be 6, 2, 4 steps -> 56.)
  config = tiny_base_config()
  config.model.hidden_sizes = (4,)
  config.algorithm, config.num_global_models, config.local_epochs = "fedavg", 1, 2
  config.local_batching = "stream"
  config.client_parallelism, config.client_chunk_size, config.clients_per_round = "vmap", 2, 0
  config = config_lib.resolve(config)
  data = benchmark.synthetic_data("mlp", [9, 3, 5], seed=0)
  timed = benchmark.time_rounds(config, data, num_rounds=1, warmup_rounds=0)
  assert timed["real_fraction"] == pytest.approx(34 / 48)
  assert [list(r) for r in timed["rounds"]] == [[0, 2, 1]]
  assert timed["useful_examples_per_s"] == pytest.approx(34 / timed["round_s"], rel=1e-6)
  assert timed["examples_per_s"] == pytest.approx(48 / timed["round_s"], rel=1e-6)


def test_loop_reference_batches_each_client_own_examples():
  rng = np.random.default_rng(0)
  epoch = benchmark.client_batches(rng, 45, LocalConfig(2, 20, 0.1, 0.0, "epoch"))
  assert [len(b) for b in epoch] == [20, 20, 5, 20, 20, 5]
  for half in (epoch[:3], epoch[3:]):  # Every epoch a permutation of the 45 examples.
    assert sorted(np.concatenate(half)) == list(range(45))
  stream = benchmark.client_batches(rng, 45, LocalConfig(2, 20, 0.1, 0.0, "stream"))
  assert [len(b) for b in stream] == [20, 20, 20, 20, 10]
  assert np.bincount(np.concatenate(stream)).tolist() == [2] * 45


def test_femnist_sizes_are_shaped_like_femnist_writers():
  sizes = benchmark.femnist_sizes(100, seed=0)
  assert sizes.shape == (100,) and sizes.min() >= 20 and sizes.max() <= 418
  assert 190 <= sizes.mean() <= 225 and sizes.max() >= 380  # FEMNIST: mean ~206, up to 418.
  assert np.median(sizes) < sizes.mean()  # Skewed right, as writers are.
  assert (sizes == benchmark.femnist_sizes(100, seed=0)).all()
  assert (sizes != benchmark.femnist_sizes(100, seed=1)).any()


def test_cifar100_cluster_sizes_are_the_paper_split():
  sizes = benchmark.cifar100_cluster_sizes()
  assert sizes.shape == (50,) and sizes.min() > 0
  assert 0.85 * 50_000 <= sizes.sum() <= 50_000  # All of train but the validation share.
  assert sizes.max() / sizes.min() > 1.5  # Unequal clients.


def test_client_sizes_and_workload_parsing():
  assert benchmark.parse_workloads(["30", "200", "418"]) == ["30,200,418"]
  assert benchmark.parse_workloads(["equal", "femnist"]) == ["equal", "femnist"]
  assert benchmark.client_sizes("30,200,418", 7, 5, 0).tolist() == [30, 200, 418]
  assert benchmark.client_sizes("equal", 3, 5, 0).tolist() == [5, 5, 5]
  with pytest.raises(ValueError, match="unknown workload 'femnits'"):
    benchmark.parse_workloads(["equal", "femnits"])


def test_synthetic_data_is_ragged_and_its_bytes_are_the_real_examples():
  data = benchmark.synthetic_data("emnist_cnn", [3, 50, 7], seed=0, dtype=np.float16)
  assert data.train.x.shape == (60, 28, 28, 1) and data.train.x.dtype == np.float16
  assert data.train.counts.tolist() == [3, 50, 7] and data.num_classes == 62
  real = 60 * (28 * 28 * 2 + 4)
  measured = benchmark.data_bytes(data.train)
  assert measured["real_bytes"] == real
  assert measured["train_bytes"] == real + 4 * 8  # Plus the offsets.
  assert measured["memory_ratio"] == pytest.approx((real + 32) / real)
  resnet = benchmark.synthetic_data("resnet9", [2, 1], seed=0)
  assert resnet.train.x.shape == (3, 32, 32, 3) and resnet.train.y.max() < 100
  # --image_shape / --num_classes: the EMNIST CNN on the CIFAR-10 shape.
  cifar10 = benchmark.synthetic_data(
    "emnist_cnn", [40, 1], seed=0, example_shape=["32", "32", "3"], num_classes=10
  )
  assert cifar10.train.x.shape == (41, 32, 32, 3) and cifar10.num_classes == 10
  assert 5 < cifar10.train.y.max() < 10


def _round(algorithm, workload, useful, speedup=3.0, k=1, memory=1.0, clients=100):
  return {
    "kind": "round",
    "algorithm": algorithm,
    "num_global_models": k,
    "model": "emnist_cnn",
    "workload": workload,
    "clients": clients,
    "clients_per_round": 10,
    "batch_size": 20,
    "local_epochs": 1,
    "examples_per_client": 200 if workload == "equal" else None,
    "total_examples": 20_600,
    "useful_examples_per_s": useful,
    "speedup_vs_loop": speedup,
    "fraction_of_peak": 0.4,
    "memory_ratio": memory,
  }


def test_targets_judge_unequal_clients_and_say_what_they_need():
  checks = lambda rows: {c["name"]: c for c in benchmark.targets_row(rows)["checks"]}
  none = checks([_round("fedavg", "equal", 1000.0)])
  assert "--client_sizes=equal,femnist" in none["fedavg_femnist_vs_equal_sizes"]["needs"]
  assert "--clients_per_round=10" in none["fedavg_femnist_vs_equal_sizes"]["needs"]
  assert "--client_sizes=femnist" in none["fedavg_femnist_vs_loop"]["needs"]
  assert "--num_global_models=5" in none["fedmerge_k5_overhead"]["needs"]
  assert "--client_sizes=femnist" in none["femnist_host_memory"]["needs"]
  assert "--scaling" in none["round_time_linear_in_clients"]["needs"]
  assert all(c["pass"] is None for n, c in none.items())
  rows = [
    _round("fedavg", "equal", 1000.0),
    _round("fedavg", "femnist", 950.0, speedup=1.5, memory=1.3),
    _round("fedmerge", "femnist", 900.0, k=5, memory=1.3),
  ]
  judged = checks(rows)
  assert judged["fedavg_femnist_vs_equal_sizes"]["measured"] == pytest.approx(0.95)
  assert judged["fedavg_femnist_vs_equal_sizes"]["pass"] is True
  assert judged["fedavg_femnist_vs_loop"]["pass"] is False
  assert judged["fedmerge_k5_overhead"]["measured"] == pytest.approx(950 / 900 - 1)
  assert judged["fedmerge_k5_overhead"]["pass"] is True
  assert judged["femnist_host_memory"]["pass"] is False
  assert "needs" not in judged["fedavg_femnist_vs_equal_sizes"]
  rows[0]["useful_examples_per_s"] = 1100.0  # 950 / 1100 < 0.9.
  assert checks(rows)["fedavg_femnist_vs_equal_sizes"]["pass"] is False
  rows[2]["useful_examples_per_s"] = 850.0  # 950 / 850 - 1 > 10%.
  assert checks(rows)["fedmerge_k5_overhead"]["pass"] is False
  rows[0]["clients"] = 10  # Equal sizes on another population: not comparable.
  assert checks(rows)["fedavg_femnist_vs_equal_sizes"]["measured"] is None


def test_targets_pass_and_fail_on_the_equal_and_scaling_rows():
  scale = lambda c, rss: {
    "kind": "scaling",
    "model": "emnist_cnn",
    "algorithm": "fedavg",
    "num_global_models": 1,
    "clients": c,
    "round_s": 0.1 * c,
    "peak_rss_bytes": rss,
    "data_bytes": 1000 * c,
    "delta_bytes_per_client": 4_000_000,
  }
  rows = [
    scale(100, 2e9),
    scale(3400, 2e9 + 3300 * 1000),
    _round("fedavg", "equal", 3000.0, speedup=1.5, clients=10),
  ]  # The 10 x 200 setting.
  checks = {c["name"]: c["pass"] for c in benchmark.targets_row(rows)["checks"]}
  assert checks["fedavg_emnist_cnn_vs_fedjax"] is True  # 3,000 >= 2 x 1,400.
  assert checks["fedavg_emnist_cnn_speedup_vs_loop"] is False
  assert checks["emnist_cnn_3400_clients_fit_24gib"] is True
  assert checks["memory_grows_with_chunk_not_clients"] is True
  assert checks["round_time_linear_in_clients"] is True


def test_benchmark_prints_every_kind_of_line():
  argv = [
    sys.executable,
    "-m",
    "fedmerge_jax.benchmark",
    "--model=mlp",
    "--algorithm=fedavg",
    "--client_sizes=9,3,5",
    "--clients_per_round=2",
    "--batch_size=4",
    "--local_batching=stream",
    "--rounds=1",
    "--breakdown",
    "--scaling",
    "--scaling_clients=2,3",
    "--examples_per_client=4",
    "--targets",
    "--peak_size=64",
  ]
  result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  kinds = [r["kind"] for r in rows]
  assert kinds == ["reference", "round", "breakdown", "scaling", "scaling", "targets"]
  reference, row = rows[0], rows[1]
  assert row["workload"] == "list" and row["sizes"] == {
    "min": 3,
    "median": 5.0,
    "mean": 17 / 3,
    "max": 9,
  }
  assert row["local_batching"] == reference["local_batching"] == "stream"
  assert row["useful_examples_per_s"] > 0 and 0 < row["real_fraction"] < 1  # 9 -> 3 batches of 4.
  assert row["speedup_vs_loop"] == pytest.approx(
    row["useful_examples_per_s"] / reference["useful_examples_per_s"]
  )
  assert all(rows[2][k] > 0 for k in ("merge_s", "train_s", "server_s", "eval_s", "round_s"))
  assert all(r["round_s"] > 0 and r["peak_rss_bytes"] > 0 for r in rows[3:5])
  stages = rows[3]["peak_rss_by_stage_bytes"]  # Each stage's own peak; the row's is the largest.
  assert list(stages) == ["data", "init", "compile", "rounds", "evaluation"]
  assert min(stages.values()) > 0 and rows[3]["peak_rss_bytes"] == max(stages.values())
  checks = {c["name"]: c for c in rows[-1]["checks"]}
  assert checks["fedmerge_k5_overhead"]["pass"] is None and checks["fedmerge_k5_overhead"]["needs"]
  assert checks["round_time_linear_in_clients"]["measured"] > 0
