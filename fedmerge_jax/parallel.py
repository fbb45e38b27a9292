"""How the client axis runs: clients in vmapped chunks or one at a time, chunks in a loop.

What a client does lives in `client.py`; this module only decides how clients execute
(`parallelism`) and how many clients' outputs are held at once (`chunk_size`). With a
`reduce`, each chunk's outputs are folded into running sums as soon as the chunk is
done, so memory holds one chunk of outputs, not all clients'. Results are the same for
every choice, up to float summation order.
"""

import jax
import jax.numpy as jnp

CLIENT_PARALLELISMS = ("auto", "vmap", "sequential")


def resolve_parallelism(parallelism: str) -> str:
  """'auto' -> 'sequential' on CPU (measured fastest there, see README), 'vmap' on GPU/TPU."""
  if parallelism == "auto":
    return "sequential" if jax.default_backend() == "cpu" else "vmap"
  if parallelism not in CLIENT_PARALLELISMS:
    raise ValueError(f"client_parallelism={parallelism!r}; expected one of {CLIENT_PARALLELISMS}.")
  return parallelism


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def map_clients(fn, args, chunk_size: int = 0, parallelism: str = "auto", reduce=None):
  """Applies `fn(*per_client_args)` over the leading (client) axis of every leaf of `args`.

  parallelism 'vmap': chunks of `chunk_size` clients (all if <= 0), each chunk one `vmap`;
  'sequential': one client at a time, no vmap (chunks of one). Chunks run in a `lax.scan`.
  Without `reduce` returns the per-client outputs stacked (leading axis C). With
  `reduce(chunk_args, chunk_outputs) -> (totals, kept)`, called on every chunk (leading
  axis = chunk), returns (sum of `totals` over chunks, `kept` concatenated over chunks):
  what is summed never exists for all clients at once.
  """
  parallelism = resolve_parallelism(parallelism)
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
    # Chunks are sliced from the inputs inside the loop: reshaping the inputs to
    # [chunks, chunk, ...] instead makes XLA copy them all (a layout change).
    take = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk), args)
    shapes, _ = jax.eval_shape(run, take(0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(total, i):
      totals, kept = run(take(i))
      return _add(total, totals), kept

    totals, kept = jax.lax.scan(body, zeros, jnp.arange(num_chunks))
    kept = jax.tree.map(lambda x: x.reshape(full, *x.shape[2:]), kept)
    if rest:
      last_totals, last_kept = run(jax.tree.map(lambda x: x[full:], args))
      totals = _add(totals, last_totals)
      kept = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), kept, last_kept)
  return kept if reduce is None else (totals, kept)
