"""Peak host memory per stage of the paper's configuration (configs/cifar100_cluster.py: 50
clients, ResNet-9, every client evaluated every round), stage by stage as train.py runs them:
data loading, state init, compiling the round, the first round (an evaluation round: the gap
probe's test split attached), evaluation, the gap's evaluation; and XLA's memory analysis of
the compiled round and evaluation programs. --make_archive first writes a synthetic archive of
CIFAR-100's size (50,000 + 10,000 random 32x32x3 uint8 images) into the data_dir.

  PYTHONPATH=. nice python benchmarks/cifar100_memory.py --make_archive \
      --config.data.data_dir=/tmp/cifar100_fake --config.local_epochs=1

Prints a line per stage as it ends, then one JSON line: per stage `peak_mb` (the stage's own
peak resident memory, reset before it) and `after_mb` (resident after it); `programs_mb`:
temporaries and arguments of the compiled programs.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import evaluation
from fedmerge_jax import gap
from fedmerge_jax import parallel
from fedmerge_jax import train
from fedmerge_jax.benchmark.memory import StagePeaks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config_flags.DEFINE_config_file(
  "config",
  os.path.join(ROOT, "configs", "cifar100_cluster.py"),
  "The run's config (overrides: --config.local_epochs=1).",
)
flags.DEFINE_bool(
  "make_archive",
  False,
  "Write a synthetic CIFAR-100-sized binary archive to "
  "config.data.data_dir first (if none is there).",
)
flags.DEFINE_string(
  "round_hlo", "", "Write the compiled round's optimised HLO text to this file (to read it)."
)
FLAGS = flags.FLAGS
MB = 2**20


def make_archive(data_dir: str, seed: int = 0) -> None:
  """cifar-100-binary/{train,test}.bin: records [coarse, fine, 3072 CHW pixels], 500 train
  and 100 test images per class, random pixels and order."""
  folder = os.path.join(data_dir, "cifar-100-binary")
  if os.path.isdir(folder):
    return
  os.makedirs(folder)
  rng = np.random.default_rng(seed)
  for name, per_class in (("train.bin", 500), ("test.bin", 100)):
    fine = rng.permutation(np.repeat(np.arange(100), per_class)).astype(np.uint8)
    records = np.empty((len(fine), 2 + 3072), np.uint8)
    records[:, 0], records[:, 1] = fine // 5, fine
    records[:, 2:] = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
    records.tofile(os.path.join(folder, name))


def print_stage(name: str, peak: int, after: int) -> None:
  print(
    json.dumps({"stage": name, "peak_mb": round(peak / MB), "after_mb": round(after / MB)}),
    flush=True,
  )


def program_mb(compiled) -> dict:
  analysis = compiled.memory_analysis()
  return {
    "temp": analysis.temp_size_in_bytes / MB,
    "arguments": analysis.argument_size_in_bytes / MB,
  }


def main(argv):
  del argv
  config = config_lib.resolve(FLAGS.config)
  if FLAGS.make_archive:
    make_archive(config.data.data_dir)
  peaks, programs, start = StagePeaks(print_stage), {}, time.perf_counter()
  with peaks.stage("data"):
    data = data_lib.load(config.data)
  with peaks.stage("init"):
    mesh = parallel.make_mesh(config.num_devices)
    layout = parallel.client_layout(
      mesh.size, data.num_clients, config.clients_per_round, config.client_chunk_size
    )
    _, algorithm = train.build(config, data, layout)
    state, shardings = parallel.sharded_init(
      algorithm.init, mesh, layout.population, jax.random.key(config.seed)
    )
    state = jax.block_until_ready(state)
  with peaks.stage("compile"):
    gather_round = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
    ids, sharded_ids, batch = gather_round(np.arange(data.num_clients), data.test)
    rng = jax.random.key(1)
    round_fn = train.compile_round(algorithm, config, mesh, shardings)
    compiled = round_fn.lower(state, sharded_ids, batch, rng).compile()
    programs["round"] = program_mb(compiled)
    if FLAGS.round_hlo:
      with open(FLAGS.round_hlo, "w") as f:
        f.write(compiled.as_text())
  with peaks.stage("round"):
    state, round_metrics = compiled(state, sharded_ids, batch, rng)
    jax.block_until_ready(state)
    del batch
  # As train.py chooses them; a checkout without evaluation.chunk_sizes (before it) evaluates
  # config.client_chunk_size clients at once, every example of a client in one batch.
  chunks = getattr(evaluation, "chunk_sizes", lambda c, d: (c.client_chunk_size, 0))(config, data)
  extra = (chunks[1],) if chunks[1] else ()
  with peaks.stage("evaluation"):
    evaluate = evaluation.make_evaluator(
      algorithm, data, chunks[0], mesh, train.compiler_options(config), *extra
    )
    metrics = evaluate(state)
  with peaks.stage("gap"):
    measure_gap = gap.make_gap_evaluator(
      algorithm, data, chunks[0], train.compiler_options(config), *extra
    )
    gap_scalars, _ = measure_gap(state, ids, round_metrics)
  print(
    json.dumps(
      {
        "config": "cifar100_cluster",
        "local_epochs": config.local_epochs,
        "clients": data.num_clients,
        "train_examples": int(data.train.counts.sum()),
        "data_mb": (data.train.nbytes + data.test.nbytes + (data.val.nbytes if data.val else 0))
        / MB,
        "x_dtype": str(data.train.x.dtype),
        "eval_chunks": list(chunks),
        "peak_mb": {k: round(v / MB) for k, v in peaks.bytes.items()},
        "after_mb": {k: round(v / MB) for k, v in peaks.after.items()},
        "programs_mb": programs,
        "test/acc_mean": metrics["test/acc_mean"],
        "val/loss": metrics["val/loss"],
        "gap/acc_mean": gap_scalars["gap/acc_mean"],
        "wall_s": time.perf_counter() - start,
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  app.run(main)
