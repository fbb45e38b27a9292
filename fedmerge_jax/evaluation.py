"""Per-client evaluation of each client's own (personalised) model on its own split, in
chunks of clients and, within a client, of examples: memory holds one chunk's activations,
however large the splits."""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import parallel
from fedmerge_jax.client import ClientData, masked_cross_entropy

EVAL_EXAMPLES = 256  # Automatic examples of one client evaluated at once (config.eval_batch_size).
EVAL_ROWS = 2048  # Automatic clients at once (config.eval_chunk_size): about this many examples.


def _scores(predict, personal_model, x, y, mask):
  """(number correct, summed CE) over the rows of `x` where `mask`."""
  logits = predict(personal_model, x)
  mask = mask.astype(jnp.float32)
  loss_sum, _ = masked_cross_entropy(logits, y, mask)
  return jnp.sum((jnp.argmax(logits, -1) == y) * mask), loss_sum


def evaluate_client(predict, personal_model, data: ClientData, example_chunk: int = 0):
  """One client: (number correct, summed CE) of `predict(personal_model, x)` on its examples,
  `example_chunk` rows at a time (all at once if 0 or at least the padded length), so only
  one chunk's activations exist at once. A last chunk past the padded length is shifted back
  to end there, its rows already counted masked out."""
  length = data.y.shape[0]
  rows = jnp.arange(length)
  if example_chunk <= 0 or example_chunk >= length:
    return _scores(predict, personal_model, data.x, data.y, rows < data.count)

  def add_chunk(i, totals):
    start = jnp.minimum(i * example_chunk, length - example_chunk)
    chunk_rows = start + jnp.arange(example_chunk)
    mask = (chunk_rows >= i * example_chunk) & (chunk_rows < data.count)
    x = jax.lax.dynamic_slice_in_dim(data.x, start, example_chunk)
    y = jax.lax.dynamic_slice_in_dim(data.y, start, example_chunk)
    scores = _scores(predict, personal_model, x, y, mask)
    return tuple(total + score.astype(jnp.float32) for total, score in zip(totals, scores))

  zero = jnp.zeros((), jnp.float32)
  return jax.lax.fori_loop(0, -(-length // example_chunk), add_chunk, (zero, zero))


def chunk_sizes(config, data) -> Tuple[int, int]:
  """(clients, examples per client) evaluated at once: `config.eval_chunk_size` and
  `config.eval_batch_size`, each chosen where 0: `EVAL_EXAMPLES` examples, and clients for
  about `EVAL_ROWS` examples at once (at most `config.client_chunk_size` where that is set)."""
  examples = config.eval_batch_size or EVAL_EXAMPLES
  clients = config.eval_chunk_size
  if not clients:
    splits = [a for a in (data.test, data.val) if a is not None]
    longest = max(int(a.counts.max(initial=0)) for a in splits)
    clients = max(1, EVAL_ROWS // max(1, min(examples, longest)))
    if config.client_chunk_size:
      clients = min(clients, config.client_chunk_size)
  return min(clients, data.num_clients), examples


def summarize(
  correct: np.ndarray, loss_sum: np.ndarray, counts: np.ndarray, prefix: str
) -> Dict[str, float]:
  """The paper's unweighted mean over clients, plus weighted, spread and bottom decile.

  Clients without examples in this split are left out of the per-client statistics.
  """
  has = counts > 0
  acc = correct[has] / counts[has]
  loss = loss_sum[has] / counts[has]
  return {
    f"{prefix}/acc_mean": float(np.mean(acc)),
    f"{prefix}/acc_weighted": float(correct[has].sum() / counts[has].sum()),
    f"{prefix}/acc_std": float(np.std(acc)),
    f"{prefix}/acc_p10": float(np.percentile(acc, 10)),
    f"{prefix}/loss": float(np.mean(loss)),
  }


def over_replicas(fn, replicas: bool, in_axes):
  """`fn` itself, or (`replicas`) `fn` vmapped over a leading replica axis of the arguments
  whose `in_axes` are 0 (the state's always): one program evaluates every replica."""
  return jax.vmap(fn, in_axes=in_axes) if replicas else fn


def chunk_program(algorithm, example_chunk: int, mesh, compiler_options=None, replicas=False):
  """The jitted evaluation of one chunk of clients, (state, ids, train, {split: data}) ->
  {split: (correct [C], summed CE [C])}, each client's model built once for all splits and
  its examples evaluated `example_chunk` at a time (`evaluate_client`). With `replicas`,
  `state` has a leading replica axis R and the results [R, C]: one program for all."""
  clients = parallel.client_sharding(mesh)

  def eval_chunk(state, client_ids, train: ClientData, batches):
    personal = algorithm.personalized(state, client_ids, train)
    evaluate_all = jax.vmap(lambda m, d: evaluate_client(algorithm.predict, m, d, example_chunk))
    return {name: evaluate_all(personal, batch) for name, batch in batches.items()}

  return jax.jit(
    over_replicas(eval_chunk, replicas, (0, None, None, None)),
    in_shardings=(None, clients, clients, clients),
    out_shardings=parallel.replicated(mesh),
    compiler_options=compiler_options,
  )


def make_evaluator(
  algorithm,
  data,
  chunk_size: int,
  mesh=None,
  compiler_options=None,
  example_chunk: int = 0,
  replicas: bool = False,
):
  """Returns evaluate(state) -> metrics for the test (and val) split of every client; with
  `replicas`, evaluate(states) -> [metrics of each replica] for states with a leading replica
  axis, all replicas evaluated by one program per chunk.

  Besides the summary scalars, `clients/<split>_acc` holds every client's accuracy
  (NaN for a client without examples in that split), for histograms and plots.

  Each client is evaluated with its own model, `algorithm.personalized`. Clients go
  `chunk_size` at a time (all at once if 0), rounded up to a multiple of `mesh`'s devices
  (one device if None) and split over them, in order of size so that a chunk's members
  have similar numbers of examples; each chunk is padded only to its own largest client,
  bucketed (`ClientArrays.padded_length`), so few shapes compile. The last chunk is
  filled with repeats of a real client whose results are dropped.
  Within a client, examples go `example_chunk` at a time (all at once if 0).
  `compiler_options` go to XLA with every chunk's computation (`models.compiler_options`).
  """
  mesh = mesh or parallel.make_mesh(1)
  n = data.num_clients
  chunk = parallel.client_layout(mesh.size, n, 0, chunk_size).eval_chunk
  splits = {"test": data.test}
  if data.val is not None:
    splits["val"] = data.val

  eval_chunk = chunk_program(algorithm, example_chunk, mesh, compiler_options, replicas)

  every = {"train": data.train, **splits}
  sizes = sum(arrays.counts.astype(np.int64) for arrays in every.values())
  order = parallel.largest_first(np.arange(n), sizes).astype(np.int32)
  chunks = [
    (ids, real, {name: arrays.padded_length(ids, 8) for name, arrays in every.items()})
    for ids, real in parallel.padded_chunks(order, chunk)
  ]

  def gather(ids, lengths):
    """A chunk's ids, train data and evaluation splits (NumPy), each padded to its length."""
    batches = {name: arrays.gather(ids, lengths[name]) for name, arrays in splits.items()}
    return ids, data.train.gather(ids, lengths["train"]), batches

  def evaluate(state):
    correct, loss_sum = {}, {}  # split -> [R, N] (R = 1 without replicas).
    for ids, real, lengths in chunks:
      arrays = parallel.client_arrays(mesh, ids, lambda block: gather(block, lengths))
      results = jax.device_get(eval_chunk(state, *arrays))
      for name, scores in results.items():
        for totals, score in zip((correct, loss_sum), scores):
          score = np.reshape(score, (-1, len(ids)))
          totals.setdefault(name, np.zeros((len(score), n)))[:, ids[:real]] = score[:, :real]
    every_replica = []
    for r in range(len(correct["test"])):
      metrics = {}
      for name, arrays in splits.items():
        metrics.update(summarize(correct[name][r], loss_sum[name][r], arrays.counts, name))
        with np.errstate(invalid="ignore", divide="ignore"):
          metrics[f"clients/{name}_acc"] = np.where(
            arrays.counts > 0, correct[name][r] / arrays.counts, np.nan
          )
      every_replica.append(metrics)
    return every_replica if replicas else every_replica[0]

  return evaluate
