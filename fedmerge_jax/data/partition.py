"""Partitioners: which example indices each client gets, deterministic from a seed."""

from typing import List

import numpy as np


def iid_partition(num_examples: int, num_clients: int, seed: int) -> List[np.ndarray]:
  """A random split into `num_clients` near-equal parts."""
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1, max_tries: int = 1000) -> List[np.ndarray]:
  """Per class, the class's examples are split over clients by Dirichlet(alpha) shares.

  Redrawn until every client holds at least `min_size` examples. Small alpha: each client
  sees few classes; large alpha: close to iid.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == cls))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].extend(chunk.tolist())
    if min(len(p) for p in parts) >= min_size:
      return [np.sort(np.array(p, np.int64)) for p in parts]
  raise ValueError(f"dirichlet_partition: no split with >= {min_size} examples per client in "
                   f"{max_tries} draws; raise alpha or lower num_clients/min_size.")


def label_histograms(labels: np.ndarray, parts: List[np.ndarray], num_classes: int) -> np.ndarray:
  """[num_clients, num_classes] counts: what each client holds."""
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
