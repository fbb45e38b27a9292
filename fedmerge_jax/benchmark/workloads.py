"""The benchmark's workloads: client size distributions and ragged synthetic data for them."""

import importlib.util
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from fedmerge_jax import data as data_lib
from fedmerge_jax.data import cifar100

# Per model: (example shape, classes). 'mlp' is sized for the 8x8 digits data.
MODELS = {
  "mlp": ((8, 8, 1), 10),
  "emnist_cnn": ((28, 28, 1), 62),
  "leaf_femnist_cnn": ((28, 28, 1), 62),
  "resnet9": ((32, 32, 3), 100),
}
WORKLOADS = ("equal", "femnist", "cifar100_cluster")
TEST_EXAMPLES_PER_CLIENT = 10
# femnist_sizes: log-normal(FEMNIST_LOG_MEAN, FEMNIST_LOG_STD) rounded, clipped to
# [FEMNIST_MIN, FEMNIST_MAX]: 100 clients of seed 0 hold 56..418, median 184, mean 206.
FEMNIST_LOG_MEAN, FEMNIST_LOG_STD, FEMNIST_MIN, FEMNIST_MAX = 5.18, 0.5, 20, 418
CIFAR100_CLUSTER_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "configs",
  "cifar100_cluster.py",
)


def femnist_sizes(num_clients: int, seed: int) -> np.ndarray:
  """[N] training-set sizes shaped like FEMNIST's writers (tens to 400+, mean ~206):
  a seeded log-normal (log-mean 5.18, log-std 0.5) rounded and clipped to [20, 418]
  (100 clients, seed 0: 56 to 418, median 184, mean 206)."""
  rng = np.random.default_rng(seed)
  sizes = np.rint(rng.lognormal(FEMNIST_LOG_MEAN, FEMNIST_LOG_STD, num_clients))
  return np.clip(sizes, FEMNIST_MIN, FEMNIST_MAX).astype(np.int64)


def cifar100_cluster_sizes(config_path: str = CIFAR100_CLUSTER_CONFIG) -> np.ndarray:
  """[50] per-client training sizes of the paper's CIFAR-100 'cluster' split, as
  `data.cifar100.cluster_federation` makes it from the config file's data settings on
  synthetic CIFAR-shaped labels (500 per class in train, 100 in test; 1-pixel images)."""
  if not os.path.exists(config_path):
    raise FileNotFoundError(
      f"--client_sizes=cifar100_cluster reads {config_path}; run from a checkout of fedmerge_jax."
    )
  spec = importlib.util.spec_from_file_location("cifar100_cluster_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  classes = cifar100.NUM_CLASSES
  labels = lambda per_class: np.repeat(np.arange(classes), per_class).astype(np.int64)
  pixels = lambda n: np.zeros((n, 1, 1, 3), np.uint8)
  arrays = (pixels(500 * classes), labels(500), pixels(100 * classes), labels(100))
  return cifar100.cluster_federation(arrays, module.get_config().data).train.counts.astype(np.int64)


def client_sizes(
  workload: str, num_clients: int, examples_per_client: int, seed: int
) -> np.ndarray:
  """[N] training examples per client of a workload (see --client_sizes)."""
  if workload == "equal":
    return np.full(num_clients, examples_per_client, np.int64)
  if workload == "femnist":
    return femnist_sizes(num_clients, seed)
  if workload == "cifar100_cluster":
    return cifar100_cluster_sizes()
  try:
    sizes = np.array([int(s) for s in workload.split(",")], np.int64)
  except ValueError:
    raise ValueError(
      f"--client_sizes={workload!r}: expected {'|'.join(WORKLOADS)} or a "
      "comma-separated list of sizes, e.g. 30,200,418."
    ) from None
  if sizes.min() < 1:
    raise ValueError(f"--client_sizes={workload!r}: every client needs at least 1 example.")
  return sizes


def parse_workloads(values: Sequence[str]) -> List[str]:
  """--client_sizes' items: workload names, or (all integers) one explicit list of sizes."""
  values = [v.strip() for v in values if v.strip()]
  if values and all(v.isdigit() for v in values):
    return [",".join(values)]
  for v in values:
    if v not in WORKLOADS:
      raise ValueError(
        f"--client_sizes: unknown workload {v!r}; use {'|'.join(WORKLOADS)} "
        "(comma-separated) or one comma-separated list of sizes."
      )
  return values


def _ragged_split(rng, sizes, example_shape, num_classes, dtype) -> data_lib.ClientArrays:
  """Random-normal pixels (made 100,000 rows at a time, stored as `dtype`), random labels,
  ragged: client i holds sizes[i] rows."""
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  total = int(offsets[-1])
  x = np.empty((total, *example_shape), dtype)
  for start in range(0, total, 100_000):
    stop = min(start + 100_000, total)
    x[start:stop] = rng.standard_normal((stop - start, *example_shape), np.float32)
  y = rng.integers(0, num_classes, total).astype(np.int32)
  return data_lib.ClientArrays(x, y, offsets)


def synthetic_data(
  model_name: str,
  sizes,
  seed: int,
  dtype=np.float32,
  name: str = "synthetic",
  example_shape=None,
  num_classes: int = 0,
) -> data_lib.FederatedData:
  """Clients with `sizes` random training examples (and 10 test ones each), shaped for
  `model_name` (or `example_shape`, `num_classes`), kept ragged, so host memory is the real
  examples' size."""
  default_shape, default_classes = MODELS[model_name]
  example_shape = tuple(int(d) for d in example_shape) if example_shape else default_shape
  num_classes = num_classes or default_classes
  sizes = np.asarray(sizes, np.int64)
  rng = np.random.default_rng(seed)
  split = lambda s: _ragged_split(rng, s, example_shape, num_classes, dtype)
  return data_lib.FederatedData(
    client_ids=tuple(map(str, range(len(sizes)))),
    train=split(sizes),
    test=split(np.full(len(sizes), TEST_EXAMPLES_PER_CLIENT)),
    val=None,
    num_classes=num_classes,
    name=name,
  )


def size_summary(counts) -> Dict[str, float]:
  counts = np.asarray(counts)
  return {
    "min": int(counts.min()),
    "median": float(np.median(counts)),
    "mean": float(counts.mean()),
    "max": int(counts.max()),
  }


def setting(config, data) -> Dict[str, Any]:
  """The row fields that say what ran: model, shapes, workload, clients and their sizes,
  batching."""
  counts = data.train.counts
  equal = bool(counts.min() == counts.max())
  return {
    "model": config.model.name,
    "example_shape": list(data.example_shape),
    "num_classes": data.num_classes,
    "workload": data.name,
    "clients": data.num_clients,
    "clients_per_round": config.clients_per_round or data.num_clients,
    "examples_per_client": int(counts.max()) if equal else None,
    "sizes": size_summary(counts),
    "total_examples": int(counts.sum()),
    "batch_size": config.batch_size,
    "local_epochs": config.local_epochs,
    "local_batching": config.local_batching,
  }


def data_bytes(arrays: data_lib.ClientArrays) -> Dict[str, Any]:
  """Host bytes of a ragged split against its real examples' own size (x and y rows)."""
  total = int(arrays.counts.sum())
  per_example = int(np.prod(arrays.x.shape[1:])) * arrays.x.dtype.itemsize + arrays.y.dtype.itemsize
  return {
    "train_bytes": int(arrays.nbytes),
    "real_bytes": total * per_example,
    "memory_ratio": arrays.nbytes / max(total * per_example, 1),
  }
