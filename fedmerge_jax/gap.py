"""The local-global gap: what a client loses between its local training and the next model.

FedMerge's claim (arXiv 2504.06768): merging "smoothens the local-global gap between
consecutive rounds caused by client drift". Measured here for every algorithm, on each
evaluation round, for the clients trained in that round, on each client's own test split:
  (a) the model the client holds at the end of its local training this round;
  (b) the model the server sends it next (`Algorithm.received`, default `personalized`,
      of the state after the round).
gap/acc_mean = mean over those clients of acc(a) - acc(b); gap/loss_mean = mean of
loss(b) - loss(a). Positive: the server's model is worse on the client's data than what
the client had just trained.

How, without training twice: on evaluation rounds train.py passes the round `WithTest`
data (the sampled clients' test split attached; a replica group attaches an empty one on
its other rounds, so that both kinds of round are one program). Each local-training site
calls `probe`, which evaluates the just-trained model on that split (in a group, no one's
when all are empty) and adds two scalars to the client's metrics (`base.training_metrics` forwards
them). Only those two scalars per client are kept; then `make_gap_evaluator` evaluates (b)
chunk by chunk.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import evaluation
from fedmerge_jax import parallel
from fedmerge_jax.client import ClientData
from fedmerge_jax.round_data import WithTest  # Where parallel gathers it; gap.WithTest still works.

TRAINED_KEYS = ("gap_trained_correct", "gap_trained_loss_sum")  # Per-client, from `probe`.


def train_part(data):
  """What local training sees: the training data, whether or not a test split is attached."""
  return data.train if isinstance(data, WithTest) else data


def probe(metrics: dict, predict, trained_model, data) -> dict:
  """metrics plus (a)'s correct count and summed loss on the client's test split, if attached
  (`evaluation.EVAL_EXAMPLES` examples at a time); with `data.skips_empty`, zeros computed
  for no one when every client's attached split is empty (`unless_empty`)."""
  if not isinstance(data, WithTest):
    return metrics
  scores = lambda: evaluation.evaluate_client(
    predict, trained_model, data.test, evaluation.EVAL_EXAMPLES
  )
  correct, loss_sum = unless_empty(scores, data.test.count) if data.skips_empty else scores()
  return dict(metrics, gap_trained_correct=correct, gap_trained_loss_sum=loss_sum)


def unless_empty(scores, count):
  """`scores()` (float32 scalars) if `count` > 0, else zeros: a loop of at most one trip. Under
  vmap a cond on a batched predicate computes both branches, but a loop stops when no member
  goes on, so clients whose test parts are all empty (a replica group's training rounds, which
  attach empty ones to run the evaluation rounds' program) compute no probe."""
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), jax.eval_shape(scores))
  once = lambda carry: (jnp.array(True), jax.tree.map(lambda x: x.astype(jnp.float32), scores()))
  go_on = lambda carry: jnp.logical_not(carry[0]) & (count > 0)
  return jax.lax.while_loop(go_on, once, (jnp.array(False), zeros))[1]


def forward(client_metrics: dict) -> dict:
  """The per-client (a) scalars as round metrics 'clients/gap_trained_*' (none if not probed)."""
  return {f"clients/{k}": client_metrics[k] for k in TRAINED_KEYS if k in client_metrics}


def summarize(
  trained: Tuple[np.ndarray, np.ndarray],
  received: Tuple[np.ndarray, np.ndarray],
  test_counts: np.ndarray,
) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
  """(scalars, per-client acc and loss gaps) from (correct, loss_sum) of (a) and (b).

  Clients without test examples are left out (their per-client gaps are NaN).
  """
  n = np.asarray(test_counts, np.float64)
  has = n > 0
  with np.errstate(invalid="ignore", divide="ignore"):
    acc_a, loss_a = trained[0] / n, trained[1] / n
    acc_b, loss_b = received[0] / n, received[1] / n
  acc_gap = np.where(has, acc_a - acc_b, np.nan)
  loss_gap = np.where(has, loss_b - loss_a, np.nan)
  mean = lambda v: float(np.mean(v[has])) if has.any() else float("nan")
  scalars = {
    "gap/acc_mean": mean(acc_gap),
    "gap/loss_mean": mean(loss_gap),
    "gap/trained_acc_mean": mean(acc_a),
    "gap/received_acc_mean": mean(acc_b),
  }
  return scalars, {"acc": acc_gap, "loss": loss_gap}


def make_gap_evaluator(
  algorithm,
  data,
  chunk_size: int = 0,
  compiler_options=None,
  example_chunk: int = 0,
  replicas: bool = False,
):
  """Returns gap(state, client_ids, round_metrics) -> (scalars, per-client arrays over all N).

  `state` is the state after the round that trained `client_ids` (real ids, in the round's order)
  with `WithTest` data; round_metrics holds its 'clients/gap_trained_*' (phantoms after the
  real clients). (b) is evaluated `chunk_size` clients at a time (all if 0), each client's
  examples `example_chunk` at a time (all if 0); the per-client arrays are NaN for clients
  not trained in the round. With `replicas`, everything has a leading replica axis R (each
  replica its own clients, `client_ids` [R, C]) and gap returns a list of R such pairs, all
  replicas evaluated by one program per chunk.
  """
  received = algorithm.received or algorithm.personalized

  def evaluate_chunk(state, client_ids, train: ClientData, test: ClientData):
    models = received(state, client_ids, train)
    return jax.vmap(
      lambda m, d: evaluation.evaluate_client(algorithm.predict, m, d, example_chunk)
    )(models, test)

  evaluate_chunk = jax.jit(
    evaluation.over_replicas(evaluate_chunk, replicas, 0), compiler_options=compiler_options
  )

  def gather(arrays, rows):
    """`arrays` of each replica's ids (rows), padded to one length; stacked with `replicas`."""
    length = max(arrays.padded_length(ids, 8) for ids in rows)
    parts = [arrays.gather(ids, length) for ids in rows]
    return parallel.stacked(parts) if replicas else parts[0]

  def gap(state, client_ids, round_metrics):
    ids = np.asarray(client_ids).reshape(len(client_ids) if replicas else 1, -1)  # [R, C].
    c = ids.shape[1]
    chunk = c if chunk_size <= 0 else min(chunk_size, c)
    correct, loss_sum = np.zeros(ids.shape), np.zeros(ids.shape)
    every_row = [parallel.padded_chunks(row, chunk) for row in ids]
    for start, pieces in zip(range(0, c, chunk), zip(*every_row)):
      padded, real = np.stack([p for p, _ in pieces]), pieces[0][1]
      args = (padded if replicas else padded[0], gather(data.train, padded))
      got = jax.device_get(evaluate_chunk(state, *args, gather(data.test, padded)))
      correct[:, start : start + real] = np.reshape(got[0], (len(ids), -1))[:, :real]
      loss_sum[:, start : start + real] = np.reshape(got[1], (len(ids), -1))[:, :real]
    every_replica = []
    for r, row in enumerate(ids):
      trained = tuple(
        np.reshape(round_metrics[f"clients/{k}"], (len(ids), -1))[r, :c] for k in TRAINED_KEYS
      )
      scalars, per_client = summarize(trained, (correct[r], loss_sum[r]), data.test.counts[row])
      full = {}
      for name, values in per_client.items():
        full[f"clients/gap_{name}"] = np.full(data.num_clients, np.nan)
        full[f"clients/gap_{name}"][row] = values
      every_replica.append((scalars, full))
    return every_replica if replicas else every_replica[0]

  return gap
