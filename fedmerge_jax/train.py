"""train_and_evaluate: config -> data -> algorithm state -> jitted rounds -> metrics.

Python only samples clients, gathers their padded data, logs, checkpoints and writes
files; each round is one jitted call of the algorithm's pure `round` function. Rerunning
with the same workdir resumes from the last checkpoint and reproduces the same metrics.
"""

import json
import os
import time
from typing import Dict, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import algorithms
from fedmerge_jax import client as client_lib
from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import evaluation
from fedmerge_jax import fingerprint as fingerprint_lib
from fedmerge_jax import gap
from fedmerge_jax import metric_writers
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax import plot
from fedmerge_jax import preemption
from fedmerge_jax import progress as progress_lib

SUMMARY_KEYS = ("acc_mean", "acc_weighted", "acc_std", "acc_p10", "loss")


def sample_clients(rng, num_clients: int, clients_per_round: int) -> np.ndarray:
  """`clients_per_round` distinct clients (all if 0), sorted, from a key."""
  if clients_per_round <= 0 or clients_per_round >= num_clients:
    return np.arange(num_clients)
  ids = jax.random.choice(rng, num_clients, (clients_per_round,), replace=False)
  return np.sort(np.asarray(ids))


def format_metrics(metrics: Dict[str, float]) -> str:
  shown = ["train/loss", "test/acc_mean", "test/acc_weighted", "test/acc_p10", "val/loss",
           "gap/acc_mean"]
  parts = [f"round {metrics['round']:>5d}"]
  parts += [f"{k} {metrics[k]:.4f}" for k in shown if k in metrics]
  parts.append(f"{metrics['rounds_per_s']:.2f} rounds/s")
  return " | ".join(parts)


def build(config, data: data_lib.FederatedData, layout: Optional[parallel.ClientLayout] = None,
          model=None):
  """The (model, algorithm) that a resolved `config` names, for `data`'s clients and inputs.

  With a `layout`, for its padded population and device-aligned chunks (and, on several
  devices, clients vmapped: `auto` parallelism would otherwise pick one at a time on CPU).
  A given `model` (any flax.linen module) replaces the one `config.model` names.
  """
  num_clients = data.num_clients
  if layout is not None:
    config = config.copy_and_resolve_references()
    config.client_chunk_size, num_clients = layout.chunk_size, layout.population
    if layout.num_devices > 1 and config.client_parallelism == "auto":
      config.client_parallelism = "vmap"  # One client at a time would idle all devices but one.
  model = model if model is not None else models.get_model(config.model, data.num_classes)
  algorithm = algorithms.get_algorithm(
      model, config, num_clients, jnp.zeros(data.example_shape, jnp.float32),
      total_train_examples=int(data.train.counts.sum()))
  return model, algorithm


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



class OutOfMemoryError(MemoryError):
  """A round or an evaluation that did not fit in memory, with what to change."""


def all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def keep_finite(round_fn):
  """The round, except that a non-finite loss or state returns the state it was given.

  So the state after a failed round is the last good one: it can be checkpointed even
  though the round donated its input. metrics['finite'] says which happened.
  """
  def guarded(state, client_ids, data, rng):
    new_state, metrics = round_fn(state, client_ids, data, rng)
    finite = jnp.isfinite(metrics["train/loss"]) & all_finite(new_state)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return kept, dict(metrics, finite=finite)
  return guarded


def non_finite_message(round_metrics, round_index: int, client_ids, saved: str) -> str:
  losses = np.asarray(round_metrics["clients/train_loss"])[:len(client_ids)]
  bad = np.asarray(client_ids)[~np.isfinite(losses)].tolist()
  where = f"for clients {bad}" if bad else "in the updated model (the losses were finite)"
  return (f"Non-finite training loss at round {round_index} {where}. {saved} Lower "
          "config.client_lr, or check those clients' data.")


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return isinstance(error, MemoryError) or (
      isinstance(error, jax.errors.JaxRuntimeError)
      and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text))


def out_of_memory_message(config, round_index: int, clients: int, saved: str) -> str:
  at_once = config.client_chunk_size or clients
  return (f"Out of memory at round {round_index} with {at_once} clients on the device at once. "
          f"Set --config.client_chunk_size={max(1, at_once // 4)} (clients are then trained "
          f"and evaluated that many at a time; results are identical). {saved}")


