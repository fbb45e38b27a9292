"""Runs that survive preemption and faults: SIGTERM/SIGUSR1 stops, the multi-host sync
point's logic, time-based checkpoints, failing checkpoint writes, torn files, and a bounded
kill-and-resume soak."""

import errno
import os
import re
import runpy
import signal

import orbax.checkpoint as ocp
import pytest

from conftest import make_federation
from test_checkpoint import fail_at_call, make_config, metric_lines, without_timing
from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import metric_writers
from fedmerge_jax import preemption
from fedmerge_jax import soak
from fedmerge_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**changes):
  """test_checkpoint's config, 10 rounds: evaluations every 2, checkpoints every 5."""
  return make_config(**{"num_rounds": 10, **changes})


def federation():
  """Unequal clients (partial last batches of 4) whose every 3-client round pads to one
  length, 12: each run compiles one round program per kind (evaluating or not), not one per
  padded length."""
  return make_federation(sizes=[3, 5, 9, 10, 11])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The run uninterrupted: what every stopped and resumed one must equal."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  summary = train.train_and_evaluate(config(), workdir, data=federation())
  return summary, metric_lines(workdir)


def signal_at_call(monkeypatch, call, number):
  """The jitted round's `call`-th invocation first receives `number` (as from a scheduler)."""

  def receive(jitted, state, ids, data, rng):
    signal.raise_signal(number)  # The handler only records it: the round still runs.
    return jitted(state, ids, data, rng)

  fail_at_call(monkeypatch, call, receive)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_finishes_the_round_saves_and_resumes_exactly(
  uninterrupted, tmp_path, monkeypatch, number
):
  workdir = str(tmp_path)
  before = signal.getsignal(number)
  signal_at_call(monkeypatch, 7, number)  # Round 7 is in progress, off the checkpoint schedule.
  with pytest.raises(preemption.Stopped) as info:
    train.train_and_evaluate(config(), workdir, data=federation())
  name = signal.Signals(number).name
  assert str(info.value) == (
    f"stopped by {name}; rounds up to 7 are saved in {workdir}/checkpoints; rerun to resume."
  )
  assert info.value.exit_status == 128 + number
  assert checkpoint_lib.saved_rounds(workdir)[-1] == 7
  assert [l["round"] for l in metric_lines(workdir)] == [2, 4, 6]
  assert signal.getsignal(number) == before  # The run's handler is gone with the run.
  if number != signal.SIGTERM:
    return  # The same path from here on; resumed once, for SIGTERM.
  monkeypatch.undo()
  summary = train.train_and_evaluate(config(), workdir, data=federation())
  assert metric_lines(workdir) == uninterrupted[1]
  assert without_timing(summary) == without_timing(uninterrupted[0])


def test_multihost_stops_where_the_preemption_sync_point_says(tmp_path, monkeypatch):
  asked = []

  def sync_point(round_index):  # JAX's: True on every process at one agreed round.
    asked.append(round_index)
    return round_index == 6

  multihost = preemption.StopRequests
  monkeypatch.setattr(
    train.preemption, "StopRequests", lambda: multihost(process_count=2, sync_point=sync_point)
  )
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(preemption.Stopped, match="stopped by SIGTERM; rounds up to 6 are saved"):
    train.train_and_evaluate(config(), str(tmp_path), data=federation())
  assert asked == list(range(7))  # Asked once per round, every round, in order.
  assert checkpoint_lib.saved_rounds(str(tmp_path))[-1] == 6
  assert signal.getsignal(signal.SIGTERM) == before  # SIGTERM stays JAX's notifier's.


def test_multihost_sigusr1_is_forwarded_to_the_preemption_notifier(monkeypatch):
  sent = []
  monkeypatch.setattr(preemption.os, "kill", lambda pid, number: sent.append(number))
  with preemption.StopRequests(process_count=2, sync_point=lambda r: False) as stops:
    assert signal.getsignal(signal.SIGTERM) != stops._record  # JAX's notifier keeps it.
    signal.raise_signal(signal.SIGUSR1)
    assert sent == [signal.SIGTERM] and stops.stop_before(3) is None  # Not agreed yet.


def test_checkpoints_every_so_many_minutes_or_rounds_whichever_first():
  now = [0.0]
  schedule = checkpoint_lib.Schedule(10, 1.5, 100, clock=lambda: now[0])
  assert [r for r in range(1, 25) if schedule.due(r)] == [10, 20]
  now[0] = 89.0
  assert not schedule.due(3)
  now[0] = 90.0
  assert schedule.due(3)
  schedule.saved()
  now[0] = 179.0
  assert not schedule.due(4) and schedule.due(100)  # The last round always.
  minutes_only = checkpoint_lib.Schedule(0, 2.0, 50, clock=lambda: now[0])
  assert minutes_only.enabled and not minutes_only.due(10)
  assert not checkpoint_lib.Schedule(0, 0, 50).enabled


def test_a_checkpoint_by_minutes_is_written_between_round_checkpoints(tmp_path):
  train.train_and_evaluate(
    config(num_rounds=3, checkpoint_every=0, checkpoint_every_minutes=1e-9, checkpoint_keep=5),
    str(tmp_path),
    data=federation(),
  )
  assert checkpoint_lib.saved_rounds(str(tmp_path)) == [1, 2, 3]


