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
  the round time, peak host RSS (and per stage: data, init, compile, rounds, evaluation, in
  `peak_rss_by_stage_bytes`) and peak device memory (None where the backend has none);
- `targets` (--targets): each of the project's targets, the measured value, pass/fail,
  or, where this run did not measure it, the flags it `needs`.

The package's modules: `workloads` (client sizes, synthetic data), `timing` (rounds timed as
train.py runs them; `round` and `breakdown` rows), `reference` (the loop of jitted steps),
`flops` (XLA's FLOP count, the matmul peak), `memory` (peak host memory per stage),
`scaling` (one scale a process), `targets`, `options` (the flags) and `__main__` (the
command). Importing the package defines no flags.
"""

from fedmerge_jax.benchmark.flops import cost_flops, matmul_peak_gflops, train_step_flops
from fedmerge_jax.benchmark.reference import (
  client_batches,
  local_config,
  loop_reference,
  sgd_step_fn,
  useful_examples,
)
from fedmerge_jax.benchmark.memory import StagePeaks, peak_device_bytes, peak_rss_bytes
from fedmerge_jax.benchmark.scaling import scaling_row
from fedmerge_jax.benchmark.targets import targets_row
from fedmerge_jax.benchmark.timing import (
  breakdown_row,
  computed_examples,
  round_row,
  round_schedule,
  time_rounds,
  top_kernels,
)
from fedmerge_jax.benchmark.workloads import (
  MODELS,
  WORKLOADS,
  cifar100_cluster_sizes,
  client_sizes,
  data_bytes,
  femnist_sizes,
  parse_workloads,
  size_summary,
  synthetic_data,
)

__all__ = [
  "MODELS",
  "StagePeaks",
  "WORKLOADS",
  "breakdown_row",
  "cifar100_cluster_sizes",
  "client_batches",
  "client_sizes",
  "computed_examples",
  "cost_flops",
  "data_bytes",
  "femnist_sizes",
  "local_config",
  "loop_reference",
  "matmul_peak_gflops",
  "parse_workloads",
  "peak_device_bytes",
  "peak_rss_bytes",
  "round_row",
  "round_schedule",
  "scaling_row",
  "sgd_step_fn",
  "size_summary",
  "synthetic_data",
  "targets_row",
  "time_rounds",
  "top_kernels",
  "train_step_flops",
  "useful_examples",
]
