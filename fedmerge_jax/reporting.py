"""Where a run's evaluations go: metrics.jsonl, TensorBoard, clients.npz, the progress bar
and its printed lines, the best round by validation loss, and at the end summary.json and
the plots. Only the main process writes files (`enabled`).
"""

import json
import os
import time
from typing import Callable, Dict, Optional, Tuple

from absl import logging

from fedmerge_jax import metric_writers
from fedmerge_jax import plot
from fedmerge_jax import progress as progress_lib

# "0" skips the plots at a run's end (~1 CPU-s a run; `python -m fedmerge_jax.plot` still
# draws them from the workdir later): the test suite sets it, as most tests check metrics.
PLOTS_ENV = "FEDMERGE_JAX_PLOTS"
SUMMARY_KEYS = ("acc_mean", "acc_weighted", "acc_std", "acc_p10", "loss")
SHOWN = (
  "train/loss",
  "test/acc_mean",
  "test/acc_weighted",
  "test/acc_p10",
  "val/loss",
  "gap/acc_mean",
)  # In the line printed per evaluation.


def format_metrics(metrics: Dict[str, float]) -> str:
  parts = [f"round {metrics['round']:>5d}"]
  parts += [f"{k} {metrics[k]:.4f}" for k in SHOWN if k in metrics]
  parts.append(f"{metrics['rounds_per_s']:.2f} rounds/s")
  return " | ".join(parts)


def best_by_validation(latest, current_best):
  """Keeps the evaluation with the lowest mean validation loss (test metrics at it)."""
  if "val/loss" not in latest:
    return current_best
  if current_best is None or latest["val/loss"] < current_best["best/val_loss"]:
    best = {f"best/{k}": latest[f"test/{k}"] for k in SUMMARY_KEYS}
    best["best/val_loss"] = latest["val/loss"]
    best["best/round"] = latest["round"]
    return best
  return current_best


Evaluation = Tuple[Dict[str, float], Dict, Optional[object]]  # metrics, per-client, weights.


class Reporter:
  """A run's reports from `start_round` on (a resumed run's files drop what came after it).

  `best` and `metrics`: the best-by-validation and latest evaluation so far (a checkpoint's).
  `data`: the run's FederatedData (client ids and groups name clients.npz's rows). `label`:
  the start of each printed line (a replica group's workdir, replicas.py).
  """

  def __init__(
    self,
    workdir: str,
    config,
    data,
    start_round: int,
    best: Optional[dict],
    metrics: dict,
    enabled: bool = True,
    label: str = "",
  ):
    self.workdir, self.data, self.enabled, self.label = workdir, data, enabled, label
    self.num_rounds, self.start_round = config.num_rounds, start_round
    self.best, self.metrics = best, metrics
    self.jsonl = metric_writers.JsonlWriter(workdir, start_round) if enabled else None
    self.tensorboard = (
      metric_writers.TensorBoardWriter(workdir, start_round)
      if enabled and config.tensorboard
      else None
    )
    self.bar = progress_lib.Progress(config.num_rounds, start_round, enabled=enabled)
    self.start = self.last_time = time.perf_counter()
    self.last_round = start_round

  def __enter__(self) -> "Reporter":
    return self

  def advance(self) -> None:
    """One more round dispatched."""
    self.bar.advance()

  def report(self, round_index: int, evaluate: Callable[[], Evaluation]) -> None:
    """Evaluates (`evaluate()`: metrics starting with 'round', per-client arrays, merging
    weights or None) and writes it everywhere; rounds/s counts rounds, not evaluations."""
    now = time.perf_counter()
    metrics, per_client, weights = evaluate()
    metrics["rounds_per_s"] = (round_index - self.last_round) / (now - self.last_time)
    self.metrics, self.best = metrics, best_by_validation(metrics, self.best)
    if self.enabled:
      self.jsonl.write(metrics)
      if self.tensorboard:
        self.tensorboard.write(round_index, metrics, per_client, weights)
      metric_writers.write_clients_npz(
        self.workdir, round_index, self.data.client_ids, per_client, weights, self.data.groups
      )
    self.bar.show(metrics)
    self.bar.print(f"{self.label}: " * bool(self.label) + format_metrics(metrics))
    self.last_time, self.last_round = time.perf_counter(), round_index

  def progress(self):
    """(best, latest metrics): what a checkpoint keeps of the reports."""
    return self.best, self.metrics

  def __exit__(self, *exc) -> bool:
    self.bar.close()
    if self.tensorboard:
      self.tensorboard.close()
    return False

  def summary(self) -> dict:
    """The final metrics and the best-by-validation ones, written to summary.json with the
    plots; what train_and_evaluate returns."""
    if self.start_round == self.num_rounds:
      logging.info("All %d rounds were already done in %s.", self.num_rounds, self.workdir)
    summary = dict(self.metrics)
    summary.update(self.best or {})
    summary["wall_time_s"] = time.perf_counter() - self.start
    if self.enabled:
      metric_writers.write_atomically(
        os.path.join(self.workdir, "summary.json"),
        lambda f: f.write(json.dumps(summary, indent=2).encode()),
      )
      if os.environ.get(PLOTS_ENV, "1") != "0":
        plot.write_plots(self.workdir)
    return summary
