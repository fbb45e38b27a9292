"""Kill-and-resume soak: a run is killed again and again, resumed each time, and must end
equal to an uninterrupted run (metrics.jsonl, summary.json, TensorBoard scalars, clients.npz,
the final checkpoint), exactly, on CPU.

  python -m fedmerge_jax.soak --config=configs/default.py --kills=20 --seed=0 \\
      --workdir=/tmp/soak [--timed] [--config.num_rounds=60 ...]

Each kill is (signal, moment): SIGKILL, SIGTERM, SIGINT or SIGUSR1, during the k-th round,
evaluation or checkpoint write of that session (hooked into the child: exact and
repeatable from --seed), or with --timed after a random time (any moment: start-up,
compilation, data loading included). Once the run has finished no more kills are drawn;
a signal the child sent whose run still finished was lost: a difference. The children take
SIGINT as Ctrl-C does even when the soak runs in a background job (which ignores SIGINT).
The last line says how many kills the run survived and what differed.
"""

import dataclasses
import glob
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedmerge_jax import metric_writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("rounds_per_s", "wall_time_s")  # Differ between any two runs.
PHASES = ("round", "evaluate", "checkpoint")
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGUSR1")

SENT = "soak: sending"  # The child's line when its hook sends the signal.

# Runs launch.py; first sends `signal` to itself during the `at`-th `phase` of this session.
# SIGINT raises KeyboardInterrupt as Ctrl-C does in a terminal, even where the soak was started
# by a background job: its shell set SIGINT to SIG_IGN, every child inherits that, and Python
# then installs no handler (a SIGINT sent would be lost and the run would simply finish).
CHILD = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["launch.py", *{args!r}]
kill, phase, at = {kill!r}
if kill:
  from fedmerge_jax import checkpoint, train
  calls = [0]
  def hooked(original):
    def call(*args, **kwargs):
      result = original(*args, **kwargs) if phase == "checkpoint" else None
      calls[0] += 1
      if calls[0] == at:
        print({sent!r}, kill, "during", phase, at, file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, kill))  # A handler, if any, runs here.
      return result if phase == "checkpoint" else original(*args, **kwargs)
    return call
  if phase == "round":  # While the round is computed (before its result exists).
    compile_round = train.compile_round
    train.compile_round = lambda *a: hooked(compile_round(*a))
  elif phase == "evaluate":
    make_evaluator = train.evaluation.make_evaluator
    train.evaluation.make_evaluator = lambda *a: hooked(make_evaluator(*a))
  else:  # Right after orbax started writing in the background: mid-write.
    checkpoint.Checkpoints.save = hooked(checkpoint.Checkpoints.save)
