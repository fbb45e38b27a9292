"""Peak host memory per stage of a run: the peak resident set is reset before each stage
(Linux's /proc/self/clear_refs) and read after it, so each stage reports its own peak."""

import contextlib
import resource
from typing import Callable, Dict, Optional

import jax


def _status_kb(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def peak_rss_bytes() -> int:
  """This process's peak resident memory: VmHWM (reset by exec, unlike ru_maxrss, which a
  child inherits from its parent on Linux), else ru_maxrss."""
  kb = _status_kb("VmHWM")
  return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_bytes() -> int:
  """This process's resident memory now (0 where /proc is unavailable)."""
  return (_status_kb("VmRSS") or 0) * 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current resident size; False where the kernel does not allow it
  (then a stage's peak is the peak so far)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_device_bytes() -> Optional[int]:
  """Peak bytes in use on the first device, where the backend reports it (not on CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


class StagePeaks:
  """`with peaks.stage("compile"): ...` records the stage's peak host memory (and the
  resident memory left after it) in `peaks.bytes`: {stage: peak}, `peaks.after`: {stage: rss};
  a stage entered again (one per round) keeps its largest peak. `on_stage(name, peak, after)`,
  if given, is called as each stage ends (a slow run's partial results)."""

  def __init__(self, on_stage: Optional[Callable[[str, int, int], None]] = None):
    self.bytes: Dict[str, int] = {}
    self.after: Dict[str, int] = {}
    self.on_stage = on_stage

  @contextlib.contextmanager
  def stage(self, name: str):
    reset_peak_rss()
    try:
      yield
    finally:
      self.bytes[name] = max(self.bytes.get(name, 0), peak_rss_bytes())
      self.after[name] = rss_bytes()
      if self.on_stage:
        self.on_stage(name, self.bytes[name], self.after[name])
