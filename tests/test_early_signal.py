"""A stop signal before the round loop (data loading, initialisation) stops the run at once
with one line and the conventional exit status, keeping what earlier sessions saved."""

import os
import runpy
import signal
import subprocess
import sys
import time

import pytest

from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import preemption
from fedmerge_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  "num_rounds": 1,
  "eval_every": 1,
  "checkpoint_every": 1,
  "tensorboard": False,
  "model.hidden_sizes": (8,),
  "data.num_clients": 6,
  "clients_per_round": 3,
}

# launch.py in a fresh interpreter whose `target` (module, function) first writes `marker`,
# then sleeps: the test signals it there.
SLOW_CHILD = """
import importlib, os, runpy, sys, time
sys.argv = ["launch.py", *{args!r}]
module, name = {target!r}
module = importlib.import_module(module)
original = getattr(module, name)
def slow(*args, **kwargs):
  open({marker!r}, "w").close()
  time.sleep(120)
  return original(*args, **kwargs)
setattr(module, name, slow)
runpy.run_path("launch.py", run_name="__main__")
"""


def signalled_launch(tmp_path, workdir, target, number, **changes):
  """(exit status, stderr) of launch.py signalled with `number` inside `target`."""
  marker = str(tmp_path / "entered")
  args = ["--config=configs/default.py", f"--workdir={workdir}"] + [
    f"--config.{k}={v}".replace(" ", "") for k, v in {**OVERRIDES, **changes}.items()
  ]
  child = subprocess.Popen(
    [sys.executable, "-c", SLOW_CHILD.format(args=args, target=target, marker=marker)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 240
  while not os.path.exists(marker) and child.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  child.send_signal(number)
  _, stderr = child.communicate(timeout=120)
  return child.returncode, stderr


def last_line(stderr):
  """The run's last line; no traceback before it."""
  assert "Traceback" not in stderr, stderr
  return stderr.strip().splitlines()[-1]


def test_sigterm_while_loading_data_stops_at_once_saying_nothing_is_saved(tmp_path):
  workdir = tmp_path / "run"
  status, stderr = signalled_launch(
    tmp_path, workdir, ("fedmerge_jax.data", "load"), signal.SIGTERM
  )
  assert last_line(stderr) == (
    "stopped by SIGTERM before round 1; nothing saved yet; rerun to start."
  )
  assert status == 128 + signal.SIGTERM
  assert checkpoint_lib.saved_rounds(str(workdir)) == []


def test_sigusr1_while_a_resumed_run_initialises_keeps_the_saved_rounds(tmp_path):
  workdir = str(tmp_path / "run")
  config = runpy.run_path(os.path.join(ROOT, "configs/default.py"))["get_config"]()
  config.update_from_flattened_dict(OVERRIDES)
  train.train_and_evaluate(config, workdir)  # Round 1 saved; the signalled run wants 3.
  before = {
    name: open(os.path.join(workdir, name), "rb").read()
    for name in ("metrics.jsonl", "experiment.json", "summary.json")
  }
  status, stderr = signalled_launch(
    tmp_path, workdir, ("fedmerge_jax.parallel", "sharded_init"), signal.SIGUSR1, num_rounds=3
  )
  assert last_line(stderr) == (
    f"stopped by SIGUSR1 before round 2; rounds up to 1 are saved "
    f"in {workdir}/checkpoints; rerun to resume."
  )
  assert status == 128 + signal.SIGUSR1
  assert checkpoint_lib.saved_rounds(workdir) == [1]
  assert before == {name: open(os.path.join(workdir, name), "rb").read() for name in before}


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_at_once_raises_in_one_process_and_restores_the_handler(number):
  previous = signal.getsignal(number)
  with pytest.raises(preemption.StoppedAtOnce) as info:
    with preemption.StopAtOnce(process_count=1):
      signal.raise_signal(number)
      time.sleep(5)  # Not reached: the handler raises while Python runs.
  assert info.value.signal_name == signal.Signals(number).name
  assert info.value.exit_status == 128 + number
  assert signal.getsignal(number) == previous


def test_stop_at_once_with_several_processes_leaves_the_stop_to_the_sync_point(monkeypatch):
  sent = []
  monkeypatch.setattr(preemption.os, "kill", lambda pid, number: sent.append(number))
  with preemption.StopAtOnce(process_count=2, sync_point=lambda r: True) as stops:
    signal.raise_signal(signal.SIGUSR1)  # Recorded and forwarded to JAX's notifier only.
  assert sent == [signal.SIGTERM] and stops.stop_before(1) == "SIGUSR1"
