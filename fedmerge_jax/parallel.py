"""How the client axis runs: vmapped chunks or one client at a time, sharded over devices.

What a client does lives in `client.py`; this module decides how clients execute
(`parallelism`), how many clients' outputs are held at once (`chunk_size`) and on which
devices. With a `reduce`, each chunk's outputs are folded into running sums as soon as
the chunk is done, so memory holds one chunk of outputs, not all clients'. Every array
whose leading axis is clients (the population's per-client state, a round's sampled
data) is split in contiguous blocks over the mesh axis `clients`; `jax.jit` propagates
that layout through the algorithms unchanged. Client counts are padded to multiples of
the device count with phantom clients: no examples, so sample weight 0 and no effect;
they are never sampled or evaluated. Results are the same for every choice, up to float
summation order.
"""

import dataclasses
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedmerge_jax import choices
from fedmerge_jax.round_data import WithTest

CLIENTS = "clients"  # The mesh axis the client axis is sharded over.
CLIENT_PARALLELISMS = choices.CLIENT_PARALLELISMS


def resolve_parallelism(parallelism: str) -> str:
  """'auto' -> 'sequential' on CPU (measured fastest there: docs/pages/performance.md),
  'vmap' on GPU/TPU."""
  if parallelism == "auto":
    return "sequential" if jax.default_backend() == "cpu" else "vmap"
  if parallelism not in CLIENT_PARALLELISMS:
    raise ValueError(f"client_parallelism={parallelism!r}; expected one of {CLIENT_PARALLELISMS}.")
  return parallelism


LOCAL_LOOP_CHOICES = choices.LOCAL_LOOP_CHOICES
COMMAND_BUFFERS = choices.COMMAND_BUFFERS  # config.command_buffers -> XLA:GPU's option value.
MIN_REAL_FRACTION = 0.85  # The chosen chunk keeps real / computed steps at least this.


def resolve_local_loop(loop: str, parallelism: str, chunk_size: int, backend: str = "") -> str:
  """'auto' -> 'static' where a GPU/TPU vmaps each round as one chunk (`chunk_size` 0), else
  'while': one client at a time runs no padded step then, and with several chunks each
  stops at its own largest member's count, while 'static' runs the round's for every chunk."""
  if loop != "auto":
    return loop
  backend = backend or jax.default_backend()
  one_chunk_vmapped = resolve_parallelism(parallelism) == "vmap" and chunk_size <= 0
  return "static" if backend != "cpu" and one_chunk_vmapped else "while"


def command_buffer_options(choice: str, backend: str = "") -> dict:
  """XLA compiler options for `config.command_buffers` on this backend ({} off GPUs)."""
  if choice not in COMMAND_BUFFERS:
    raise ValueError(f"command_buffers={choice!r}; expected one of {tuple(COMMAND_BUFFERS)}.")
  value = COMMAND_BUFFERS[choice]
  if (backend or jax.default_backend()) != "gpu" or value is None:
    return {}
  return {"xla_gpu_enable_command_buffer": value}


def computed_steps(steps, chunk: int) -> int:
  """Steps a vmapped round computes for clients with `steps` in the round's order: each chunk
  of `chunk` consecutive clients (all if <= 0; the remainder a chunk of its own) runs its
  largest member's count for every member."""
  steps = np.asarray(steps, np.int64)
  if not len(steps):
    return 0
  chunk = len(steps) if chunk <= 0 else chunk
  starts = np.arange(0, len(steps), chunk)
  sizes = np.diff(np.append(starts, len(steps)))
  return int(np.sum(np.maximum.reduceat(steps, starts) * sizes))


