"""A run's saved state, both ways: restore-or-initialise at the start, save after rounds.

The workdir is claimed first (another experiment's is refused, `experiment.json` and
`config.json` recorded); the state is then the newest checkpoint's, or a fresh one. Saved
state is cut to the real clients (no phantom rows), so checkpoints do not depend on the
device count; restoring pads the phantoms back.
"""

import json
import os
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import fingerprint as fingerprint_lib
from fedmerge_jax import metric_writers
from fedmerge_jax import parallel
from fedmerge_jax import plot


def stopped_saying(checkpoints) -> str:
  """The end of the line a stop request prints: which rounds are safe, and what to do."""
  latest = checkpoints.latest_round() if checkpoints else None
  if latest is None:
    return "no round is saved (checkpoints are off or none finished yet); rerun to start again."
  return f"rounds up to {latest} are saved in {checkpoints.directory}; rerun to resume."


def claim_workdir(config, workdir: str, start_over: bool, main_process: bool) -> None:
  """Before any work: `start_over` empties `workdir` of a previous run; otherwise a workdir
  holding another experiment's config stops here (ExperimentMismatch), data not yet loaded."""
  os.makedirs(workdir, exist_ok=True)
  if start_over:
    if main_process:
      fingerprint_lib.start_over(workdir)
    return
  fingerprint_lib.check(workdir, {"config": fingerprint_lib.config_fingerprint(config)})


def record_experiment(
  config, workdir: str, data, model, start_over: bool, main_process: bool, ran=None
) -> None:
  """Checks the data and model against what `workdir` holds, then records config and all;
  config.json's `ran` (plot.RAN) names the data and model that ran (`plot.what_ran`)."""
  current = fingerprint_lib.fingerprint(config, data, model)
  if not start_over:  # (Starting over, other processes may still see the old record.)
    fingerprint_lib.check(workdir, current)
  if main_process:  # experiment.json first: a config.json with `ran` is never read as the record.
    metric_writers.write_atomically(
      os.path.join(workdir, fingerprint_lib.FILE),
      lambda f: f.write(json.dumps(current, indent=1).encode()),
    )
    recorded = dict(json.loads(config.to_json()), **{plot.RAN: ran or {}})
    metric_writers.write_atomically(
      os.path.join(workdir, "config.json"),
      lambda f: f.write(json.dumps(recorded, indent=2).encode()),
    )


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
    return leaf[: layout.num_clients]

  return jax.tree.map(cut, state)


def with_phantoms(saved, state, shardings, layout: parallel.ClientLayout):
  """The inverse: restored real-client rows, then `state`'s phantom rows, laid out again."""
  if layout.population == layout.num_clients:
    return saved

  def pad(restored, fresh, sharding):
    if not parallel.is_per_client(fresh, layout.population):
      return restored
    concatenate = lambda real, all_rows: jnp.concatenate([real, all_rows[layout.num_clients :]])
    return jax.jit(concatenate, out_shardings=sharding)(restored, fresh)

  return jax.tree.map(pad, saved, state, shardings)


class Start(NamedTuple):
  """Where a run starts: after `round` (0: fresh), with its state, keys and reports so far."""

  round: int
  state: Any
  shardings: Any
  rng_data: np.ndarray  # [2] key data: client sampling's, rounds'; host arrays (multi-host).
  best: Optional[dict]
  metrics: dict


def alive(tree) -> bool:
  """False once any array of `tree` was donated to (consumed by) a jitted call."""
  return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


class Checkpointing:
  """The run's checkpoints: `restore_or_initialise` once, then `save` after rounds.

  Off (`checkpoints` None) where config.checkpoint_every and checkpoint_every_minutes are 0.
  """

  def __init__(self, config, workdir: str, layout: parallel.ClientLayout):
    self.schedule = checkpoint_lib.Schedule(
      config.checkpoint_every, config.checkpoint_every_minutes, config.num_rounds
    )
    self.checkpoints = (
      checkpoint_lib.Checkpoints(workdir, config.checkpoint_keep) if self.schedule.enabled else None
    )
    self.layout, self.seed = layout, config.seed
    self.start_round, self.rng_data = 0, None

  def restore_or_initialise(
    self, init: Callable[[Any], Any], mesh, is_finite: Callable[[Any], Any], init_values=None
  ) -> Start:
    """The newest checkpoint's state (phantoms padded back) or, with none, a fresh one.

    `is_finite(tree)`: the NaN guard's check; a checkpoint that fails it raises
    FloatingPointError (resuming it cannot help). `init`: the algorithm's init, of a key
    or, with `init_values`, of (key, init_values) (a replica's hyper-parameter values, replicas.py).
    """
    layout, checkpoints = self.layout, self.checkpoints
    init_rng, *rngs = jax.random.split(jax.random.key(self.seed), 3)
    self.rng_data = np.asarray(jax.random.key_data(jnp.stack(rngs)))  # Host: multi-host safe.
    init_arg = init_rng if init_values is None else (init_rng, init_values)
    state, shardings = parallel.sharded_init(init, mesh, layout.population, init_arg)
    restored = checkpoints and checkpoints.restore_latest(
      {"algorithm": without_phantoms(state, layout, for_restore=True), "rngs": self.rng_data}
    )
    if not restored:
      return Start(0, state, shardings, self.rng_data, None, {})
    done, saved, progress = restored
    if not bool(is_finite(saved["algorithm"])):
      raise FloatingPointError(
        f"The checkpoint of round {done} in {checkpoints.directory} holds non-finite values; "
        "resuming cannot help: start over with a new --workdir."
      )
    logging.info("Resuming from the checkpoint of round %d in %s.", done, checkpoints.directory)
    self.start_round, self.rng_data = done, saved["rngs"]
    return Start(
      done,
      with_phantoms(saved["algorithm"], state, shardings, layout),
      shardings,
      self.rng_data,
      progress["best"],
      progress["metrics"],
    )

  def save(self, round_index: int, state_round: Optional[int], state, progress) -> str:
    """Checkpoints `state` as the state after `round_index`; says where, for messages.

    Only a state known to be that round's (`state_round`, None where unknown), whose
    outputs are all written, is saved (interrupted in an evaluation, the round is redone on
    resume, its metrics line written once). `progress()`: (best, metrics) so far."""
    checkpoints = self.checkpoints
    if checkpoints is None:
      return "Checkpoints are off (config.checkpoint_every=0)."
    if self.start_round < round_index == state_round and alive(state):
      best, metrics = progress()
      checkpoints.save(
        round_index,
        {"algorithm": without_phantoms(state, self.layout), "rngs": self.rng_data},
        {"round": round_index, "best": best, "metrics": metrics},
      )
      self.schedule.saved()
    latest = checkpoints.latest_round()
    return (
      "No round finished yet."
      if latest is None
      else f"Rounds up to {latest} are checkpointed in {checkpoints.directory}; rerunning the "
      "same command resumes from there."
    )

  def due(self, round_index: int) -> bool:
    return bool(self.checkpoints) and self.schedule.due(round_index)

  def stopped_saying(self) -> str:
    return stopped_saying(self.checkpoints)

  def wait(self) -> None:
    if self.checkpoints:
      self.checkpoints.wait()

  def close(self) -> None:
    if self.checkpoints:
      self.checkpoints.close()