def alive(tree) -> bool:
  """False once any array of `tree` was donated to (consumed by) a jitted call."""
  return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


def compiler_options(config, backend: str = ""):
  """XLA options for a run's jitted rounds and evaluations on this backend (or None): the
  model's (CPU convolutions, models.compiler_options) and the GPU's command buffers."""
  options = dict(models.compiler_options(config.model) or {})
  options.update(parallel.command_buffer_options(config.command_buffers, backend))
  return options or None


CHUNK_PROBE_MEMBERS = 8  # Clients in the program whose memory analysis sizes a chunk.
CHUNK_MEMORY_SHARE = 0.8  # Of the free device memory, what chunks may take.


def chosen_chunk_size(config, data: data_lib.FederatedData, mesh, backend: str = "",
                      free_bytes: Optional[int] = None) -> int:
  """`config.client_chunk_size`; where it is 0 and a GPU/TPU vmaps clients, the chosen chunk
  (0 where that is the whole round), logged: `parallel.choose_chunk_size` over a round's
  step counts (the population's, largest first, at the round's size), bytes per client from
  the memory analysis of the compiled local training of `CHUNK_PROBE_MEMBERS` clients padded
  to the largest client, and the devices' free memory (`free_bytes` where given) less the
  round's data. One client at a time (CPU) keeps 0."""
  backend = backend or jax.default_backend()
  parallelism = config.client_parallelism
  if parallelism == "auto":  # As parallel.resolve_parallelism and build() decide it.
    parallelism = "vmap" if mesh.size > 1 or backend != "cpu" else "sequential"
  if config.client_chunk_size or backend == "cpu" or parallelism != "vmap":
    return config.client_chunk_size
  n = data.num_clients
  sampled = config.clients_per_round if 0 < config.clients_per_round < n else n
  local = client_lib.LocalConfig(config.local_epochs, config.batch_size, config.client_lr,
                                 config.prox_mu, config.local_batching,
                                 compute_dtype=config.compute_dtype)
  by_size = np.sort(data.train.counts)[::-1]
  picked = by_size[np.linspace(0, n - 1, sampled).round().astype(np.int64)]
  steps = [client_lib.num_local_steps(int(c), local) for c in picked]
  length = data.train.padded_length(np.arange(n), config.batch_size)
  model = models.get_model(config.model, data.num_classes)
  m = CHUNK_PROBE_MEMBERS
  example = jnp.zeros((1, *data.example_shape), jnp.float32)
  one = jax.eval_shape(lambda: flax.core.unfreeze(model.init(jax.random.key(0), example)))
  stack = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct((m, *s.shape), s.dtype), tree)
  batch = client_lib.ClientData(
      jax.ShapeDtypeStruct((m, length, *data.example_shape), data.train.x.dtype),
      jax.ShapeDtypeStruct((m, length), data.train.y.dtype), jax.ShapeDtypeStruct((m,), jnp.int32))
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), m))
  train_chunk = jax.vmap(lambda v, d, k: client_lib.local_train(model.apply, v, d, k, local))
  compiled = jax.jit(train_chunk, compiler_options=compiler_options(config, backend)).lower(
      stack(one), batch, keys).compile()
  memory = compiled.memory_analysis()
  per_member = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                + memory.output_size_in_bytes) / m
  if free_bytes is None:
    stats = jax.local_devices()[0].memory_stats() or {}
    free_bytes = (stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)) * mesh.size
  example_bytes = data.train.x.itemsize * int(np.prod(data.example_shape)) + data.train.y.itemsize
  budget = CHUNK_MEMORY_SHARE * free_bytes - sampled * length * example_bytes
  chunk = parallel.choose_chunk_size(steps, per_member, budget)
  real = sum(steps) / parallel.computed_steps(steps, chunk)
  logging.info("client_chunk_size=0: chose %d of %d clients a chunk (%.1f MB each, %.1f GB free;"
               " real fraction %.2f).", chunk, sampled, per_member / 1e6, free_bytes / 1e9, real)
  return 0 if chunk >= sampled else chunk


def compile_round(algorithm, config, mesh=None, shardings=None):
  """The jitted round every run uses: NaN-guarded, its state donated (and laid out as
  `shardings` over `mesh`), compiled with this backend's XLA options for the model."""
  options = compiler_options(config)
  if mesh is None:
    return jax.jit(keep_finite(algorithm.round), donate_argnums=0, compiler_options=options)
  return parallel.jit_round(keep_finite(algorithm.round), mesh, shardings, options)


