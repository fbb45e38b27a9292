"""How the client axis runs: vmap, chunks, and sharding over a device mesh axis `clients`.

What a client does lives in `client.py`; this module decides how many run at once and on
which devices. Every array whose leading axis is clients (the population's per-client
state, a round's sampled data) is split in contiguous blocks over the mesh axis
`clients`; `jax.jit` propagates that layout through the algorithms unchanged. Client
counts are padded to multiples of the device count with phantom clients: no examples,
so sample weight 0 and no effect; they are never sampled or evaluated.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedmerge_jax.client import ClientData

CLIENTS = "clients"  # The mesh axis the client axis is sharded over.


def map_clients(fn, args, chunk_size: int = 0):
  """Applies `fn(*per_client_args)` over the leading (client) axis of every leaf of `args`.

  chunk_size <= 0 or >= the number of clients: one `vmap` over all of them. Otherwise a
  `lax.map` over vmapped chunks, so memory holds `chunk_size` clients at a time. Chunks
  are strided (chunk s holds clients s, s + S, s + 2S, ... for S chunks) when they divide
  the clients evenly, so that each takes the same share of every device's block;
  otherwise `lax.map`'s contiguous batches, the remainder one more vmap. Results are
  identical either way.
  """
  num_clients = jax.tree.leaves(args)[0].shape[0]
  if chunk_size <= 0 or chunk_size >= num_clients:
    return jax.vmap(fn)(*args)
  if num_clients % chunk_size:
    return jax.lax.map(lambda a: fn(*a), args, batch_size=chunk_size)
  steps = num_clients // chunk_size
  to_chunks = lambda x: jnp.swapaxes(x.reshape(chunk_size, steps, *x.shape[1:]), 0, 1)
  from_chunks = lambda y: jnp.swapaxes(y, 0, 1).reshape(num_clients, *y.shape[2:])
  out = jax.lax.map(lambda a: jax.vmap(fn)(*a), jax.tree.map(to_chunks, args))
  return jax.tree.map(from_chunks, out)


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh with axis `clients` over the first `num_devices` devices (0: all of them)."""
  available = jax.device_count()
  n = num_devices or available
  if n > available:
    raise ValueError(f"config.num_devices={num_devices} but only {available} devices exist; "
                     "use 0 for all of them.")
  if jax.process_count() > 1 and n != available:
    raise ValueError(f"config.num_devices={num_devices}: a multi-host run uses every device "
                     "(set it to 0).")
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
  num_clients: int
  num_sampled: int
  chunk_size: int
  round_size: int
  population: int
  eval_chunk: int

  def pad_ids(self, client_ids) -> np.ndarray:
    """A round's sorted real ids followed by its phantom ids (>= num_clients, distinct)."""
    phantoms = np.arange(self.num_clients, self.num_clients + self.round_size - len(client_ids))
    return np.concatenate([np.asarray(client_ids), phantoms]).astype(np.int32)


def client_layout(num_devices: int, num_clients: int, clients_per_round: int,
                  chunk_size: int) -> ClientLayout:
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
  return ClientLayout(num_clients, sampled, chunk, round_size, population, eval_chunk)


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


def sharded_init(init, mesh: Mesh, population: int, rng):
  """(init(rng), its shardings), the leaves with a leading population axis split over `clients`."""
  shardings = state_shardings(mesh, jax.eval_shape(init, rng), population)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def jit_round(round_fn, mesh: Mesh, shardings):
  """`round_fn(state, client_ids, data, rng)` jitted for a state laid out as `shardings`.

  Client ids and data come split over `clients` (see `client_arrays`), the key replicated.
  The new state keeps the layout (so the donated buffers are reused in place) and the
  metrics come back replicated, readable on every host.
  """
  clients, copies = client_sharding(mesh), replicated(mesh)
  return jax.jit(round_fn, donate_argnums=0, in_shardings=(shardings, clients, clients, copies),
                 out_shardings=(shardings, copies))


def gather_with_phantoms(arrays, client_ids) -> ClientData:
  """`arrays.gather(client_ids)` (NumPy) where ids past the real clients are phantoms.

  A phantom has zeros for examples and a count of 0, so it trains to no change and its
  sample weight is 0.
  """
  ids = np.asarray(client_ids)
  phantom = ids >= arrays.counts.shape[0]
  data = arrays.gather(np.where(phantom, 0, ids))
  if not phantom.any():
    return data
  data.x[phantom], data.y[phantom] = 0, 0  # gather's fancy indexing made fresh arrays.
  return ClientData(data.x, data.y, np.where(phantom, 0, data.count))


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
        (len(ids),) + arrays[0].shape[1:], sharding, arrays)

  return jax.tree.unflatten(treedef, [build(i) for i in range(treedef.num_leaves)])
