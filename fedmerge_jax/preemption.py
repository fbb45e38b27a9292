"""Stop requests from schedulers: SIGTERM and SIGUSR1 end a run at a round boundary.

Cloud TPU spot VMs, Kubernetes and SLURM (`--signal`) send one of these and give seconds
to save. A handler only records the signal; the round loop asks `StopRequests.stop_before`
between rounds, so the round in progress finishes, is checkpointed, and the run raises
`Stopped`, which `launch.py` turns into one line and the exit status 128 + the signal.
Before the round loop (data loading, initialisation, compilation) there is no round to
finish: `StopAtOnce`, installed by the mains around the run, stops it where it is
(`StoppedAtOnce`); what earlier sessions saved stays as it was.

With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
catches SIGTERM on any host and agrees on one round after which every process stops:
`multihost_utils.reached_preemption_sync_point`. There SIGUSR1 is forwarded to it as a
SIGTERM, so both signals stop every process after the same round.
"""

import os
import signal
import threading
from typing import Callable, Optional

import jax

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
  """The run stopped on request after a saved round; `str()` is the line a user sees."""

  def __init__(self, signal_name: str, signal_number: int, saved: str):
    super().__init__(f"stopped by {signal_name}; {saved}")
    self.signal_name = signal_name
    self.exit_status = 128 + signal_number  # The shell's convention for a death by signal.


def multihost_sync_point(round_index: int) -> bool:
  """JAX's preemption sync point: True on every process at the same round once any was
  told to stop. Called once per round by every process, rounds increasing."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return multihost_utils.reached_preemption_sync_point(round_index)


class StopRequests:
  """Records SIGTERM/SIGUSR1 and says, between rounds, whether to stop.

  `stop_before(r)` is asked before round r starts (r - 1 rounds done): the signal name
  if the run must stop there, else None. Handlers are installed only in the main thread
  (Python allows no other) and restored on exit.
  """

  def __init__(
    self,
    process_count: Optional[int] = None,
    sync_point: Callable[[int], bool] = multihost_sync_point,
  ):
    self.multihost = (jax.process_count() if process_count is None else process_count) > 1
    self._sync_point = sync_point
    self.received: Optional[int] = None
    self._previous = {}

  def _record(self, number, frame):  # pylint: disable=unused-argument
    self.received = self.received or number
    if self.multihost:  # JAX's preemption notifier listens for SIGTERM only.
      os.kill(os.getpid(), signal.SIGTERM)

  def install(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      # Several processes: SIGTERM belongs to JAX's preemption notifier; only SIGUSR1 is ours.
      for number in (signal.SIGUSR1,) if self.multihost else SIGNALS:
        self._previous[number] = signal.signal(number, self._record)
    return self

  def uninstall(self) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous.clear()

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()
    return False

  def stop_before(self, round_index: int) -> Optional[str]:
    """The signal's name if the run stops before `round_index` (every process alike)."""
    if self.multihost:
      if not self._sync_point(round_index - 1):
        return None
      return signal.Signals(self.received or signal.SIGTERM).name
    return None if self.received is None else signal.Signals(self.received).name

  @property
  def signal_number(self) -> int:
    return int(self.received or signal.SIGTERM)


class StoppedAtOnce(BaseException):
  """A stop signal outside the round loop. A BaseException, as KeyboardInterrupt is, so that
  no library's `except Exception` swallows it while it unwinds data loading or compilation."""

  def __init__(self, number: int):
    super().__init__(signal.Signals(number).name)
    self.signal_name = signal.Signals(number).name
    self.exit_status = 128 + number


class StopAtOnce(StopRequests):
  """SIGTERM/SIGUSR1 outside the round loop (which installs its own StopRequests over this):
  raises StoppedAtOnce at once in a single process. With several processes it only records
  and forwards, as StopRequests does, so that the first round's sync point stops them all."""

  def _record(self, number, frame):
    first = self.received is None
    super()._record(number, frame)
    if first and not self.multihost:  # A second signal while unwinding changes nothing.
      raise StoppedAtOnce(number)
