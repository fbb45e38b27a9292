"""The `scaling` rows: one population size per fresh process (peak RSS never decreases in a
process), its round time and memory."""

import json
import subprocess
import sys
from typing import Any, Dict, List

import numpy as np

from fedmerge_jax import evaluation
from fedmerge_jax import parallel
from fedmerge_jax import train
from fedmerge_jax.benchmark.memory import StagePeaks, peak_device_bytes
from fedmerge_jax.benchmark.timing import time_rounds
from fedmerge_jax.benchmark.workloads import setting, synthetic_data


def scaling_row(
  config,
  num_clients: int,
  num_rounds: int,
  examples_per_client: int,
  example_shape=None,
  num_classes: int = 0,
) -> Dict[str, Any]:
  """One scale, measured in this process: data (float16), init, compile, timed rounds and an
  evaluation of every client, each stage's own peak host memory in `peak_rss_by_stage_bytes`
  (`peak_rss_bytes` their largest)."""
  config = config.copy_and_resolve_references()
  config.clients_per_round = 0
  peaks = StagePeaks()
  with peaks.stage("data"):
    data = synthetic_data(
      config.model.name,
      np.full(num_clients, examples_per_client),
      config.seed,
      np.float16,
      name="equal",
      example_shape=example_shape,
      num_classes=num_classes,
    )
  timed = time_rounds(config, data, num_rounds, warmup_rounds=0, peaks=peaks)
  with peaks.stage("evaluation"):
    clients, examples = evaluation.chunk_sizes(config, data)
    evaluation.make_evaluator(
      timed["algorithm"], data, clients, None, train.compiler_options(config), examples
    )(timed["state"])
  return {
    "kind": "scaling",
    "algorithm": config.algorithm,
    "num_global_models": config.num_global_models,
    **setting(config, data),
    "client_parallelism": parallel.resolve_parallelism(config.client_parallelism),
    "client_chunk_size": config.client_chunk_size,
    "compile_s": timed["compile_s"],
    "round_s": timed["round_s"],
    "examples_per_s": timed["useful_examples_per_s"],
    "data_bytes": int(data.train.nbytes + data.test.nbytes),
    "delta_bytes_per_client": 4 * timed["algorithm"].communication[1],
    "peak_rss_bytes": max(peaks.bytes.values()),
    "peak_rss_by_stage_bytes": peaks.bytes,
    "peak_device_bytes": peak_device_bytes(),
  }


def run_scaling(
  algorithm: str, model: str, num_global_models: int, scaling_clients, passed_flags: List[str]
) -> List[Dict[str, Any]]:
  """Each scale in a fresh process of the benchmark (peak RSS never decreases in a process),
  given the `--name=value` flags in `passed_flags`."""
  rows = []
  for num_clients in map(int, scaling_clients):
    argv = [
      sys.executable,
      "-m",
      "fedmerge_jax.benchmark",
      f"--scaling_worker={num_clients}",
      f"--algorithm={algorithm}",
      f"--model={model}",
      f"--num_global_models={num_global_models}",
      *passed_flags,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode or not lines:
      row = {
        "kind": "scaling",
        "algorithm": algorithm,
        "model": model,
        "clients": num_clients,
        "error": (result.stderr.strip().splitlines() or ["exit %d" % result.returncode])[-1],
      }
    else:
      row = json.loads(lines[-1])
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows
