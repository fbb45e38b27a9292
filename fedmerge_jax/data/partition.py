"""Partitioners: which example indices each client gets, deterministic from a seed."""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


def iid_partition(num_examples: int, num_clients: int, seed: int) -> List[np.ndarray]:
  """A random split into `num_clients` near-equal parts."""
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1, max_tries: int = 1000,
                        cap: Optional[float] = None) -> List[np.ndarray]:
  """Per class, the class's examples are split over clients by Dirichlet(alpha) shares.

  Redrawn until every client holds at least `min_size` examples. Small alpha: each client
  sees few classes; large alpha: close to iid. With a `cap`, a client already holding
  >= cap examples gets no share of the next classes (the rest renormalised): the
  authors' 'personal' split, see `capped_dirichlet_partition`.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)
    for cls in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == cls))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      if cap is not None:
        shares = shares * (sizes < cap)
        shares = shares / shares.sum()
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].append(chunk)
        sizes[client] += len(chunk)
    if sizes.min() >= min_size:
      return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
  raise ValueError(f"dirichlet_partition: no split with >= {min_size} examples per client in "
                   f"{max_tries} draws; raise alpha or lower num_clients/min_size.")


def label_histograms(labels: np.ndarray, parts: List[np.ndarray], num_classes: int) -> np.ndarray:
  """[num_clients, num_classes] counts: what each client holds."""
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def pathological_partition(labels: np.ndarray, num_clients: int, classes_per_client: int,
                           seed: int) -> list[np.ndarray]:
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
    raise ValueError(f"pathological_partition: classes_per_client={k} must be in "
                     f"[1, {len(classes)}] (the number of classes present).")
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
      raise ValueError(f"pathological_partition: class {classes[c]} has {len(idx)} examples "
                       f"for {len(clients)} clients; lower num_clients or classes_per_client.")
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
        labels, n, c.dirichlet_alpha, seed, min_size=min_size),
    "pathological": lambda labels, c, n, seed, min_size: pathological_partition(
        labels, n, c.classes_per_client, seed),
}


def partition_by_name(name: str, labels: np.ndarray, config_data, num_clients: int | None = None,
                      seed: int | None = None, min_size: int | None = None) -> list[np.ndarray]:
  """The split that `data.partition` names, with its knobs read from `config_data`.

  num_clients, seed and min_size default to config_data's num_clients, seed and
  min_client_size (domain datasets override them per domain). Every client must end up
  with at least min_size examples.
  """
  if name not in PARTITIONERS:
    raise ValueError(f"data.partition={name!r} cannot split by labels here; choose one of "
                     f"{tuple(PARTITIONERS)}.")
  n = config_data.num_clients if num_clients is None else num_clients
  seed = config_data.seed if seed is None else seed
  min_size = config_data.min_client_size if min_size is None else min_size
  parts = PARTITIONERS[name](np.asarray(labels), config_data, n, seed, min_size)
  smallest = min(len(p) for p in parts)
  if smallest < min_size:
    raise ValueError(f"{name} partition of {len(labels)} examples over {n} clients gives a "
                     f"client {smallest} examples (< {min_size}); use fewer clients.")
  return parts


# The FedMerge authors' CIFAR-100 splits (arXiv 2504.06768; fedmerge_jax.data.cifar100).


def round_counts(shares, total: int, min_count: int = 0) -> np.ndarray:
  """Integer counts proportional to `shares` that sum to `total`, each >= min_count.

  The authors' rounding: round each share of `total`, raise those under min_count to it,
  then move the surplus (deficit) one unit at a time from the largest (to the smallest)
  count. min_count is lowered to total // len(shares) when it cannot be met.
  """
  shares = np.asarray(shares, np.float64)
  min_count = min(min_count, total // len(shares))
  counts = np.maximum(np.round(shares * total / shares.sum()).astype(np.int64), min_count)
  while counts.sum() > total:
    counts[np.argmax(counts)] -= 1
  while counts.sum() < total:
    counts[np.argmin(counts)] += 1
  return counts


def cycling_class_clusters(num_classes: int, num_clusters: int, classes_per_cluster: int,
                           rng: np.random.Generator) -> List[np.ndarray]:
  """Class clusters drawn by a picker that cycles through all classes.

  Classes are drawn without replacement from a pool that refills with all classes when
  empty, so the first clusters partition the classes and later ones overlap them. The
  authors' picker could draw a class twice within one cluster right after a refill; here
  a cluster never repeats a class (its own classes are skipped), so each has exactly
  `classes_per_cluster` distinct classes. Each cluster is returned sorted.
  """
  if not 1 <= classes_per_cluster <= num_classes:
    raise ValueError(f"classes_per_cluster={classes_per_cluster} must be in [1, {num_classes}].")
  if num_clusters * classes_per_cluster < num_classes:
    raise ValueError(f"{num_clusters} clusters x {classes_per_cluster} classes cannot cover "
                     f"all {num_classes} classes; raise num_clusters or classes_per_cluster.")
  pool = np.ones(num_classes, bool)
  clusters = []
  for _ in range(num_clusters):
    cluster = np.zeros(num_classes, bool)
    for _ in range(classes_per_cluster):
      if not (pool & ~cluster).any():
        pool[:] = True
      chosen = rng.choice(np.flatnonzero(pool & ~cluster))
      pool[chosen] = False
      cluster[chosen] = True
    clusters.append(np.flatnonzero(cluster))
  return clusters


def clients_per_cluster(num_clusters: int, num_clients: int, rng: np.random.Generator,
                        min_clients: int = 2) -> np.ndarray:
  """Cluster sizes: `uniform_filter1d(rand(num_clusters), 3)` scaled to num_clients (min 2)."""
  if num_clients < num_clusters * min_clients:
    raise ValueError(f"num_clients={num_clients} < {num_clusters} clusters x {min_clients} "
                     f"clients each; raise num_clients or lower num_clusters.")
  smooth = ndimage.uniform_filter1d(rng.random(num_clusters), size=3)
  return round_counts(smooth, num_clients, min_clients)


def per_class_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator):
  """(kept, held_out) indices: int(fraction * n_c) random examples of each class held out."""
  labels = np.asarray(labels)
  kept, held = [], []
  for cls in np.unique(labels):
    idx = np.flatnonzero(labels == cls)
    order = idx[rng.permutation(len(idx))]
    cut = int(fraction * len(idx))
    held.append(order[:cut])
    kept.append(order[cut:])
  return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


class ClusterPartition(NamedTuple):
  """The 'cluster' split: class clusters, each client's cluster, per-client indices."""
  cluster_classes: List[np.ndarray]  # [num_clusters] the sorted classes of each cluster.
  client_cluster: np.ndarray  # [num_clients] each client's cluster (contiguous blocks).
  train: List[np.ndarray]  # Per client: indices into the train labels.
  val: List[np.ndarray]  # Per client: indices into the train labels (held out from train).
  test: List[np.ndarray]  # Per client: indices into the test labels.