@pytest.mark.parametrize(
  "code,when", [(errno.ENOSPC, "at once"), (errno.EACCES, "in the background")]
)
def test_a_failing_checkpoint_write_keeps_the_previous_and_names_folder_and_bytes(
  uninterrupted, tmp_path, monkeypatch, code, when
):
  """Round 10's write fails (a full disk, an unwritable folder): raised by orbax's save, or
  by the next wait as an asynchronous write's failure is."""
  workdir = str(tmp_path)
  failure = OSError(code, os.strerror(code), os.path.join(workdir, "checkpoints", "10"))
  save, wait, pending = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished, []

  def failing_save(self, step, *args, **kwargs):
    if step != 10:
      return save(self, step, *args, **kwargs)
    if when == "at once":
      raise failure
    pending.append(failure)  # Nothing is written; the next wait reports it.

  def waiting(self):
    if pending:
      raise pending.pop()
    return wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", waiting)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as info:
    train.train_and_evaluate(config(), workdir, data=federation())
  message = str(info.value)
  assert message.startswith(
    f"Cannot write the checkpoint of round 10 in {workdir}/checkpoints "
    f"({os.strerror(code)}): a checkpoint needs about "
  )
  needed = int(message.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
  assert 1000 < needed < 10**6  # The state's bytes (K = 3 tiny MLPs, optimiser, logits).
  assert "Kept intact: the checkpoint of round 5, metrics.jsonl and summary.json." in message
  monkeypatch.undo()
  assert checkpoint_lib.saved_rounds(workdir)[-1] == 5  # Restorable: the resume below uses it.
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  lines = metric_lines(workdir)  # Complete lines, each round once.
  assert len(lines) >= 5 and lines == uninterrupted[1][: len(lines)]
  if when != "at once":
    return  # The same resume as below.
  summary = train.train_and_evaluate(config(), workdir, data=federation())
  assert metric_lines(workdir) == uninterrupted[1]
  assert without_timing(summary) == without_timing(uninterrupted[0])


def test_metrics_jsonl_drops_a_torn_line_and_a_failed_write(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 2, "a": 1}\n{"round": 4, "a": 2}\n{"round": 6, "a"')
  assert [m["round"] for m in metric_writers.read_jsonl(str(path))] == [2, 4]
  writer = metric_writers.JsonlWriter(str(tmp_path), resume_round=4)
  assert path.read_text() == '{"round": 2, "a": 1}\n{"round": 4, "a": 2}\n'

  class FullDisk:
    def __init__(self, f):
      self.f = f

    def __getattr__(self, name):
      return getattr(self.f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, data):
      self.f.write(data[:7])  # Part of the line reaches the disk, then it is full.
      raise OSError(errno.ENOSPC, "No space left on device")

  real_open = open
  monkeypatch.setattr("builtins.open", lambda *a, **k: FullDisk(real_open(*a, **k)))
  with pytest.raises(OSError):
    writer.write({"round": 6, "a": 3})
  monkeypatch.undo()
  assert path.read_text() == '{"round": 2, "a": 1}\n{"round": 4, "a": 2}\n'


SOAK_OVERRIDES = {
  "num_rounds": 12,
  "eval_every": 2,
  "checkpoint_every": 4,
  "model.hidden_sizes": (8,),
  "data.num_clients": 6,
  "clients_per_round": 3,
}


@pytest.fixture
def sigint_ignored():
  """SIGINT ignored here, and so in every child, as in a job a script starts in the
  background (`cmd &` in `bash -c`): how the soak's SIGINT was once lost in a CI run."""
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)
  yield
  signal.signal(signal.SIGINT, before)


def test_soak_kills_and_resumes_to_the_uninterrupted_run(tmp_path, sigint_ignored):
  """SIGKILL during a checkpoint write, SIGINT during an evaluation, SIGTERM during a round:
  the resumed run's files and final state equal an uninterrupted run's exactly. Started
  with SIGINT ignored: the soak's child must still take it as Ctrl-C."""
  reference = str(tmp_path / "uninterrupted")
  config = runpy.run_path(os.path.join(ROOT, "configs/default.py"))["get_config"]()
  config.update_from_flattened_dict(SOAK_OVERRIDES)
  train.train_and_evaluate(config, reference)
  flags = [f"--config.{k}={v}".replace(" ", "") for k, v in SOAK_OVERRIDES.items()]
  kills = [
    soak.Kill("SIGKILL", "checkpoint", 2),
    soak.Kill("SIGINT", "evaluate", 1),
    soak.Kill("SIGTERM", "round", 2),
  ]
  workdir = str(tmp_path / "killed")
  figures = soak.soak(
    soak.launch_args("configs/default.py", workdir, flags),
    kills,
    reference,
    log=lambda line: None,
    finish=lambda: train.train_and_evaluate(config, workdir),
  )
  assert figures["drawn"] == 3, figures  # Each kill came before the run's end.
  (_, killed, _), (_, interrupted, ctrl_c), (_, stopped, line) = figures["statuses"]
  assert killed == -signal.SIGKILL
  # Whether the killed write of round 8 finished decides where the next sessions resume.
  assert interrupted == 130 and re.fullmatch(
    r"FATAL interrupted; rounds up to [48] are saved in .*; rerun to resume\.", ctrl_c
  )
  # SIGTERM arrived in the session's 2nd round: that round finishes and is saved.
  assert stopped == 128 + signal.SIGTERM
  assert re.fullmatch(
    f"stopped by SIGTERM; rounds up to (6|10) are saved in {workdir}/"
    "checkpoints; rerun to resume\\.",
    line,
  )
  assert figures["survived"] == 3 and figures["differences"] == []
  scalars = soak.read_scalars(workdir)
  assert sorted(step for tag, step in scalars if tag == "test/acc_mean") == list(range(2, 13, 2))