runpy.run_path({launch!r}, run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class Kill:
  signal: str
  phase: str  # One of PHASES, or 'timed'.
  at: float  # The phase's k-th call of the session, or seconds after the start ('timed').

  def __str__(self):
    if self.phase == "timed":
      return f"{self.signal} after {self.at:.1f} s"
    return f"{self.signal} during {self.phase} {int(self.at)} of the session"


def schedule(seed: int, kills: int, timed: bool = False, max_seconds: float = 30.0) -> List[Kill]:
  """`kills` kill moments drawn from `seed`: every signal and phase, in a random order."""
  rng = random.Random(seed)
  if timed:
    return [Kill(rng.choice(SIGNALS), "timed", rng.uniform(1.0, max_seconds)) for _ in range(kills)]
  return [Kill(rng.choice(SIGNALS), rng.choice(PHASES), rng.randint(1, 3)) for _ in range(kills)]


def launch_args(config: str, workdir: str, overrides: Sequence[str]) -> List[str]:
  return [f"--config={config}", f"--workdir={workdir}", *overrides]


def run_child(args: Sequence[str], kill: Optional[Kill], timeout: float = 600):
  """Runs launch.py with `args`, killed as `kill` says; (exit status, stderr)."""
  hook = (
    (kill.signal, kill.phase, int(kill.at))
    if kill and kill.phase != "timed"
    else (None, None, None)
  )
  script = CHILD.format(
    args=list(args), kill=hook, sent=SENT, launch=os.path.join(ROOT, "launch.py")
  )
  child = subprocess.Popen(
    [sys.executable, "-c", script],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  if kill and kill.phase == "timed":
    try:
      child.wait(kill.at)
    except subprocess.TimeoutExpired:
      child.send_signal(getattr(signal, kill.signal))
  _, stderr = child.communicate(timeout=timeout)
  return child.returncode, stderr


def read_scalars(workdir: str) -> Dict[Tuple[str, int], float]:
  """TensorBoard scalars as TensorBoard shows them: event files read in order, a session's
  purge step (SessionLog START) hiding what earlier sessions wrote from that step on, a
  torn last record ignored. A (tag, step) seen twice is an error."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  scalars: Dict[Tuple[str, int], float] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    seen_here = set()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      if offset + 12 + length + 4 > len(data):
        break  # Torn: the writer died mid-record.
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
      for value in event.summary.value:
        if value.HasField("simple_value"):
          key = (value.tag, event.step)
          if key in scalars and key in seen_here:
            raise AssertionError(f"{path}: scalar {key} written twice")
          seen_here.add(key)
          scalars[key] = value.simple_value
  return scalars


def _final_state(workdir: str):
  """The last checkpoint's arrays (no target needed: restored as NumPy)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  import jax  # pylint: disable=import-outside-toplevel

  return step, jax.tree_util.tree_flatten_with_path(restored["state"])[0]


def same(a, b) -> bool:
  """Equal arrays, shapes and dtypes; NaN equals NaN (a client without a split's examples)."""
  a, b = np.asarray(a), np.asarray(b)
  if a.dtype != b.dtype or a.shape != b.shape:
    return False
  return bool(np.array_equal(a, b, equal_nan=np.issubdtype(a.dtype, np.inexact)))


def compare_runs(workdir: str, reference: str) -> List[str]:
  """What differs between a soaked run and the uninterrupted one (empty: nothing)."""
  found = []
  drop = lambda d: {k: v for k, v in d.items() if k not in TIMING}
  lines = [drop(m) for m in metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  expected = [drop(m) for m in metric_writers.read_jsonl(os.path.join(reference, "metrics.jsonl"))]
  if lines != expected:
    found.append(
      f"metrics.jsonl: rounds {[m['round'] for m in lines]} vs {[m['round'] for m in expected]}"
      if len(lines) != len(expected)
      else "metrics.jsonl: values differ"
    )
  raw = open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8").read()
  if raw and not raw.endswith("\n"):
    found.append("metrics.jsonl: a partial last line")
  summaries = []
  for folder in (workdir, reference):
    path = os.path.join(folder, "summary.json")
    summaries.append(drop(json.load(open(path))) if os.path.exists(path) else None)
  if summaries[0] != summaries[1]:
    found.append("summary.json differs")
  if os.path.exists(os.path.join(reference, "clients.npz")):
    got, want = (np.load(os.path.join(d, "clients.npz")) for d in (workdir, reference))
    if set(got) != set(want) or any(not same(got[k], want[k]) for k in want):
      found.append("clients.npz differs")
  try:
    scalars, expected_scalars = (
      {k: v for k, v in read_scalars(d).items() if k[0] not in TIMING} for d in (workdir, reference)
    )
    if scalars != expected_scalars:
      found.append(f"TensorBoard scalars differ ({len(scalars)} vs {len(expected_scalars)})")
  except AssertionError as e:
    found.append(str(e))
  (step, leaves), (want_step, want_leaves) = _final_state(workdir), _final_state(reference)
  if (
    step != want_step
    or len(leaves) != len(want_leaves)
    or any(not same(a, b) for (_, a), (_, b) in zip(leaves, want_leaves))
  ):
    found.append(f"final state differs (checkpoint {step} vs {want_step})")
  return found


def expected_statuses(kill: Kill) -> Tuple[int, ...]:
  """The exit statuses of a run that `kill` stopped as it should: 128 + the signal from our
  one-line stop, or death by the signal (SIGKILL; any signal before the handlers exist)."""
  number = getattr(signal, kill.signal)
  return (-number,) if number == signal.SIGKILL else (128 + number, -number)


def soak(
  args: Sequence[str], kills: Sequence[Kill], reference: str, log=print, finish=None
) -> Dict:
  """Kills the run `args` names once per `kills`, resumes it each time, finishes it and
  compares with `reference` (a finished uninterrupted run). Returns the figures.

  A session that ends with the run finished stops the schedule: `drawn` says how many kills
  were. Where its kill never came (the session had fewer such moments; a timed kill after
  the run's end) that kill is not drawn; where the child said it sent the signal
  (`SENT`), the signal was lost: a difference. A session that ended otherwise than `kill`
  should (a crash, a FATAL line) is a difference too. `finish()`, if given, does the last
  resume instead of a fresh launch.py (a test's shortcut: the same train_and_evaluate, in
  this process)."""
  statuses, differences, finished, late = [], [], False, False
  for i, kill in enumerate(kills):
    status, stderr = run_child(args, kill)
    last = (stderr.strip().splitlines() or [""])[-1]
    statuses.append((str(kill), status, last))
    log(f"kill {i + 1}/{len(kills)}: {kill}: exit status {status}: {last[:160]}")
    if status == 0:
      finished, late = True, SENT not in stderr
      if not late:
        differences.append(f"kill {i + 1} ({kill}): sent, yet the run finished (exit status 0)")
      when = "before this kill came" if late else "although this kill was sent (lost)"
      log(f"  the run finished {when}; the remaining {len(kills) - i - 1} are not drawn")
      break
    if status not in expected_statuses(kill):
      differences.append(f"kill {i + 1} ({kill}): exit status {status}: {last[:300]}")
  if not finished and finish is not None:  # (Finished: its last session was the final resume.)
    finish()
  elif not finished:
    status, stderr = run_child(args, None)
    if status != 0:
      raise RuntimeError(f"the final resume failed (exit status {status}):\n{stderr[-3000:]}")
  differences += compare_runs(_workdir_of(args), reference)
  survived = sum(1 for (_, s, _), kill in zip(statuses, kills) if s in expected_statuses(kill))
  return {
    "kills": len(kills),
    "drawn": len(statuses) - late,
    "survived": survived,
    "statuses": statuses,
    "differences": differences,
  }


def _workdir_of(args: Sequence[str]) -> str:
  return next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))


def summary_line(figures: Dict, seconds: float) -> str:
  """The soak's last line: kills survived, whether the run outlasted the schedule, what differed."""
  ended = (
    f"the run finished after {figures['drawn']} of {figures['kills']} kills"
    if figures["drawn"] < figures["kills"]
    else f"all {figures['kills']} kills drawn"
  )
  return (
    f"survived {figures['survived']} of {figures['drawn']} kills ({ended}); differences: "
    f"{'; '.join(figures['differences']) or 'none'} ({seconds:.0f} s)"
  )


def main(argv: Sequence[str]) -> int:
  import argparse  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--workdir", default="/tmp/fedmerge_soak")
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--timed",
    action="store_true",
    help="Kill after random times (any moment) instead of at hooked moments.",
  )
  parser.add_argument(
    "--max_seconds",
    type=float,
    default=30.0,
    help="--timed: kills come 1 to this many seconds after each start.",
  )
  known, overrides = parser.parse_known_args(argv)
  if os.path.exists(known.workdir):
    sys.exit(f"FATAL --workdir={known.workdir} exists; give a new folder (the soak fills it).")
  reference = os.path.join(known.workdir, "uninterrupted")
  started = time.perf_counter()
  status, stderr = run_child(launch_args(known.config, reference, overrides), None)
  if status != 0:
    sys.exit(
      f"FATAL the uninterrupted run failed (exit status {status}): "
      f"{stderr.strip().splitlines()[-1:]}"
    )
  kills = schedule(known.seed, known.kills, known.timed, known.max_seconds)
  figures = soak(
    launch_args(known.config, os.path.join(known.workdir, "killed"), overrides), kills, reference
  )
  print(summary_line(figures, time.perf_counter() - started))
  return 1 if figures["differences"] else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
