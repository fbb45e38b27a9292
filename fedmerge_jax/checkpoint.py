"""Orbax checkpoints of a run: state, RNG, round and best-so-far metrics, written atomically.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
run killed mid-write (SIGKILL included) leaves only a temporary folder that restore never
looks at; `restore_latest` also falls back to an older checkpoint if the newest is unreadable,
and refuses (keeping them all) when none is readable, rather than silently starting over.
"""

import os
import shutil
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp


TEMPORARY_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be read: the message says what to do, nothing is deleted."""


def saved_rounds(workdir: str) -> list:
  """The rounds with a finished checkpoint in <workdir>/checkpoints, ascending (no orbax)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def remove_torn_writes(directory: str) -> None:
  """Deletes the temporary folders of writes a killed run never finished.

  Done here, before orbax starts, because orbax's own background clean-up races with
  its clean-up of a step's leftover folder when that step is saved again.
  """
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if TEMPORARY_MARK in name:
      logging.warning("Removing %s, a checkpoint whose writing never finished.", name)
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpoints:
  """The checkpoints of one run, in <workdir>/checkpoints/<round>/."""

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    remove_torn_writes(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._started = set()

  def save(self, round_index: int, state, progress: Dict[str, Any]) -> None:
    """Starts writing `state` (pytree of arrays) and `progress` (JSON) for `round_index`.

    The device-to-host copy happens before this returns, so `state` may be donated next.
    """
    if round_index in self._started or round_index in self._manager.all_steps():
      return
    self._started.add(round_index)
    self._manager.save(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)

  def wait(self) -> None:
    """Blocks until every started write is complete on disk."""
    self._manager.wait_until_finished()

  def latest_round(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore_latest(self, like) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """(round, state, progress) of the newest readable checkpoint, or None if there is none.

    `like` is a state with the right structure, shapes, dtypes and shardings (a freshly
    initialised one). An unreadable checkpoint is skipped with a warning; if every one is
    unreadable, CheckpointError (they are kept: a disk may come back, a bug may be fixed).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(like), progress=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint %s/%d cannot be restored (%s: %s); trying an older one.",
                        self.directory, step, type(e).__name__, e)
        errors.append(f"{step}: {type(e).__name__}")
        continue
      return step, restored["state"], restored["progress"]
    if steps:
      raise CheckpointError(
          f"None of the {len(steps)} checkpoints in {self.directory} can be read "
          f"(round {', round '.join(errors)}); they are kept, and the run did not start over. "
          f"To start over, use a new --workdir (or move {self.directory} away).")
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