def without_phantoms(state, layout: parallel.ClientLayout, for_restore: bool = False):
  """Per-client leaves cut to the real clients: checkpoints do not depend on the device count.

  `for_restore`: uninitialised host arrays of the cut shapes instead, as a restore target.
  """
  if layout.population == layout.num_clients:
    return state

  def cut(leaf):
    if not parallel.is_per_client(leaf, layout.population):
      return leaf
    if for_restore:
      return np.empty((layout.num_clients, *leaf.shape[1:]), leaf.dtype)
    return leaf[:layout.num_clients]
  return jax.tree.map(cut, state)


def with_phantoms(saved, state, shardings, layout: parallel.ClientLayout):
  """The inverse: restored real-client rows, then `state`'s phantom rows, laid out again."""
  if layout.population == layout.num_clients:
    return saved

  def pad(restored, fresh, sharding):
    if not parallel.is_per_client(fresh, layout.population):
      return restored
    concatenate = lambda real, all_rows: jnp.concatenate([real, all_rows[layout.num_clients:]])
    return jax.jit(concatenate, out_shardings=sharding)(restored, fresh)
  return jax.tree.map(pad, saved, state, shardings)


def accelerator_line() -> str:
  """What this run computes on, e.g. 'JAX backend gpu: 1 device (NVIDIA H200), 1 process'."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"JAX backend {jax.default_backend()}: {len(devices)} device"
          f"{'s' if len(devices) != 1 else ''} ({', '.join(kinds)}), "
          f"{jax.process_count()} process{'es' if jax.process_count() != 1 else ''}")


def all_merging_weights(algorithm, data: data_lib.FederatedData, chunk_size: int, mesh):
  """state -> [N, K] every real client's merging weights, chunk by chunk as evaluation goes.

  They come from the clients' training data where the algorithm looks at it (IFCA's
  assignment), so plots and the ARI show the weights that evaluation used.
  """
  n = data.num_clients
  chunk = parallel.client_layout(mesh.size, n, 0, chunk_size).eval_chunk
  weights_fn = jax.jit(algorithm.merging_weights, out_shardings=parallel.replicated(mesh))

  def weights(state) -> np.ndarray:
    rows = []
    for ids, real in parallel.padded_chunks(np.arange(n), chunk):
      train = data.train.gather(ids, data.train.padded_length(ids, 8))  # Bucketed: few shapes.
      rows.append(np.asarray(weights_fn(state, ids, train))[:real])
    return np.concatenate(rows)

  return weights


def claim_workdir(config, workdir: str, start_over: bool, main_process: bool) -> None:
  """Before any work: `start_over` empties `workdir` of a previous run; otherwise a workdir
  holding another experiment's config stops here (ExperimentMismatch), data not yet loaded."""
  os.makedirs(workdir, exist_ok=True)
  if start_over:
    if main_process:
      fingerprint_lib.start_over(workdir)
    return
  fingerprint_lib.check(workdir, {"config": fingerprint_lib.config_fingerprint(config)})


def record_experiment(config, workdir: str, data, model, start_over: bool,
                      main_process: bool) -> None:
  """Checks the data and model against what `workdir` holds, then records config and all."""
  current = fingerprint_lib.fingerprint(config, data, model)
  if not start_over:  # (Starting over, other processes may still see the old record.)
    fingerprint_lib.check(workdir, current)
  if main_process:
    metric_writers.write_atomically(os.path.join(workdir, "config.json"),
                                    lambda f: f.write(config.to_json(indent=2).encode()))
    metric_writers.write_atomically(os.path.join(workdir, fingerprint_lib.FILE),
                                    lambda f: f.write(json.dumps(current, indent=1).encode()))


def stopped_saying(checkpoints) -> str:
  """The end of the line a stop request prints: which rounds are safe, and what to do."""
  latest = checkpoints.latest_round() if checkpoints else None
  if latest is None:
    return ("no round is saved (checkpoints are off or none finished yet); rerun to start "
            "again.")
  return f"rounds up to {latest} are saved in {checkpoints.directory}; rerun to resume."


