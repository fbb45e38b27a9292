"""What `compute_dtype=bfloat16` does to accuracy, against float32, on CPU and offline:

- the offline default (configs/default.py: FedMerge K = 4 on scikit-learn's digits, MLP);
- a FEMNIST-shaped run: FedJAX's EMNIST CNN on 28x28x1 images, writers of FEMNIST-like sizes
  (the benchmark's log-normal `femnist_sizes`), 10 a round, 1 epoch of batch 20 at lr 0.1
  ('stream' batching), FedMerge K = 5 (config.femnist_training()). The images are the
  digits, scaled 3x and padded to 28x28, drawn with replacement per writer plus pixel noise:
  learnable, unlike the benchmark's random data.

  python benchmarks/bf16_accuracy.py --rounds_default=200 --rounds_femnist=20 --writers=30

Prints one JSON line per (run, dtype): the final test accuracy, the first and last
training loss and the wall time.
"""

import importlib.util
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from sklearn import datasets as sk_datasets

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fedmerge_jax import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedmerge_jax import cli
from fedmerge_jax import config as config_lib
from fedmerge_jax import train
from fedmerge_jax.data import FederatedData

flags.DEFINE_integer("rounds_default", 200, "Rounds of the offline default (0: skip it).")
flags.DEFINE_integer("rounds_femnist", 20, "Rounds of the FEMNIST-shaped run (0: skip it).")
flags.DEFINE_integer("writers", 30, "Writers of the FEMNIST-shaped run.")
FLAGS = flags.FLAGS


def femnist_shaped(num_writers: int, seed: int = 0) -> FederatedData:
  """Digits as 28x28x1 images in writers of FEMNIST-like sizes, 20% of each as test."""
  digits = sk_datasets.load_digits()
  images = np.kron(digits.images / 16.0, np.ones((3, 3)))  # 8x8 -> 24x24.
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.float32)
  rng = np.random.default_rng(seed)
  sizes = benchmark.femnist_sizes(num_writers, seed)
  train_split, test_split = {}, {}
  for w, n in enumerate(sizes):
    idx = rng.integers(0, len(images), int(n * 1.25))
    x = images[idx] + 0.1 * rng.standard_normal(images[idx].shape).astype(np.float32)
    y = digits.target[idx].astype(np.int32)
    train_split[f"w{w}"], test_split[f"w{w}"] = (x[:n], y[:n]), (x[n:], y[n:])
  return FederatedData.from_arrays(train_split, test_split, num_classes=10, name="femnist_shaped")


def run(name: str, config, data=None):
  for dtype in ("float32", "bfloat16"):
    config.compute_dtype = dtype
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      summary = train.train_and_evaluate(config, workdir, data=data)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["train/loss"] for line in f]
    print(
      json.dumps(
        {
          "run": name,
          "compute_dtype": dtype,
          "rounds": config.num_rounds,
          "test_acc_mean": summary["test/acc_mean"],
          "first_train_loss": losses[0],
          "last_train_loss": losses[-1],
          "wall_s": time.perf_counter() - start,
        }
      ),
      flush=True,
    )


def main(argv):
  del argv
  if FLAGS.rounds_default:
    path = os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"
    )
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.num_rounds = FLAGS.rounds_default
    config.checkpoint_every, config.tensorboard = 0, False
    run("default", config_lib.resolve(config))
  if FLAGS.rounds_femnist:
    config = config_lib.femnist_training()
    config.num_rounds, config.eval_every = FLAGS.rounds_femnist, 10
    config.checkpoint_every, config.tensorboard, config.data.val_fraction = 0, False, 0.0
    run("femnist_shaped", config_lib.resolve(config), femnist_shaped(FLAGS.writers))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
