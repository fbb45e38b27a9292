"""What checkpoints cost the round loop: rounds/s with checkpoints off and every round (the
worst case), on the offline default and on a FEMNIST-shaped synthetic federation.

  PYTHONPATH=. python benchmarks/checkpoint_cost.py [--which=default,femnist] [--repeats=2]

Prints one JSON line per (data, checkpoint_every, repeat): the loop's rounds/s after the
first evaluation window (which holds the compilation), from metrics.jsonl. Set
JAX_COMPILATION_CACHE_DIR to compile each program once.
"""

import argparse
import json
import os
import runpy
import statistics
import tempfile

import numpy as np

from fedmerge_jax import train
from fedmerge_jax.config import base_config
from fedmerge_jax.data import FederatedData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def femnist_shaped(num_clients=100, seed=0):
  """Writers of FEMNIST's shapes: 28x28x1 images, 62 classes, 20..400+ examples each."""
  rng = np.random.default_rng(seed)
  sizes = np.clip(rng.lognormal(np.log(200), 0.6, num_clients), 20, 450).astype(int)

  def split(n):
    return (rng.random((n, 28, 28, 1), np.float32), rng.integers(0, 62, n).astype(np.int32))

  train_ = {f"w{i}": split(n) for i, n in enumerate(sizes)}
  test = {f"w{i}": split(max(n // 10, 2)) for i, n in enumerate(sizes)}
  return FederatedData.from_arrays(train_, test, num_classes=62, name="femnist_shaped")


def setups():
  default = runpy.run_path(os.path.join(ROOT, "configs", "default.py"))["get_config"]()
  default.num_rounds, default.eval_every = 60, 20
  femnist = base_config()
  femnist.update_from_flattened_dict(
    {
      "num_global_models": 5,
      "clients_per_round": 10,
      "batch_size": 20,
      "client_lr": 0.1,
      "local_batching": "stream",
      "model.name": "emnist_cnn",
      "num_rounds": 12,
      "eval_every": 4,
    }
  )
  return {"default": (default, None), "femnist": (femnist, femnist_shaped())}


def measure(config, data, checkpoint_every):
  config = config.copy_and_resolve_references()
  config.checkpoint_every, config.tensorboard = checkpoint_every, False
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir, data=data)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rates = [json.loads(line)["rounds_per_s"] for line in f][1:]  # Past the compile.
  return statistics.mean(rates)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--which", default="default,femnist")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  for name, (config, data) in setups().items():
    if name not in args.which.split(","):
      continue
    for repeat in range(args.repeats):
      for every in (0, 1):  # Interleaved: a loaded machine's drift hits each alike.
        rate = measure(config, data, every)
        print(
          json.dumps(
            {
              "data": name,
              "checkpoint_every": every,
              "repeat": repeat,
              "rounds_per_s": round(rate, 3),
            }
          ),
          flush=True,
        )


if __name__ == "__main__":
  main()
