"""train_and_evaluate: config -> data -> algorithm state -> jitted rounds -> metrics.

Python only samples clients, gathers their padded data, logs and writes files; each
round is one jitted call of the algorithm's pure `round` function.
"""

import json
import os
import time
from typing import Dict, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import algorithms
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import evaluation
from fedmerge_jax import models

SUMMARY_KEYS = ("acc_mean", "acc_weighted", "acc_std", "acc_p10", "loss")


def sample_clients(rng, num_clients: int, clients_per_round: int) -> np.ndarray:
  """`clients_per_round` distinct clients (all if 0), sorted, from a key."""
  if clients_per_round <= 0 or clients_per_round >= num_clients:
    return np.arange(num_clients)
  ids = jax.random.choice(rng, num_clients, (clients_per_round,), replace=False)
  return np.sort(np.asarray(ids))


def format_metrics(metrics: Dict[str, float]) -> str:
  shown = ["train/loss", "test/acc_mean", "test/acc_weighted", "test/acc_p10", "val/loss"]
  parts = [f"round {metrics['round']:>5d}"]
  parts += [f"{k} {metrics[k]:.4f}" for k in shown if k in metrics]
  parts.append(f"{metrics['rounds_per_s']:.2f} rounds/s")
  return " | ".join(parts)


class MetricsWriter:
  """Appends one JSON object per evaluation to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    open(self.path, "w").close()

  def write(self, metrics: Dict[str, float]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(metrics) + "\n")


def build(config, data: data_lib.FederatedData):
  """The (model, algorithm) that a resolved `config` names, for `data`'s clients and inputs."""
  model = models.get_model(config.model, data.num_classes)
  algorithm = algorithms.get_algorithm(
      model, config, data.num_clients, jnp.zeros(data.example_shape, jnp.float32))
  return model, algorithm


def jit_round(config, algorithm):
  """The jitted round as every run uses it: state donated, this backend's XLA options."""
  return jax.jit(algorithm.round, donate_argnums=0,
                 compiler_options=models.compiler_options(config.model))


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


def check_finite(round_metrics, round_index: int, client_ids) -> None:
  """Stops a run whose training produced NaN or infinite losses, naming the clients."""
  losses = np.asarray(round_metrics["clients/train_loss"])
  bad = ~np.isfinite(losses)
  if bad.any():
    raise FloatingPointError(
        f"Non-finite training loss at round {round_index} for clients "
        f"{client_ids[bad].tolist()}; lower config.client_lr or check those clients' data.")


def train_and_evaluate(config, workdir: str, data: Optional[data_lib.FederatedData] = None):
  """Runs `config` and returns the final metrics and the best-by-validation ones.

  Writes <workdir>/config.json (the resolved config), metrics.jsonl (one line per
  evaluation) and summary.json (what this returns).
  """
  config = config_lib.resolve(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  data = data if data is not None else data_lib.load(config.data)
  _, algorithm = build(config, data)
  logging.info("%s on %s: %d clients, %d classes, backend %s", config.algorithm, data.name,
               data.num_clients, data.num_classes, jax.default_backend())

  init_rng, sample_rng, round_rng = jax.random.split(jax.random.key(config.seed), 3)
  options = models.compiler_options(config.model)
  state = jax.jit(algorithm.init)(init_rng)
  round_fn = jit_round(config, algorithm)
  evaluate = evaluation.make_evaluator(algorithm, data, config.client_chunk_size, options)
  down, up = algorithm.communication
  writer = MetricsWriter(workdir)
  best, metrics = None, {}
  start = last_time = time.perf_counter()
  last_round = 0
  for r in range(1, config.num_rounds + 1):
    ids = sample_clients(jax.random.fold_in(sample_rng, r), data.num_clients,
                         config.clients_per_round)
    state, round_metrics = round_fn(state, ids, data.train.gather(ids),
                                    jax.random.fold_in(round_rng, r))
    check_finite(round_metrics, r, ids)
    if r % config.eval_every == 0 or r == config.num_rounds:
      now = time.perf_counter()
      metrics = {"round": r}
      metrics.update({k: float(v) for k, v in round_metrics.items() if k.startswith("train/")})
      metrics.update(evaluate(state))
      metrics.update({"comm/params_down_per_client": down, "comm/params_up_per_client": up,
                      "comm/params_per_round": len(ids) * (down + up)})
      metrics["rounds_per_s"] = (r - last_round) / (now - last_time)
      best = best_by_validation(metrics, best)
      writer.write(metrics)
      print(format_metrics(metrics), flush=True)
      last_time, last_round = time.perf_counter(), r
  summary = dict(metrics)
  summary.update(best or {})
  summary["wall_time_s"] = time.perf_counter() - start
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