def cluster_partition(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int,
                      num_clusters: int, classes_per_cluster: int, alpha: float,
                      val_fraction: float, seed: int, num_classes: Optional[int] = None,
                      min_clients_per_cluster: int = 2) -> ClusterPartition:
  """The FedMerge authors' 'cluster' split of a train and a test set.

  1. `per_class_holdout`: val_fraction of each class's train examples become validation.
  2. `cycling_class_clusters`: clusters of classes (overlapping once all are used).
  3. `clients_per_cluster`: cluster j owns the next contiguous block of clients; a client
     holds its cluster's classes.
  4. For each class: one Dirichlet(alpha) share vector over the clients holding it (in
     client order); the class's train, val and test examples are each shuffled and cut
     into contiguous chunks of `round_counts(shares, n, 1)` -- the same shares for all
     three, so a client's val and test mix follows its train mix.
  Every example of every class is assigned; a holder gets >= 1 example of each of its
  classes where the class has as many examples as holders. Random draws, all from
  default_rng(seed), in the order of the steps; step 4 goes through the classes in
  ascending order, drawing shares, then the train, val and test permutations.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
  rng = np.random.default_rng(seed)
  kept, held = per_class_holdout(train_labels, val_fraction, rng)
  clusters = cycling_class_clusters(num_classes, num_clusters, classes_per_cluster, rng)
  sizes = clients_per_cluster(num_clusters, num_clients, rng, min_clients_per_cluster)
  client_cluster = np.repeat(np.arange(num_clusters), sizes)
  holds = np.zeros((num_clients, num_classes), bool)
  for client, cluster in enumerate(client_cluster):
    holds[client, clusters[cluster]] = True
  sources = [(kept, train_labels[kept]), (held, train_labels[held]),
             (np.arange(len(test_labels)), test_labels)]
  parts = [[[] for _ in range(num_clients)] for _ in sources]
  for cls in range(num_classes):
    holders = np.flatnonzero(holds[:, cls])
    shares = rng.dirichlet(np.full(len(holders), alpha))
    for split_parts, (index, labels) in zip(parts, sources):
      idx = index[labels == cls]
      idx = idx[rng.permutation(len(idx))]
      chunks = np.split(idx, np.cumsum(round_counts(shares, len(idx), 1))[:-1])
      for client, chunk in zip(holders, chunks):
        split_parts[client].append(chunk)
  as_array = lambda chunks: np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64)
  train, val, test = ([as_array(c) for c in split_parts] for split_parts in parts)
  return ClusterPartition(clusters, client_cluster, train, val, test)


def capped_dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                               min_size: int = 1, cap: Optional[float] = None,
                               max_tries: int = 1000) -> List[np.ndarray]:
  """The authors' 'personal' split (their `separate_data`, 'dir' mode).

  `dirichlet_partition` with a per-client cap, default N / num_clients: classes in
  ascending order; a client already holding >= cap examples gets no share of the next
  classes; the class's shuffled examples are cut at floor(cumsum * n). Redrawn until
  every client has >= min_size.
  """
  cap = len(labels) / num_clients if cap is None else cap
  return dirichlet_partition(labels, num_clients, alpha, seed, min_size=min_size,
                             max_tries=max_tries, cap=cap)


def holdout_per_client(parts: Sequence[np.ndarray], test_fraction: float, val_fraction: float,
                       seed: int) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
  """Each client's indices -> (train, val, test) lists, like sklearn's train_test_split twice.

  Per client, shuffled: test = ceil(test_fraction * n), val = ceil(val_fraction * (n - test)),
  train the rest. Draws from default_rng(seed), one permutation per client in order.
  """
  rng = np.random.default_rng(seed)
  train, val, test = [], [], []
  for idx in parts:
    idx = np.asarray(idx)[rng.permutation(len(idx))]
    n_test = int(np.ceil(test_fraction * len(idx)))
    n_val = int(np.ceil(val_fraction * (len(idx) - n_test)))
    test.append(np.sort(idx[:n_test]))
    val.append(np.sort(idx[n_test:n_test + n_val]))
    train.append(np.sort(idx[n_test + n_val:]))
  return train, val, test
