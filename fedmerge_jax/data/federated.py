"""Federated datasets as padded client arrays with counts, kept in host memory.

Every split is `[N, max_n, ...]` with the number of real examples per client; only the
clients a round samples are gathered and sent to the device.
"""

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fedmerge_jax.client import ClientData


@dataclasses.dataclass(frozen=True)
class ClientArrays:
  """One split for all clients: x `[N, max_n, ...]`, y `[N, max_n]`, counts `[N]`."""
  x: np.ndarray
  y: np.ndarray
  counts: np.ndarray

  def gather(self, client_ids) -> ClientData:
    """The padded arrays of `client_ids` (NumPy, leading axis len(client_ids))."""
    ids = np.asarray(client_ids)
    return ClientData(self.x[ids], self.y[ids], self.counts[ids])

  @classmethod
  def pad(cls, per_client: Sequence[Tuple[np.ndarray, np.ndarray]], example_shape,
          x_dtype=np.float32) -> "ClientArrays":
    """Stacks clients' (x, y), zero-padding each to the largest client."""
    counts = np.array([len(y) for _, y in per_client], np.int32)
    max_n = max(int(counts.max(initial=0)), 1)
    x = np.zeros((len(per_client), max_n, *example_shape), x_dtype)
    y = np.zeros((len(per_client), max_n), np.int32)
    for i, (xi, yi) in enumerate(per_client):
      x[i, :len(yi)] = xi
      y[i, :len(yi)] = yi
    return cls(x, y, counts)


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
    return tuple(self.train.x.shape[2:])

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
      return ClientArrays.pad([(np.asarray(x), np.asarray(y)) for x, y in per_client],
                              example_shape)

    group_array = None if groups is None else np.array([groups[k] for k in train], np.int32)
    return cls(tuple(ids), arrays(train), arrays(test), None if val is None else arrays(val),
               num_classes, group_array, name)

