"""Federated datasets kept ragged in host memory: each split is its real examples plus offsets.

A round gathers only its clients, padded to the largest of them rounded up to a bucket
(`padded_length`), so the device sees the round's shape, not the population's, and
recompiles only when a round needs a bucket it has not used before.
"""

import dataclasses
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fedmerge_jax.client import ClientData
from fedmerge_jax.data.errors import DataError


def check_client(where: str, x: np.ndarray, y: np.ndarray, example_shape, num_classes: int) -> None:
  """DataError naming `where` (e.g. "from_arrays: train['alice']") and the fix, for a client's
  (x, y) that would give a wrong result or a crash later."""
  if len(x) != len(y):
    raise DataError(
      f"{where}: x has {len(x)} examples but y has {len(y)}; give one label per example."
    )
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise DataError(
      f"{where}: x has dtype {x.dtype}, which can be neither an image nor a "
      "feature; give numbers (float32 features, uint8 or float images)."
    )
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(
      f"{where}: labels must be integers, got {y.dtype}; map the classes to "
      "0..num_classes-1 (e.g. np.unique(y, return_inverse=True)[1])."
    )
  if tuple(x.shape[1:]) != tuple(example_shape):
    raise DataError(
      f"{where}: example shape {tuple(x.shape[1:])} differs from "
      f"{tuple(example_shape)} (the first client's); give every client and "
      "split examples of one shape."
    )
  if np.issubdtype(x.dtype, np.floating):
    finite = np.isfinite(x.reshape(len(x), int(np.prod(x.shape[1:])))).all(axis=1)
    if not finite.all():
      raise DataError(
        f"{where}: x contains NaN or infinite values (example "
        f"{int(np.argmin(finite))} first); clean or drop those examples."
      )
  if len(y) and (y.min() < 0 or y.max() >= num_classes):
    bad = int(y.min() if y.min() < 0 else y.max())
    raise DataError(
      f"{where}: label {bad} is outside [0, {num_classes}); fix the labels, or "
      "pass a num_classes that covers them."
    )


