"""Orbax checkpoints of a run: state, RNG, round and best-so-far metrics, written atomically.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
run killed mid-write (SIGKILL included) leaves only a temporary folder that restore never
looks at; `restore_latest` also falls back to an older checkpoint if the newest is unreadable,
and refuses (keeping them all) when none is readable, rather than silently starting over.
"""

import contextlib
import errno
import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp


TEMPORARY_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be read: the message says what to do, nothing is deleted."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, no permission): names the folder and size."""


class Schedule:
  """When to checkpoint: every `every_rounds` rounds, every `every_minutes` minutes since
  the last save (whichever comes first; 0 turns either off), and at the last round."""

  def __init__(
    self, every_rounds: int, every_minutes: float, num_rounds: int, clock=time.monotonic
  ):
    self.every_rounds, self.every_minutes, self.num_rounds = every_rounds, every_minutes, num_rounds
    self._clock = clock
    self._last = clock()

  @property
  def enabled(self) -> bool:
    return bool(self.every_rounds or self.every_minutes)

  def due(self, round_index: int) -> bool:
    by_rounds = self.every_rounds and round_index % self.every_rounds == 0
    by_time = self.every_minutes and self._clock() - self._last >= 60 * self.every_minutes
    return bool(round_index == self.num_rounds or by_rounds or by_time)

  def saved(self) -> None:
    self._last = self._clock()


def state_bytes(tree) -> int:
  """The bytes of a pytree's arrays: about what one checkpoint of it takes on disk."""
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


def is_write_failure(error: BaseException) -> bool:
  """A full disk, a missing permission or a read-only file system, anywhere in the causes."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (
      errno.ENOSPC,
      errno.EDQUOT,
      errno.EACCES,
      errno.EPERM,
      errno.EROFS,
    ):
      return True
    error = error.__cause__ or error.__context__
  return False


def saved_rounds(workdir: str) -> list:
  """The rounds with a finished checkpoint in <workdir>/checkpoints, ascending (no orbax)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(
    int(name)
    for name in os.listdir(directory)
    if name.isdigit() and os.path.isdir(os.path.join(directory, name))
  )


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
    self._writing = None  # (round, bytes) of the write in flight, for the failure message.
    self.failed: Optional[CheckpointWriteError] = None

  def save(self, round_index: int, state, progress: Dict[str, Any]) -> None:
    """Starts writing `state` (pytree of arrays) and `progress` (JSON) for `round_index`.

    Asynchronous: the device-to-host copy happens before this returns (so `state` may be
    donated next), the files are written in the background; the next save and `wait`
    wait for them. A failed write raises CheckpointWriteError, here or at the next wait.
    """
    if self.failed or round_index in self._started or round_index in self._manager.all_steps():
      return
    self._started.add(round_index)
    with self._reporting_write_failures():
      self._manager.wait_until_finished()  # The previous write's failure belongs to it.
      self._writing = (round_index, state_bytes(state))
      self._manager.save(
        round_index,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
        ),
        force=True,
      )

  def wait(self) -> None:
    """Blocks until every started write is complete on disk."""
    with self._reporting_write_failures():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _reporting_write_failures(self):
    """A full disk or missing permission becomes CheckpointWriteError, remembered in `failed`."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not is_write_failure(e):
        raise
      round_index, needed = self._writing or (None, 0)
      self.failed = CheckpointWriteError(
        write_failure_message(self.directory, round_index, needed, self.latest_round(), e)
      )
      raise self.failed from e

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
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(like), progress=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
          "Checkpoint %s/%d cannot be restored (%s: %s); trying an older one.",
          self.directory,
          step,
          type(e).__name__,
          e,
        )
        errors.append(f"{step}: {type(e).__name__}")
        continue
      return step, restored["state"], restored["progress"]
    if steps:
      raise CheckpointError(
        f"None of the {len(steps)} checkpoints in {self.directory} can be read "
        f"(round {', round '.join(errors)}); they are kept, and the run did not start over. "
        f"To start over, use a new --workdir (or move {self.directory} away)."
      )
    return None

  def close(self) -> None:
    """Waits for the write in flight and closes; a write failure already raised is not repeated."""
    reported = self.failed is not None
    try:
      self.wait()
    except CheckpointWriteError:
      if not reported:
        raise  # The last write failed in the background: the run must not end as if saved.
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if self.failed is None:
          raise


def write_failure_message(
  directory: str, round_index: Optional[int], needed: int, kept: Optional[int], error: BaseException
) -> str:
  """'Cannot write the checkpoint of round 40 in <dir> (No space left on device) ...'."""
  while not isinstance(error, OSError) and (error.__cause__ or error.__context__):
    error = error.__cause__ or error.__context__
  reason = getattr(error, "strerror", None) or str(error)
  try:
    free = f"; {shutil.disk_usage(directory).free:,} bytes are free there"
  except OSError:
    free = ""
  previous = f"the checkpoint of round {kept}" if kept is not None else "no earlier checkpoint"
  return (
    f"Cannot write the checkpoint of round {round_index} in {directory} ({reason}): a "
    f"checkpoint needs about {needed:,} bytes{free}. Kept intact: {previous}, "
    "metrics.jsonl and summary.json. Free space there or make it writable (or use "
    "another --workdir), then rerun the same command to resume."
  )
