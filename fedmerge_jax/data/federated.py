"""Federated datasets kept ragged in host memory: each split is its real examples plus offsets.

A round gathers only its clients, padded to the largest of them rounded up to a bucket
(`padded_length`), so the device sees the round's shape, not the population's, and
recompiles only when a round needs a bucket it has not used before.
"""

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fedmerge_jax.client import ClientData


def padded_length(n: int, multiple: int, cap: Optional[int] = None) -> int:
  """`n` rounded up to a bucket: `multiple` * 2^k (at least `multiple`), at most `cap`
  rounded up to `multiple`. Few distinct shapes, so few recompilations; under 2x padding."""
  multiple = max(int(multiple), 1)
  units = max(-(-int(n) // multiple), 1)
  bucket = multiple * (1 << (units - 1).bit_length())
  if cap is not None:
    bucket = min(bucket, max(-(-int(cap) // multiple), 1) * multiple)
  return bucket


@dataclasses.dataclass(frozen=True)
class ClientArrays:
  """One split for all clients, ragged: client i's examples are rows offsets[i]:offsets[i+1]
  of x `[total, ...]` and y `[total]`; nothing is stored for padding."""
  x: np.ndarray
  y: np.ndarray
  offsets: np.ndarray  # [N + 1], int64.

  @property
  def counts(self) -> np.ndarray:
    """[N] real examples per client."""
    return np.diff(self.offsets).astype(np.int32)

  @property
  def num_clients(self) -> int:
    return len(self.offsets) - 1

  @property
  def nbytes(self) -> int:
    return self.x.nbytes + self.y.nbytes + self.offsets.nbytes

  def client(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
    """Client i's (x, y), views of its real examples."""
    rows = slice(self.offsets[i], self.offsets[i + 1])
    return self.x[rows], self.y[rows]

  def padded_length(self, client_ids, multiple: int = 1) -> int:
    """The bucketed length that holds the largest of `client_ids` (phantoms count 0)."""
    ids = np.asarray(client_ids)
    real = ids[ids < self.num_clients]
    largest = int(self.counts[real].max(initial=0))
    return padded_length(largest, multiple, cap=int(self.counts.max(initial=0)))

  def gather(self, client_ids, length: Optional[int] = None) -> ClientData:
    """`client_ids`' examples as NumPy `[C, length, ...]` zero-padded arrays and counts.

    `length` defaults to the largest of these clients. Ids past the last client are
    phantoms: no examples (count 0), so no training and sample weight 0.
    """
    ids = np.asarray(client_ids)
    real = ids < self.num_clients
    counts = np.where(real, self.counts[np.where(real, ids, 0)], 0).astype(np.int32)
    length = max(int(counts.max(initial=0)) if length is None else int(length), 1)
    if counts.max(initial=0) > length:
      raise ValueError(f"gather: a client holds {counts.max()} examples, more than length={length}.")
    x = np.zeros((len(ids), length, *self.x.shape[1:]), self.x.dtype)
    y = np.zeros((len(ids), length), self.y.dtype)
    for row, (i, n) in enumerate(zip(ids, counts)):
      if n:
        start = self.offsets[i]
        x[row, :n] = self.x[start:start + n]
        y[row, :n] = self.y[start:start + n]
    return ClientData(x, y, counts)

  @classmethod
  def from_clients(cls, per_client: Sequence[Tuple[np.ndarray, np.ndarray]], example_shape,
                   x_dtype=np.float32) -> "ClientArrays":
    """Concatenates clients' (x, y) into one ragged split."""
    counts = np.array([len(y) for _, y in per_client], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    x = np.zeros((int(offsets[-1]), *example_shape), x_dtype)
    y = np.zeros((int(offsets[-1]),), np.int32)
    for i, (xi, yi) in enumerate(per_client):
      x[offsets[i]:offsets[i + 1]] = xi
      y[offsets[i]:offsets[i + 1]] = yi
    return cls(x, y, offsets)


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federated dataset: the same N clients in train, test and (optionally) val.

  `groups` holds each client's hidden group where the data has one (for analysis only).
  """
  client_ids: Tuple[str, ...]
  train: ClientArrays
  test: ClientArrays
  val: Optional[ClientArrays]
  num_classes: int
  groups: Optional[np.ndarray] = None
  name: str = "custom"

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def example_shape(self) -> Tuple[int, ...]:
    return tuple(self.train.x.shape[1:])

  @classmethod
  def from_arrays(cls, train: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                  test: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                  val: Optional[Mapping[str, Tuple[np.ndarray, np.ndarray]]] = None,
                  num_classes: Optional[int] = None, groups: Optional[Dict[str, int]] = None,
                  name: str = "custom") -> "FederatedData":
    """Builds from dicts `client_id -> (x, y)` of NumPy arrays.

    Client order is the order of `train`. A client missing from `test` or `val` has no
    examples there (and is left out of that split's per-client means). Labels must be
    integers in [0, num_classes); num_classes defaults to max label + 1.
    """
    if not train:
      raise ValueError("from_arrays: `train` has no clients.")
    ids = [str(k) for k in train]
    splits = {"train": train, "test": test, "val": val}
    example_shape = None
    max_label = -1
    for split, clients in splits.items():
      if clients is None:
        continue
      extra = set(map(str, clients)) - set(ids)
      if extra:
        raise ValueError(f"from_arrays: {split} has clients that train lacks: {sorted(extra)[:5]}.")
      for cid, (x, y) in clients.items():
        x, y = np.asarray(x), np.asarray(y)
        where = f"from_arrays: {split}[{cid!r}]"
        if len(x) != len(y):
          raise ValueError(f"{where}: x has {len(x)} examples but y has {len(y)}.")
        if example_shape is None:
          example_shape = x.shape[1:]
        if x.shape[1:] != example_shape:
          raise ValueError(f"{where}: example shape {x.shape[1:]} differs from {example_shape}.")
        if not np.issubdtype(y.dtype, np.integer):
          raise ValueError(f"{where}: labels must be integers, got {y.dtype}.")
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
          raise ValueError(f"{where}: x contains NaN or infinite values; clean the data first.")
        if len(y):
          if y.min() < 0:
            raise ValueError(f"{where}: negative label {y.min()}.")
          max_label = max(max_label, int(y.max()))
    num_classes = num_classes or max_label + 1
    if max_label >= num_classes:
      raise ValueError(f"from_arrays: label {max_label} >= num_classes={num_classes}.")

    def arrays(clients):
      empty = (np.zeros((0, *example_shape), np.float32), np.zeros((0,), np.int32))
      by_id = {str(k): v for k, v in clients.items()}
      per_client = [by_id.get(cid, empty) for cid in ids]
      # float16 images stay float16 (half the host memory); anything else becomes float32.
      x_dtype = np.float16 if all(np.asarray(x).dtype == np.float16 for x, _ in per_client
                                  if len(x)) else np.float32
      return ClientArrays.from_clients([(np.asarray(x), np.asarray(y)) for x, y in per_client],
                                       example_shape, x_dtype)

    group_array = None if groups is None else np.array([groups[k] for k in train], np.int32)
    return cls(tuple(ids), arrays(train), arrays(test), None if val is None else arrays(val),
               num_classes, group_array, name)