def train_and_evaluate(config, workdir: str, data: Optional[data_lib.FederatedData] = None,
                       model=None, start_over: bool = False):
  """Runs `config` and returns the final metrics and the best-by-validation ones.

  `model`: any flax.linen module called as `apply(variables, x, train=...)` (and `mask=`
  where its __call__ takes it) instead of the one `config.model` names; its last layer
  named 'head' feeds the `official` logit gradient (ConfigError if it needs one).

  Writes to <workdir>: config.json (the resolved config), experiment.json (what identifies
  the run: result-changing config, data and model fingerprints), metrics.jsonl (one line per
  evaluation), TensorBoard events, clients.npz (the latest per-client accuracies and
  merging weights), checkpoints/ (every config.checkpoint_every rounds or
  checkpoint_every_minutes), the plots and summary.json (what this returns). With
  checkpoints already in `workdir` it resumes from the newest one, and the metrics come
  out as if the run had never stopped; a workdir holding another experiment raises
  ExperimentMismatch before any work, unless `start_over` (which deletes its results).
  SIGTERM or SIGUSR1 stops after the round in progress, checkpointed: preemption.Stopped.
  """
  config = config_lib.resolve(config)
  logging.info("%s", accelerator_line())  # The first line: is the accelerator seen?
  main_process = jax.process_index() == 0  # In a multi-host run only process 0 writes.
  claim_workdir(config, workdir, start_over, main_process)
  data = data if data is not None else data_lib.load(config.data)
  for warning in config_lib.data_warnings(config, data.num_clients, data.name):
    logging.warning(warning)
  mesh = parallel.make_mesh(config.num_devices)
  eval_clients, eval_examples = evaluation.chunk_sizes(config, data)  # Before training's choice.
  config.client_chunk_size = chosen_chunk_size(config, data, mesh)  # 0 on CPU: as given.
  layout = parallel.client_layout(mesh.size, data.num_clients, config.clients_per_round,
                                  config.client_chunk_size)
  model, algorithm = build(config, data, layout, model)
  logging.info("%s on %s: %d clients, %d classes, model %s, %d devices used", config.algorithm,
               data.name, data.num_clients, data.num_classes, type(model).__name__, mesh.size)
  record_experiment(config, workdir, data, model, start_over, main_process)
  schedule = checkpoint_lib.Schedule(config.checkpoint_every, config.checkpoint_every_minutes,
                                     config.num_rounds)
  checkpoints = checkpoint_lib.Checkpoints(workdir, config.checkpoint_keep) if schedule.enabled \
      else None

  init_rng, *rngs = jax.random.split(jax.random.key(config.seed), 3)
  rng_data = np.asarray(jax.random.key_data(jnp.stack(rngs)))  # Host arrays: multi-host safe.
  state, shardings = parallel.sharded_init(algorithm.init, mesh, layout.population, init_rng)
  done, best, metrics = 0, None, {}
  restored = checkpoints and checkpoints.restore_latest(
      {"algorithm": without_phantoms(state, layout, for_restore=True), "rngs": rng_data})
  if restored:
    done, saved, progress = restored
    state = with_phantoms(saved["algorithm"], state, shardings, layout)
    rng_data = saved["rngs"]
    best, metrics = progress["best"], progress["metrics"]
    if not bool(all_finite(saved["algorithm"])):
      raise FloatingPointError(
          f"The checkpoint of round {done} in {checkpoints.directory} holds non-finite values; "
          "resuming cannot help: start over with a new --workdir.")
    logging.info("Resuming from the checkpoint of round %d in %s.", done, checkpoints.directory)
  sample_rng, round_rng = jax.random.wrap_key_data(rng_data)
  start_round = state_round = done  # done: rounds whose outputs are written; state_round: `state`'s.

  def save(round_index: int) -> str:
    """Checkpoints `state` as the state after `round_index`; says where, for messages.

    Only a state whose round's outputs are all written is saved (interrupted in an
    evaluation, the round is redone on resume, its metrics line written once)."""
    if checkpoints is None:
      return "Checkpoints are off (config.checkpoint_every=0)."
    if start_round < round_index == state_round and alive(state):
      checkpoints.save(round_index, {"algorithm": without_phantoms(state, layout), "rngs": rng_data},
                       {"round": round_index, "best": best, "metrics": metrics})
      schedule.saved()
    latest = checkpoints.latest_round()
    return ("No round finished yet." if latest is None else
            f"Rounds up to {latest} are checkpointed in {checkpoints.directory}; rerunning the "
            "same command resumes from there.")

  round_fn = compile_round(algorithm, config, mesh, shardings)
  gather_round = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
  # Evaluation rounds also measure the local-global gap (gap.py): the round gets the test split.
  measure_gap = gap.make_gap_evaluator(algorithm, data, eval_clients, compiler_options(config),
                                       eval_examples)
  evaluate = evaluation.make_evaluator(algorithm, data, eval_clients, mesh,
                                       compiler_options(config), eval_examples)
  if algorithm.merging_weights is not None:
    merging_weights = all_merging_weights(algorithm, data, eval_clients, mesh)
  down, up = algorithm.communication
  if main_process:
    jsonl = metric_writers.JsonlWriter(workdir, start_round)
    tensorboard = metric_writers.TensorBoardWriter(workdir, start_round) if config.tensorboard else None
  bar = progress_lib.Progress(config.num_rounds, start_round, enabled=main_process)
  start = last_time = time.perf_counter()
  last_round = start_round
  r = start_round
  stops = preemption.StopRequests().install()
  try:
    for r in range(start_round + 1, config.num_rounds + 1):
      signal_name = stops.stop_before(r)
      if signal_name:  # A scheduler asked to stop: save the finished rounds, wait, say so.
        save(done)
        if checkpoints:
          checkpoints.wait()
        raise preemption.Stopped(signal_name, stops.signal_number, stopped_saying(checkpoints))
      ids = sample_clients(jax.random.fold_in(sample_rng, r), data.num_clients,
                           config.clients_per_round)
      evaluating = r % config.eval_every == 0 or r == config.num_rounds
      ids, sharded_ids, batch = gather_round(ids, data.test if evaluating else None)
      state, round_metrics = round_fn(state, sharded_ids, batch, jax.random.fold_in(round_rng, r))
      if not bool(round_metrics["finite"]):
        where = save(r - 1)
        if 0 < start_round == r - 1:  # Resumed from round r - 1 and failed at once.
          where += (f" Resuming cannot help: the saved round {start_round} itself leads to a "
                    "non-finite loss; start over with a new --workdir.")
        raise FloatingPointError(non_finite_message(round_metrics, r, ids, where))
      state_round = r
      bar.advance()
      if evaluating:
        now = time.perf_counter()
        metrics = {"round": r}
        metrics.update({k: float(v) for k, v in round_metrics.items() if k.startswith("train/")})
        evaluated = evaluate(state)
        per_client = {k: evaluated.pop(k) for k in list(evaluated) if k.startswith("clients/")}
        metrics.update(evaluated)
        gap_scalars, gap_clients = measure_gap(state, ids, round_metrics)
        metrics.update(gap_scalars)
        per_client.update(gap_clients)
        weights = None
        if algorithm.merging_weights is not None:
          weights = merging_weights(state)
          if data.groups is not None:
            metrics["groups/ari"] = plot.dominant_model_ari(weights, data.groups)
        metrics.update({"comm/params_down_per_client": down, "comm/params_up_per_client": up,
                        "comm/params_per_round": len(ids) * (down + up)})
        metrics["rounds_per_s"] = (r - last_round) / (now - last_time)
        best = best_by_validation(metrics, best)
        if main_process:
          jsonl.write(metrics)
          if tensorboard:
            tensorboard.write(r, metrics, per_client, weights)
          metric_writers.write_clients_npz(workdir, r, data.client_ids, per_client, weights,
                                           data.groups)
        bar.show(metrics)
        bar.print(format_metrics(metrics))
        last_time, last_round = time.perf_counter(), r
      done = r
      if checkpoints and schedule.due(r):
        save(r)
  except BaseException as e:
    where = save(done)
    if is_out_of_memory(e):
      raise OutOfMemoryError(out_of_memory_message(config, r, len(ids), where)) from e
    raise
  finally:
    stops.uninstall()
    bar.close()
    if checkpoints:
      checkpoints.close()
    if main_process and tensorboard:
      tensorboard.close()
  if start_round == config.num_rounds:
    logging.info("All %d rounds were already done in %s.", config.num_rounds, workdir)
  summary = dict(metrics)
  summary.update(best or {})
  summary["wall_time_s"] = time.perf_counter() - start
  if main_process:
    metric_writers.write_atomically(os.path.join(workdir, "summary.json"),
                                    lambda f: f.write(json.dumps(summary, indent=2).encode()))
    plot.write_plots(workdir)
  return summary