def choose_chunk_size(
  sorted_steps,
  bytes_per_member: float,
  free_bytes: float,
  min_real_fraction: float = MIN_REAL_FRACTION,
) -> int:
  """The largest chunk that fits `free_bytes` at `bytes_per_member` each and keeps the real
  fraction (real / computed steps, `computed_steps`) of clients with `sorted_steps` (largest
  first) at least `min_real_fraction`; 1 where nothing larger does."""
  steps = np.asarray(sorted_steps, np.int64)
  fits = int(free_bytes // max(bytes_per_member, 1))
  real = int(steps.sum())
  for chunk in range(min(fits, len(steps)), 1, -1):
    if real >= min_real_fraction * computed_steps(steps, chunk):
      return chunk
  return 1


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def map_clients(fn, args, chunk_size: int = 0, parallelism: str = "auto", reduce=None):
  """Applies `fn(*per_client_args)` over the leading (client) axis of every leaf of `args`.

  parallelism 'vmap': chunks of `chunk_size` clients (all if <= 0), each chunk one `vmap`;
  'sequential': one client at a time, no vmap (chunks of one). Chunks run in a `lax.scan`.
  Without `reduce` returns the per-client outputs stacked (leading axis C). With
  `reduce(chunk_args, chunk_outputs) -> (totals, kept)`, called on every chunk (leading
  axis = chunk), returns (sum of `totals` over chunks, `kept` for every client):
  what is summed never exists for all clients at once.

  Traced under a mesh with a `clients` axis of D > 1 devices (`jit_round` sets it), each
  device maps its own contiguous block of C / D clients (`jax.shard_map`), in chunks of
  `chunk_size / D`, and the devices' totals are combined with one `psum`: `chunk_size`
  counts the clients trained at once across the mesh, and no client's data leaves its device.
  """
  parallelism = resolve_parallelism(parallelism)
  num = jax.tree.leaves(args)[0].shape[0]
  devices = client_devices(num)
  if devices == 1:
    return _map_chunks(fn, args, chunk_size, parallelism, reduce)
  local_chunk = round_up(chunk_size, devices) // devices if chunk_size > 0 else 0

  def per_device(local_args):
    out = _map_chunks(fn, local_args, local_chunk, parallelism, reduce)
    if reduce is None:
      return out
    totals, kept = out
    return jax.lax.psum(totals, CLIENTS), kept

  # Closed-over arrays (the global models, the whole state) enter every device whole.
  # check_vma off: the scan's zero totals start device-invariant and become per-device.
  out_specs = (
    PartitionSpec(CLIENTS) if reduce is None else (PartitionSpec(), PartitionSpec(CLIENTS))
  )
  return jax.shard_map(
    per_device,
    in_specs=(PartitionSpec(CLIENTS),),
    out_specs=out_specs,
    axis_names={CLIENTS},
    check_vma=False,
  )(args)


def client_devices(num: int) -> int:
  """Devices of the `clients` axis of the mesh being traced under that split `num` clients
  evenly into blocks, each mapped on its own device; 1 where there is none (no mesh, one
  device, inside a per-device map already, or `num` not a multiple: mapped as one array)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CLIENTS not in mesh.axis_names or CLIENTS in mesh.manual_axes:
    return 1
  devices = mesh.shape[CLIENTS]
  return devices if devices > 1 and num % devices == 0 else 1


def _map_chunks(fn, args, chunk_size: int, parallelism: str, reduce):
  """map_clients on one device (or one device's block): chunks in a `lax.scan`."""
  num = jax.tree.leaves(args)[0].shape[0]
  chunk = 1 if parallelism == "sequential" else (num if chunk_size <= 0 else min(chunk_size, num))

  def run(chunk_args):
    if parallelism == "sequential":
      one = fn(*jax.tree.map(lambda x: x[0], chunk_args))
      outputs = jax.tree.map(lambda x: x[None], one)
    else:
      outputs = jax.vmap(fn)(*chunk_args)
    return reduce(chunk_args, outputs) if reduce is not None else (None, outputs)

  num_chunks, rest = divmod(num, chunk)
  if num_chunks == 1 and not rest:
    totals, kept = run(args)
  else:
    full = num_chunks * chunk
    # Contiguous chunks sliced inside the loop: reshaping the inputs to [chunks, chunk, ...]
    # (or striding them) makes XLA copy them all, and un-striding would copy the outputs.
    take = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk), args)
    shapes, _ = jax.eval_shape(run, take(0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(total, i):
      totals, kept = run(take(i))
      return _add(total, totals), kept

    totals, kept = jax.lax.scan(body, zeros, jnp.arange(num_chunks))
    kept = jax.tree.map(lambda y: y.reshape(full, *y.shape[2:]), kept)
    if rest:
      last_totals, last_kept = run(jax.tree.map(lambda x: x[full:], args))
      totals = _add(totals, last_totals)
      kept = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), kept, last_kept)
  return kept if reduce is None else (totals, kept)


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh with axis `clients` over the first `num_devices` devices (0: all of them)."""
  available = jax.device_count()
  n = num_devices or available
  if n > available:
    raise ValueError(
      f"config.num_devices={num_devices} but only {available} devices exist; use 0 for all of them."
    )
  if jax.process_count() > 1 and n != available:
    raise ValueError(
      f"config.num_devices={num_devices}: a multi-host run uses every device (set it to 0)."
    )
  return jax.make_mesh((n,), (CLIENTS,), (AxisType.Auto,), devices=jax.devices()[:n])


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split in contiguous blocks over the `clients` mesh axis."""
  return NamedSharding(mesh, PartitionSpec(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh (and readable on every host)."""
  return NamedSharding(mesh, PartitionSpec())


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ClientLayout:
  """Client counts of a run, padded with phantoms so that every client axis shards evenly.

  chunk_size: clients trained at once (0: all), a multiple of the device count.
  round_size: clients a round runs, the sampled ones then phantoms: a multiple of the
    device count, and of chunk_size where chunks and devices both split it.
  population: the per-client state's rows, real clients then phantoms: a multiple of the
    device count with room for a round's phantom ids, so no id repeats in a round.
  eval_chunk: clients evaluated per call, a multiple of the device count.
  """

  num_devices: int
  num_clients: int  # Real clients; num_devices: the mesh size.
  num_sampled: int
  chunk_size: int
  round_size: int
  population: int
  eval_chunk: int

  def pad_ids(self, client_ids) -> np.ndarray:
    """A round's real ids followed by its phantom ids (>= num_clients, distinct)."""
    phantoms = np.arange(self.num_clients, self.num_clients + self.round_size - len(client_ids))
    return np.concatenate([np.asarray(client_ids), phantoms]).astype(np.int32)


def client_layout(
  num_devices: int, num_clients: int, clients_per_round: int, chunk_size: int
) -> ClientLayout:
  """The padded counts for `num_clients` clients, `clients_per_round` a round (0: all).

  On one device nothing is padded: chunks need not divide a round there (`map_clients`
  runs the remainder), so one device runs exactly the unsharded computation.
  """
  sampled = clients_per_round if 0 < clients_per_round < num_clients else num_clients
  chunk = round_up(chunk_size, num_devices) if chunk_size > 0 else 0
  sharded_chunks = num_devices > 1 and 0 < chunk < sampled
  round_size = round_up(sampled, chunk if sharded_chunks else num_devices)
  population = round_up(num_clients + round_size - sampled, num_devices)
  eval_chunk = round_up(min(chunk or num_clients, num_clients), num_devices)
  return ClientLayout(num_devices, num_clients, sampled, chunk, round_size, population, eval_chunk)


def state_shardings(mesh: Mesh, abstract_state, population: int):
  """Shardings for a state: leaves with a leading population axis split over `clients`.

  Everything else (the global models, optimizer scalars) is replicated. Should K equal the
  padded population, the global models are split too: another layout, same results.
  """

  def one(leaf):
    return client_sharding(mesh) if is_per_client(leaf, population) else replicated(mesh)

  return jax.tree.map(one, abstract_state)


def is_per_client(leaf, population: int) -> bool:
  """Whether a state leaf holds one row per client of the (padded) population."""
  return leaf.ndim >= 1 and leaf.shape[0] == population


# An init runs once, yet XLA:CPU's LLVM spends seconds optimising its unrolled random-number
# code at the default level 2 (a ResNet-9 FedMerge init: 18.0 s to compile, 4.5 s at level 1);
# level 1 compiles it 3-10x faster to the same bits (every built-in algorithm's init on the MLP,
# CNNs and ResNet-9; tests/test_parallel.py checks some). Level 0 would change the last bit of
# some weights (no FMA). A level of the user's own in XLA_FLAGS is kept.
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options(backend: str = ""):
  """XLA options for an algorithm's init on this backend (None: the defaults)."""
  if (backend or jax.default_backend()) != "cpu":
    return None
  if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
    return None
  return INIT_CPU_OPTIONS


def sharded_init(init, mesh: Mesh, population: int, rng):
  """(init(rng), its shardings), the leaves with a leading population axis split over `clients`."""
  shardings = state_shardings(mesh, jax.eval_shape(init, rng), population)
  jitted = jax.jit(init, out_shardings=shardings, compiler_options=init_compiler_options())
  return jitted(rng), shardings


def jit_round(round_fn, mesh: Mesh, shardings, compiler_options=None):
  """`round_fn(state, client_ids, data, rng)` jitted for a state laid out as `shardings`.

  Client ids and data come split over `clients` (see `client_arrays`), the key replicated.
  The new state keeps the layout (so the donated buffers are reused in place) and the
  metrics come back replicated, readable on every host.
  """
  clients, copies = client_sharding(mesh), replicated(mesh)
  return jax.jit(
    on_mesh(round_fn, mesh),
    donate_argnums=0,
    in_shardings=(shardings, clients, clients, copies),
    out_shardings=(shardings, copies),
    compiler_options=compiler_options,
  )


def on_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` as the abstract mesh, so that `map_clients` maps per device."""

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def padded_chunks(client_ids, chunk: int):
  """`client_ids` in consecutive chunks of `chunk`, the last filled with repeats of its first
  id so that every chunk has one shape: [(chunk's ids, how many of them are real)]."""
  ids = np.asarray(client_ids, np.int32)
  return [
    (np.concatenate([part, np.full(chunk - len(part), part[0], np.int32)]), len(part))
    for part in (ids[start : start + chunk] for start in range(0, len(ids), chunk))
  ]


def stacked(trees):
  """NumPy trees (equal structure and shapes) stacked along a new leading axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def largest_first(client_ids, counts) -> np.ndarray:
  """`client_ids` reordered by their example counts, largest first (ties keep their order).

  Under `vmap` consecutive clients form a chunk, which loops to its largest member's step
  count: sorted, a chunk's members need about the same number of steps. Results do not
  depend on the order (each client's randomness comes from its id).
  """
  ids = np.asarray(client_ids)
  return ids[np.argsort(-np.asarray(counts)[ids], kind="stable")]


class RoundGatherer:
  """A round's data for the jitted round: its clients largest first, then phantoms, padded
  to the round's bucketed length (`ClientArrays.padded_length`) and split over `clients`.

  Logs each new padded length once: a new length means the round compiles again.
  """

  def __init__(self, arrays, layout: "ClientLayout", mesh: Mesh, multiple: int):
    self.arrays, self.layout, self.mesh, self.multiple = arrays, layout, mesh, multiple
    self.lengths = set()

  def __call__(self, client_ids, test_arrays=None):
    """(the real ids in the round's order, sharded padded ids, sharded ClientData).

    With `test_arrays`, the data is `WithTest`: each client's test split attached
    (evaluation rounds measure the local-global gap with it).
    """
    ids = largest_first(client_ids, self.arrays.counts)
    padded = self.layout.pad_ids(ids)
    length = self.arrays.padded_length(ids, self.multiple)
    shape = (length,) if test_arrays is None else (length, test_arrays.padded_length(ids, 8))
    if shape not in self.lengths:
      self.lengths.add(shape)
      logging.info(
        "Rounds padded to %s examples per client (new shape: compiling).",
        " + ".join(map(str, shape)),
      )

    def gather(block):
      train = self.arrays.gather(block, length)
      if test_arrays is None:
        return block, train
      return block, WithTest(train, test_arrays.gather(block, shape[1]))

    sharded_ids, batch = client_arrays(self.mesh, padded, gather)
    return ids, sharded_ids, batch


def client_arrays(mesh: Mesh, client_ids, gather):
  """`gather(client_ids)` for a jitted function whose `in_shardings` split it over `clients`.

  `gather(ids)` returns a pytree of NumPy arrays with leading axis len(ids). In one
  process that is what it returns: jit's fast path sends each device its block. With
  several processes each calls `gather` once per local device with that device's block
  of ids, so a host reads only the clients its devices hold, and the blocks of all hosts
  form global arrays.
  """
  ids = np.asarray(client_ids)
  if jax.process_count() == 1:
    return gather(ids)
  sharding = client_sharding(mesh)
  blocks = sharding.addressable_devices_indices_map(ids.shape)
  parts = {device: jax.tree.flatten(gather(ids[index])) for device, index in blocks.items()}
  treedef = next(iter(parts.values()))[1]

  def build(i):
    arrays = [jax.device_put(leaves[i], device) for device, (leaves, _) in parts.items()]
    return jax.make_array_from_single_device_arrays(
      (len(ids),) + arrays[0].shape[1:], sharding, arrays
    )

  return jax.tree.unflatten(treedef, [build(i) for i in range(treedef.num_leaves)])
