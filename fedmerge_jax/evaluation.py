"""Per-client evaluation of each client's own (personalised) model on its own split."""

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import parallel
from fedmerge_jax.client import ClientData, masked_cross_entropy


def evaluate_client(predict, personal_model, data: ClientData):
  """One client: (number correct, summed CE) of `predict(personal_model, x)` on its examples."""
  logits = predict(personal_model, data.x)
  mask = (jnp.arange(data.y.shape[0]) < data.count).astype(jnp.float32)
  loss_sum, _ = masked_cross_entropy(logits, data.y, mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == data.y) * mask)
  return correct, loss_sum


def summarize(correct: np.ndarray, loss_sum: np.ndarray, counts: np.ndarray,
              prefix: str) -> Dict[str, float]:
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


def make_evaluator(algorithm, data, chunk_size: int, mesh=None, compiler_options=None):
  """Returns evaluate(state) -> metrics for the test (and val) split of every client.

  Besides the summary scalars, `clients/<split>_acc` holds every client's accuracy
  (NaN for a client without examples in that split), for histograms and plots.

  Each client is evaluated with its own model, `algorithm.personalized`. Clients go
  `chunk_size` at a time (all at once if 0), rounded up to a multiple of `mesh`'s devices
  (one device if None) and split over them, in order of size so that a chunk's members
  have similar numbers of examples; each chunk is padded only to its own largest client,
  bucketed (`ClientArrays.padded_length`), so few shapes compile. The last chunk is
  filled with repeats of a real client whose results are dropped.
  `compiler_options` go to XLA with every chunk's computation (`models.compiler_options`).
  """
  mesh = mesh or parallel.make_mesh(1)
  n = data.num_clients
  chunk = parallel.client_layout(mesh.size, n, 0, chunk_size).eval_chunk
  splits = {"test": data.test}
  if data.val is not None:
    splits["val"] = data.val

  clients = parallel.client_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(None, clients, clients, clients),
                     out_shardings=parallel.replicated(mesh), compiler_options=compiler_options)
  def eval_chunk(state, client_ids, train: ClientData, batches):
    """Every split of a chunk of clients, each client's model built once for all splits."""
    personal = algorithm.personalized(state, client_ids, train)
    evaluate_all = jax.vmap(lambda m, d: evaluate_client(algorithm.predict, m, d))
    return {name: evaluate_all(personal, batch) for name, batch in batches.items()}

  every = {"train": data.train, **splits}
  sizes = sum(arrays.counts.astype(np.int64) for arrays in every.values())
  order = parallel.largest_first(np.arange(n), sizes).astype(np.int32)
  chunks = [(ids, real, {name: arrays.padded_length(ids, 8) for name, arrays in every.items()})
            for ids, real in parallel.padded_chunks(order, chunk)]

  def gather(ids, lengths):
    """A chunk's ids, train data and evaluation splits (NumPy), each padded to its length."""
    batches = {name: arrays.gather(ids, lengths[name]) for name, arrays in splits.items()}
    return ids, data.train.gather(ids, lengths["train"]), batches

  def evaluate(state) -> Dict[str, float]:
    correct = {name: np.zeros(n) for name in splits}
    loss_sum = {name: np.zeros(n) for name in splits}
    for ids, real, lengths in chunks:
      arrays = parallel.client_arrays(mesh, ids, lambda block: gather(block, lengths))
      results = jax.device_get(eval_chunk(state, *arrays))
      for name, (c, l) in results.items():
        correct[name][ids[:real]] = c[:real]
        loss_sum[name][ids[:real]] = l[:real]
    metrics = {}
    for name, arrays in splits.items():
      metrics.update(summarize(correct[name], loss_sum[name], arrays.counts, name))
      with np.errstate(invalid="ignore", divide="ignore"):
        metrics[f"clients/{name}_acc"] = np.where(
            arrays.counts > 0, correct[name] / arrays.counts, np.nan)
    return metrics

  return evaluate
