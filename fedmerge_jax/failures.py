"""Every way a run stops early, in one place: a non-finite round, out of memory, a stop
request (SIGTERM/SIGUSR1, preemption.py), Ctrl-C or any other error.

`Guard` wraps the round loop: each stops with the finished rounds checkpointed and one
message that names the problem and the fix; `reporting_run_failures` turns those into one
line and an exit status for the command-line mains.
"""

import os
import sys

import jax
import numpy as np

from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import cli
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import preemption


class OutOfMemoryError(MemoryError):
  """A round or an evaluation that did not fit in memory, with what to change."""


def non_finite_message(round_metrics, round_index: int, client_ids, saved: str) -> str:
  losses = np.asarray(round_metrics["clients/train_loss"])[: len(client_ids)]
  bad = np.asarray(client_ids)[~np.isfinite(losses)].tolist()
  where = f"for clients {bad}" if bad else "in the updated model (the losses were finite)"
  return (
    f"Non-finite training loss at round {round_index} {where}. {saved} Lower "
    "config.client_lr, or check those clients' data."
  )


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return isinstance(error, MemoryError) or (
    isinstance(error, jax.errors.JaxRuntimeError)
    and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)
  )


def out_of_memory_message(config, round_index: int, clients: int, saved: str) -> str:
  at_once = config.client_chunk_size or clients
  return (
    f"Out of memory at round {round_index} with {at_once} clients on the device at once. "
    f"Set --config.client_chunk_size={max(1, at_once // 4)} (clients are then trained "
    f"and evaluated that many at a time; results are identical). {saved}"
  )


class Guard:
  """The round loop's failure handling (a context manager around it).

  `rounds`: rounds.Rounds (the state, its round, the unread finite flags); `checkpointing`:
  restore.Checkpointing; `progress()`: (best, metrics) so far, for checkpoints. Per round:
  `stop_if_asked(r)` before it, `check(failure)` on what `Rounds` reports, `round_done(r)`
  once its outputs are written (it checkpoints when due).
  """

  def __init__(self, config, rounds, checkpointing, progress):
    self.config, self.rounds, self.checkpointing, self.progress = (
      config,
      rounds,
      checkpointing,
      progress,
    )
    self.done = self.round = checkpointing.start_round  # done: rounds whose outputs are written.
    self.stops = preemption.StopRequests()

  def __enter__(self) -> "Guard":
    self.stops.install()
    return self

  def save(self, round_index: int) -> str:
    """Checkpoints the state as that of `round_index` where it is; says what is saved."""
    return self.checkpointing.save(
      round_index, self.rounds.known_good(), self.rounds.state, self.progress
    )

  def check(self, failure) -> None:
    """A round found non-finite stops the run: the round before it saved, FloatingPointError."""
    if failure is None:
      return
    where = self.save(failure.round - 1)
    start_round = self.checkpointing.start_round
    if 0 < start_round == failure.round - 1:  # Resumed from the round before and failed at once.
      where += (
        f" Resuming cannot help: the saved round {start_round} itself leads to a "
        "non-finite loss; start over with a new --workdir."
      )
    raise FloatingPointError(non_finite_message(failure.metrics, failure.round, failure.ids, where))

  def stop_if_asked(self, round_index: int) -> None:
    """Before round `round_index`: a scheduler's stop request saves the finished rounds,
    waits for the write and raises preemption.Stopped."""
    self.round = round_index
    signal_name = self.stops.stop_before(round_index)
    if signal_name:
      self.check(self.rounds.confirm())
      self.save(self.done)
      self.checkpointing.wait()
      raise preemption.Stopped(
        signal_name, self.stops.signal_number, self.checkpointing.stopped_saying()
      )

  def round_done(self, round_index: int) -> None:
    """Round `round_index`'s outputs are written; checkpointed if due (flags read first)."""
    self.done = round_index
    if self.checkpointing.due(round_index):
      self.check(self.rounds.confirm())
      self.save(round_index)

  def __exit__(self, kind, error, traceback) -> bool:
    try:
      if error is not None:
        self._settle()
        where = self.save(self.done)
        if is_out_of_memory(error):
          raise OutOfMemoryError(
            out_of_memory_message(
              self.config, self.round, self.checkpointing.layout.num_sampled, where
            )
          ) from error
    finally:
      self.stops.uninstall()
      self.checkpointing.close()
    return False

  def _settle(self) -> None:
    """After an error: reads the unread flags where the devices still answer (where they do
    not, the state stays unknown and is not saved); a non-finite round found here leaves
    the last good one, which is saved instead."""
    try:
      failure = self.rounds.confirm()
    except Exception:  # pylint: disable=broad-except  (the devices failed: nothing is known)
      return
    if failure is not None:
      self.done = min(self.done, failure.round - 1)


def reporting_run_failures(run, interrupted_line, stopped_line):
  """`run()`'s result; every way a run is expected to stop becomes one line and an exit.

  A stop request (SIGTERM/SIGUSR1) prints `stopped by ...` (from the round loop, or
  `stopped_line(signal_name)` when it came before or after the loop) and exits 128 + the
  signal; Ctrl-C prints `interrupted_line()` and exits 130; a known failure prints its
  message (which names the problem and the fix) after FATAL. Finished rounds are on disk.
  """
  try:
    with preemption.StopAtOnce():  # Data loading and compilation too: stop there at once.
      return run()
  except preemption.Stopped as e:  # Saved; exit as if killed by the signal, as shells expect.
    _exit_now(str(e), e.exit_status)
  except preemption.StoppedAtOnce as e:
    _exit_now(stopped_line(e.signal_name), e.exit_status)
  except KeyboardInterrupt:
    _exit_now(interrupted_line(), 130)
  except (
    config_lib.ConfigError,
    data_lib.DataError,
    FloatingPointError,
    OutOfMemoryError,
    checkpoint_lib.CheckpointError,
    checkpoint_lib.CheckpointWriteError,
  ) as e:
    cli.fatal(f"{type(e).__name__}: {e}")


def _exit_now(line: str, status: int) -> None:
  """Prints `line` and exits at once: everything is on disk (train closed its writers), and
  interpreter shutdown while XLA still compiles on another thread (a stop in the first
  round) can crash."""
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access