def padded_length(n: int, multiple: int, cap: Optional[int] = None) -> int:
  """`n` rounded up to a bucket: `multiple` * 2^k (at least `multiple`), at most `cap`
  rounded up to `multiple`. Few distinct shapes, so few recompilations; under 2x padding."""
  multiple = max(int(multiple), 1)
  units = max(-(-int(n) // multiple), 1)
  bucket = multiple * (1 << (units - 1).bit_length())
  if cap is not None:
    bucket = min(bucket, max(-(-int(cap) // multiple), 1) * multiple)
  return bucket


ALIGNMENT = 64  # Bytes: XLA:CPU uses a host array this aligned in place instead of copying it.


def aligned_zeros(shape, dtype) -> np.ndarray:
  """np.zeros, its data starting at a multiple of `ALIGNMENT` bytes, so that a jitted call on
  CPU reads it where it is (NumPy aligns to 16 only, and XLA:CPU copies such an argument:
  a round's padded data would be held twice)."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return raw[start : start + nbytes].view(dtype).reshape(shape)


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
    """`client_ids`' examples as NumPy `[C, length, ...]` zero-padded arrays and counts
    (`aligned_zeros`: a jitted call on CPU reads them in place).

    `length` defaults to the largest of these clients. Ids past the last client are
    phantoms: no examples (count 0), so no training and sample weight 0.
    """
    ids = np.asarray(client_ids)
    real = ids < self.num_clients
    counts = np.where(real, self.counts[np.where(real, ids, 0)], 0).astype(np.int32)
    length = max(int(counts.max(initial=0)) if length is None else int(length), 1)
    if counts.max(initial=0) > length:
      raise ValueError(
        f"gather: a client holds {counts.max()} examples, more than length={length}."
      )
    x = aligned_zeros((len(ids), length, *self.x.shape[1:]), self.x.dtype)
    y = aligned_zeros((len(ids), length), self.y.dtype)
    for row, (i, n) in enumerate(zip(ids, counts)):
      if n:
        start = self.offsets[i]
        x[row, :n] = self.x[start : start + n]
        y[row, :n] = self.y[start : start + n]
    return ClientData(x, y, counts)

  @classmethod
  def from_clients(
    cls, per_client: Sequence[Tuple[np.ndarray, np.ndarray]], example_shape, x_dtype=np.float32
  ) -> "ClientArrays":
    """Concatenates clients' (x, y) into one ragged split."""
    counts = np.array([len(y) for _, y in per_client], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    x = np.zeros((int(offsets[-1]), *example_shape), x_dtype)
    y = np.zeros((int(offsets[-1]),), np.int32)
    for i, (xi, yi) in enumerate(per_client):
      x[offsets[i] : offsets[i + 1]] = xi
      y[offsets[i] : offsets[i + 1]] = yi
    return cls(x, y, offsets)


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federated dataset: the same N clients in train, test and (optionally) val.

  `groups` holds each client's hidden group where the data has one (for analysis only).
  `input_transform` (e.g. `transforms.Standardize`): what the stored examples become where
  they enter the model, computed inside the jitted programs (CIFAR-100's uint8 images are
  standardised there); None: the model sees them as stored.
  """

  client_ids: Tuple[str, ...]
  train: ClientArrays
  test: ClientArrays
  val: Optional[ClientArrays]
  num_classes: int
  groups: Optional[np.ndarray] = None
  name: str = "custom"
  input_transform: Optional[Callable] = None

  def __post_init__(self):
    """Every loader's data is checked here, each bad case naming the client and the fix."""
    if self.input_transform is not None:
      try:
        hash(self.input_transform)
      except TypeError as e:
        raise DataError(
          f"{self.name}: input_transform {self.input_transform!r} is not hashable, and the "
          "jitted programs take it as a static argument; use a frozen dataclass such as "
          "data.Standardize(mean, std, divide_by)."
        ) from e
    for split in ("train", "test", "val"):
      arrays = getattr(self, split)
      if arrays is None:
        continue
      if arrays.num_clients != self.num_clients:
        raise DataError(
          f"{self.name}: {split} holds {arrays.num_clients} clients, not the "
          f"{self.num_clients} of client_ids; give every split the same clients."
        )
      for i, cid in enumerate(self.client_ids):
        check_client(
          f"{self.name}: {split}[{cid!r}]",
          *arrays.client(i),
          self.train.x.shape[1:],
          self.num_classes,
        )
    empty = [cid for cid, n in zip(self.client_ids, self.train.counts) if n == 0]
    if empty:
      raise DataError(
        f"{self.name}: train{empty[:5]} ha{'s' if len(empty) == 1 else 've'} no "
        "training examples, and every sampled client trains: drop "
        f"{'it' if len(empty) == 1 else 'them'} (from test and val too) or give "
        "each some examples."
      )
    if not self.test.counts.sum():
      raise DataError(
        f"{self.name}: the test split has no examples, and every evaluation "
        "needs them; give each client test examples."
      )

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def example_shape(self) -> Tuple[int, ...]:
    return tuple(self.train.x.shape[1:])

  @classmethod
  def from_arrays(
    cls,
    train: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    test: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    val: Optional[Mapping[str, Tuple[np.ndarray, np.ndarray]]] = None,
    num_classes: Optional[int] = None,
    groups: Optional[Dict[str, int]] = None,
    name: str = "custom",
    input_transform: Optional[Callable] = None,
  ) -> "FederatedData":
    """Builds from dicts `client_id -> (x, y)` of NumPy arrays.

    Client order is the order of `train`. Every client of `train` needs training examples
    and a `test` entry (an empty one for a client without test examples: it is left out
    of the per-client means); a client missing from `val` has no validation examples.
    Labels must be integers in [0, num_classes); num_classes defaults to max label + 1.
    Images are stored as float32, except float16 ones (kept) and, with an `input_transform`
    (e.g. `Standardize`: what the model sees of them, computed in the jitted programs),
    uint8 ones (kept: a quarter of float32's memory). Bad input raises DataError naming the
    client and the fix.
    """
    if not train:
      raise DataError("from_arrays: train has no clients; give {client_id: (x, y)}.")
    ids = [str(k) for k in train]
    if not test:
      raise DataError(
        "from_arrays: test has no clients, and every evaluation needs them; "
        "give {client_id: (x, y)} for each client of train."
      )
    missing = [cid for cid in ids if cid not in set(map(str, test))]
    if missing:
      raise DataError(
        f"from_arrays: test lacks {len(missing)} of the {len(ids)} clients "
        f"({missing[:5]}); give each one a test entry (an empty (x, y) for "
        "one without test examples), or drop it from train."
      )
    splits = {"train": train, "test": test, "val": val}
    example_shape = np.asarray(next(iter(train.values()))[0]).shape[1:]
    labels = [np.asarray(y) for clients in splits.values() if clients for _, y in clients.values()]
    max_label = max((int(y.max()) for y in labels if len(y) and y.dtype.kind in "iub"), default=-1)
    num_classes = num_classes or max_label + 1
    for split, clients in splits.items():
      if clients is None:
        continue
      extra = set(map(str, clients)) - set(ids)
      if extra:
        raise DataError(
          f"from_arrays: {split} has clients that train lacks: {sorted(extra)[:5]}; "
          "every client must be in train."
        )
      for cid, (x, y) in clients.items():
        check_client(
          f"from_arrays: {split}[{cid!r}]", np.asarray(x), np.asarray(y), example_shape, num_classes
        )

    def arrays(clients):
      empty = (np.zeros((0, *example_shape), np.float32), np.zeros((0,), np.int32))
      by_id = {str(k): v for k, v in clients.items()}
      per_client = [by_id.get(cid, empty) for cid in ids]
      # float16 images stay float16 (half the host memory), uint8 ones uint8 where a transform
      # says what the model sees of them (a quarter); anything else becomes float32.
      dtypes = {np.asarray(x).dtype for x, _ in per_client if len(x)}
      x_dtype = np.float32
      if dtypes <= {np.dtype(np.float16)}:
        x_dtype = np.float16
      elif dtypes == {np.dtype(np.uint8)} and input_transform is not None:
        x_dtype = np.uint8
      return ClientArrays.from_clients(
        [(np.asarray(x), np.asarray(y)) for x, y in per_client], example_shape, x_dtype
      )

    group_array = None if groups is None else np.array([groups[k] for k in train], np.int32)
    return cls(
      tuple(ids),
      arrays(train),
      arrays(test),
      None if val is None else arrays(val),
      num_classes,
      group_array,
      name,
      input_transform,
    )
