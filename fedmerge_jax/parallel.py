"""How the client axis runs: all clients in one `vmap`, or chunks of them in a `lax.map`.

What a client does lives in `client.py`; this module only decides how many run at once.
Chunking bounds activation memory to `chunk_size` clients' worth; results are identical.
"""

import jax


def map_clients(fn, args, chunk_size: int = 0):
  """Applies `fn(*per_client_args)` over the leading (client) axis of every leaf of `args`.

  chunk_size <= 0 or >= the number of clients: one `vmap` over all of them. Otherwise
  `lax.map` with `batch_size=chunk_size`: a loop over vmapped chunks (the remainder
  handled by one more vmap), so memory holds `chunk_size` clients at a time.
  """
  num_clients = jax.tree.leaves(args)[0].shape[0]
  if chunk_size <= 0 or chunk_size >= num_clients:
    return jax.vmap(fn)(*args)
  return jax.lax.map(lambda a: fn(*a), args, batch_size=chunk_size)
