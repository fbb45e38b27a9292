"""Per-client evaluation of each client's own (personalised) model on its own split."""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

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


def make_evaluator(algorithm, data, chunk_size: int):
  """Returns evaluate(state) -> metrics for the test (and val) split of every client.

  Each client is evaluated with its own model, `algorithm.personalized`. Clients go
  `chunk_size` at a time (all at once if 0), each chunk one jitted call of a fixed shape;
  the last chunk is padded with repeats and the padding dropped.
  """
  n = data.num_clients
  chunk = n if chunk_size <= 0 else min(chunk_size, n)

  @jax.jit
  def eval_chunk(state, client_ids, train: ClientData, batch: ClientData):
    personal = algorithm.personalized(state, client_ids, train)
    return jax.vmap(lambda m, d: evaluate_client(algorithm.predict, m, d))(personal, batch)

  splits = {"test": data.test}
  if data.val is not None:
    splits["val"] = data.val

  def evaluate(state) -> Dict[str, float]:
    metrics = {}
    for prefix, arrays in splits.items():
      correct, loss_sum = np.zeros(n), np.zeros(n)
      for start in range(0, n, chunk):
        ids = np.arange(start, start + chunk)
        ids = np.where(ids < n, ids, start)  # Pad the last chunk with a real client.
        c, l = jax.device_get(eval_chunk(state, ids, data.train.gather(ids), arrays.gather(ids)))
        keep = slice(0, min(chunk, n - start))
        correct[start:start + chunk] = c[keep]
        loss_sum[start:start + chunk] = l[keep]
      metrics.update(summarize(correct, loss_sum, arrays.counts, prefix))
    return metrics

  return evaluate
