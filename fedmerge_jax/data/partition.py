"""Partitioners: which example indices each client gets, deterministic from a seed."""

import random
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
from scipy import ndimage


def iid_partition(num_examples: int, num_clients: int, seed: int) -> List[np.ndarray]:
  """A random split into `num_clients` near-equal parts."""
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
  labels: np.ndarray,
  num_clients: int,
  alpha: float,
  seed: int,
  min_size: int = 1,
  max_tries: int = 1000,
) -> List[np.ndarray]:
  """Per class, the class's examples are split over clients by Dirichlet(alpha) shares.

  Redrawn until every client holds at least `min_size` examples. Small alpha: each client
  sees few classes; large alpha: close to iid. (The authors' capped variant for CIFAR-100
  is `personal_partition`.)
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)
    for cls in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == cls))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
        sizes[client] += len(chunk)
    if sizes.min() >= min_size:
      return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
  raise ValueError(
    f"dirichlet_partition: no split with >= {min_size} examples per client in "
    f"{max_tries} draws; raise alpha or lower num_clients/min_size."
  )


def label_histograms(labels: np.ndarray, parts: List[np.ndarray], num_classes: int) -> np.ndarray:
  """[num_clients, num_classes] counts: what each client holds."""
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def pathological_partition(
  labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
  """Each client gets exactly `classes_per_client` classes, each class split evenly.

  An exact-k variant of McMahan et al. (2017)'s shards: clients, in a random order, take
  the k classes with the fewest holders so far (ties broken at random), so every class
  has the same number of holders (+-1); then each class's shuffled examples are split
  into equal parts (+-1) among its holders. Complete when num_clients * k >= #classes;
  otherwise the classes nobody holds are left out.
  """
  labels = np.asarray(labels)
  classes = np.unique(labels)
  k = classes_per_client
  if not 1 <= k <= len(classes):
    raise ValueError(
      f"pathological_partition: classes_per_client={k} must be in "
      f"[1, {len(classes)}] (the number of classes present)."
    )
  rng = np.random.default_rng(seed)
  holders = [[] for _ in classes]
  for client in rng.permutation(num_clients):
    counts = np.array([len(h) for h in holders])
    for c in np.lexsort((rng.random(len(classes)), counts))[:k]:
      holders[c].append(client)
  parts = [[] for _ in range(num_clients)]
  for c, clients in enumerate(holders):
    idx = rng.permutation(np.flatnonzero(labels == classes[c]))
    if clients and len(idx) < len(clients):
      raise ValueError(
        f"pathological_partition: class {classes[c]} has {len(idx)} examples "
        f"for {len(clients)} clients; lower num_clients or classes_per_client."
      )
    for client, chunk in zip(sorted(clients), np.array_split(idx, max(len(clients), 1))):
      parts[client].extend(chunk.tolist())
  return [np.sort(np.array(p, np.int64)) for p in parts]


def natural_partition(ids) -> tuple[list, list[np.ndarray]]:
  """Groups example indices by an id column (writer, domain, ...): one client per id.

  Returns (client_keys, parts) with the keys sorted, so the result does not depend on the
  order of the examples; each part holds its examples' indices in increasing order.
  """
  keys, inverse = np.unique(np.asarray(ids), return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  parts = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(keys)))[:-1])
  return keys.tolist(), [p.astype(np.int64) for p in parts]


def describe_partition(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> dict:
  """Plain-Python summary of a split (sizes, label histograms) for logs and tests."""
  labels = np.asarray(labels)
  sizes = np.array([len(p) for p in parts], np.int64)
  hist = label_histograms(labels, [np.asarray(p, np.int64) for p in parts], num_classes)
  assigned = np.concatenate([np.asarray(p, np.int64) for p in parts]) if parts else np.zeros(0)
  unique = len(np.unique(assigned))
  return {
    "num_clients": len(parts),
    "num_examples": int(sizes.sum()),
    "sizes": sizes.tolist(),
    "size_min": int(sizes.min()) if len(sizes) else 0,
    "size_median": float(np.median(sizes)) if len(sizes) else 0.0,
    "size_max": int(sizes.max(initial=0)),
    "classes_per_client": (hist > 0).sum(1).tolist(),
    "label_histograms": hist.tolist(),
    "disjoint": unique == len(assigned),
    "coverage": unique / max(len(labels), 1),
  }


# name -> fn(labels, config_data, num_clients, seed, min_size) -> parts. Register new
# label-based partitioners here; 'natural' needs an id column, not labels: see
# natural_partition.
PARTITIONERS = {
  "iid": lambda labels, c, n, seed, min_size: iid_partition(len(labels), n, seed),
  "dirichlet": lambda labels, c, n, seed, min_size: dirichlet_partition(
    labels, n, c.dirichlet_alpha, seed, min_size=min_size
  ),
  "pathological": lambda labels, c, n, seed, min_size: pathological_partition(
    labels, n, c.classes_per_client, seed
  ),
}


def partition_by_name(
  name: str,
  labels: np.ndarray,
  config_data,
  num_clients: int | None = None,
  seed: int | None = None,
  min_size: int | None = None,
) -> list[np.ndarray]:
  """The split that `data.partition` names, with its knobs read from `config_data`.

  num_clients, seed and min_size default to config_data's num_clients, seed and
  min_client_size (domain datasets override them per domain). Every client must end up
  with at least min_size examples.
  """
  if name not in PARTITIONERS:
    raise ValueError(
      f"data.partition={name!r} cannot split by labels here; choose one of {tuple(PARTITIONERS)}."
    )
  n = config_data.num_clients if num_clients is None else num_clients
  seed = config_data.seed if seed is None else seed
  min_size = config_data.min_client_size if min_size is None else min_size
  parts = PARTITIONERS[name](np.asarray(labels), config_data, n, seed, min_size)
  smallest = min(len(p) for p in parts)
  if smallest < min_size:
    raise ValueError(
      f"{name} partition of {len(labels)} examples over {n} clients gives a "
      f"client {smallest} examples (< {min_size}); use fewer clients."
    )
  return parts


# The FedMerge authors' CIFAR-100 splits (arXiv 2504.06768; github.com/shutong043/FedMerge,
# loaddata.py), reproduced draw for draw: one legacy NumPy stream (their np.random.seed)
# and one Python `random` stream (their random.seed), both seeded with `seed`.


def _fix_total(counts: np.ndarray, total: int, limit: Optional[int] = None) -> np.ndarray:
  """The authors' rounding fix: -1 on the largest (+1 on the smallest) until the sum is total.

  With `limit`, at most limit + 1 moves (their loop's give-up); the sum is then checked.
  """
  counts = counts.copy()
  moves = 0
  while counts.sum() != total:
    counts[np.argmax(counts) if counts.sum() > total else np.argmin(counts)] += (
      -1 if counts.sum() > total else 1
    )
    moves += 1
    if limit is not None and moves > limit:
      break
  if counts.sum() != total:
    raise ValueError(
      f"cannot round {len(counts)} shares to a total of {total} in {limit} moves "
      f"(the authors' rule); use fewer clients per class."
    )
  return counts


def cycling_class_clusters(
  num_classes: int, classes_per_cluster: Sequence[int], py_rng
) -> List[List[int]]:
  """The authors' class picker: `py_rng.choice` from a list, removing the pick, refilled
  with every class when empty. A cluster can hold a class twice (right after a refill).
  """
  if sum(classes_per_cluster) < num_classes or max(classes_per_cluster) > num_classes:
    raise ValueError(
      f"classes per cluster {list(classes_per_cluster)} must each be <= "
      f"{num_classes} and cover all {num_classes} classes together; raise "
      f"data.num_clusters or data.classes_per_cluster."
    )
  available, clusters = list(range(num_classes)), []
  for size in classes_per_cluster:
    cluster = []
    for _ in range(size):
      if not available:
        available = list(range(num_classes))
      chosen = py_rng.choice(available)
      available.remove(chosen)
      cluster.append(chosen)
    clusters.append(cluster)
  return clusters


def clients_per_cluster(
  num_clusters: int, num_clients: int, rs: np.random.RandomState, min_clients: int = 2
) -> np.ndarray:
  """Cluster sizes: round(uniform_filter1d(rand(K), 3) scaled to num_clients), each >= 2,
  then fixed to the total (the authors' produce_client_by_class)."""
  if num_clients < num_clusters * min_clients:
    raise ValueError(
      f"num_clients={num_clients} < {num_clusters} clusters x {min_clients} "
      f"clients each; raise num_clients or lower num_clusters."
    )
  smooth = ndimage.uniform_filter1d(rs.rand(num_clusters), size=3)
  counts = np.round(smooth * num_clients / np.sum(smooth)).astype(int)
  counts[counts < min_clients] = min_clients
  return _fix_total(counts, num_clients)


def _authors_class_counts(shares: np.ndarray, n: int) -> np.ndarray:
  """A class's per-holder counts: round(n * shares), fixed to n, then >= 1 (20 moves each)."""
  counts = _fix_total(np.round(n * shares), n, limit=20)
  for _ in range(20):
    if not np.any(counts < 1):
      break
    counts[np.argmax(counts)] -= 1
    counts[np.argmin(counts)] += 1
  return counts.astype(np.int64)


class ClusterPartition(NamedTuple):
  """The 'cluster' split: class clusters, each client's cluster, per-client indices."""

  cluster_classes: List[List[int]]  # [num_clusters] each cluster's picks (may repeat one).
  client_cluster: np.ndarray  # [num_clients] each client's cluster (contiguous blocks).
  train: List[np.ndarray]  # Per client: indices into the train labels.
  val: List[np.ndarray]  # Per client: indices into the train labels (held out from train).
  test: List[np.ndarray]  # Per client: indices into the test labels.


def cluster_partition(
  train_labels: np.ndarray,
  test_labels: np.ndarray,
  num_clients: int,
  num_clusters: int,
  classes_per_cluster: int,
  alpha: float,
  val_fraction: float,
  seed: int,
  num_classes: Optional[int] = None,
) -> ClusterPartition:
  """The authors' 'cluster' split (their train2trainval and produce_client_by_*).

  Legacy NumPy stream `RandomState(seed)`, in this order: per class, a permutation of its
  train examples (the first int(val_fraction n) to validation); a permutation of the train
  pool and of the validation pool (pools in class order); `rand(num_clusters)` for the
  clients per cluster; then per class, per split (train, val, test), a permutation of the
  class's examples in pool order. The class picker uses Python's `random.Random(seed)`.
  A class's Dirichlet(alpha) shares over the clients holding it come from
  `RandomState(class)` (their scipy `seed=classid`), the same for the three splits.
  Clients hold their cluster's classes; the returned indices are sorted.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
  rs, py_rng = np.random.RandomState(seed), random.Random(seed)
  kept, held = [], []
  for cls in range(num_classes):
    idx = np.flatnonzero(train_labels == cls)
    order = rs.permutation(len(idx))
    cut = int(val_fraction * len(idx))
    held.append(idx[order[:cut]])
    kept.append(idx[order[cut:]])
  kept, held = np.concatenate(kept), np.concatenate(held)
  kept, held = kept[rs.permutation(len(kept))], held[rs.permutation(len(held))]
  clusters = cycling_class_clusters(num_classes, [classes_per_cluster] * num_clusters, py_rng)
  client_cluster = np.repeat(
    np.arange(num_clusters), clients_per_cluster(num_clusters, num_clients, rs)
  )
  sources = [kept, held, np.arange(len(test_labels))]
  source_labels = [train_labels[kept], train_labels[held], test_labels]
  parts = [[[] for _ in range(num_clients)] for _ in sources]
  for cls in range(num_classes):
    holders = [j for j, k in enumerate(client_cluster) if cls in clusters[k]]
    if not holders:
      raise ValueError(f"class {cls} is in no cluster; raise data.classes_per_cluster.")
    shares = np.random.RandomState(cls).dirichlet([alpha] * len(holders))
    for split_parts, index, labels in zip(parts, sources, source_labels):
      idx = index[labels == cls]
      idx = idx[rs.permutation(len(idx))]
      cuts = np.cumsum(_authors_class_counts(shares, len(idx)))[:-1]
      for client, chunk in zip(holders, np.split(idx, cuts)):
        split_parts[client].append(chunk)
  as_array = lambda c: np.sort(np.concatenate(c)).astype(np.int64) if c else np.zeros(0, np.int64)
  train, val, test = ([as_array(c) for c in split_parts] for split_parts in parts)
  return ClusterPartition(clusters, client_cluster, train, val, test)


class PersonalPartition(NamedTuple):
  """The 'personal' split: per-client indices into the pooled labels."""

  train: List[np.ndarray]
  val: List[np.ndarray]
  test: List[np.ndarray]


def personal_partition(
  labels: np.ndarray,
  num_clients: int,
  alpha: float,
  min_size: int,
  test_fraction: float,
  val_fraction: float,
  seed: int,
  num_classes: Optional[int] = None,
  max_tries: int = 1000,
) -> PersonalPartition:
  """The authors' 'personal' split (their separate_data 'dir' mode and split_data_val).

  Legacy NumPy stream `RandomState(seed)`: per class in order, `shuffle` its examples, draw
  Dirichlet(alpha) shares over the clients, zero those of clients already holding
  >= N / num_clients, cut at floor(cumsum * n); redrawn until every client holds
  >= min_size. Then per client, sklearn's train_test_split twice from the same stream:
  a permutation, test = the first ceil(test_fraction n); a permutation of the rest,
  validation = its first ceil(val_fraction m). Returned indices are sorted.
  """
  labels = np.asarray(labels)
  if num_classes is None:
    num_classes = int(labels.max(initial=-1)) + 1
  rs, cap = np.random.RandomState(seed), len(labels) / num_clients
  for _ in range(max_tries):
    held = [[] for _ in range(num_clients)]
    for cls in range(num_classes):
      idx = np.flatnonzero(labels == cls)
      rs.shuffle(idx)
      shares = rs.dirichlet(np.repeat(alpha, num_clients))
      shares = shares * np.array([len(h) < cap for h in held])
      shares = shares / shares.sum()
      cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
      for h, chunk in zip(held, np.split(idx, cuts)):
        h.extend(chunk.tolist())
    if min(len(h) for h in held) >= min_size:
      break
  else:
    raise ValueError(
      f"personal partition: no split with >= {min_size} examples per client in "
      f"{max_tries} draws; lower data.min_client_size or data.num_clients."
    )
  train, val, test = [], [], []
  for h in held:
    idx = np.asarray(h, np.int64)
    order = rs.permutation(len(idx))
    n_test = int(np.ceil(test_fraction * len(idx)))
    test.append(np.sort(idx[order[:n_test]]))
    rest = idx[order[n_test:]]
    order = rs.permutation(len(rest))
    n_val = int(np.ceil(val_fraction * len(rest)))
    val.append(np.sort(rest[order[:n_val]]))
    train.append(np.sort(rest[order[n_val:]]))
  return PersonalPartition(train, val, test)
