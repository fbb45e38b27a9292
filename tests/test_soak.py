"""The soak script's bookkeeping (no runs: the children are scripted): it stops drawing kills
once the run has finished, and counts as survived only kills that stopped the run as they
should."""

import signal

import pytest

from fedmerge_jax import soak

KILLS = [
  soak.Kill("SIGTERM", "round", 1),
  soak.Kill("SIGKILL", "checkpoint", 2),
  soak.Kill("SIGINT", "evaluate", 1),
  soak.Kill("SIGUSR1", "round", 3),
  soak.Kill("SIGKILL", "round", 1),
]
ARGS = soak.launch_args("configs/default.py", "/tmp/soaked", [])


@pytest.fixture
def scripted(monkeypatch):
  """Makes the sessions end with the given (exit status, last line)s; records the kills."""

  def script(*endings):
    ran = []

    def run_child(args, kill):
      ran.append(kill)
      return endings[len(ran) - 1]

    monkeypatch.setattr(soak, "run_child", run_child)
    monkeypatch.setattr(soak, "compare_runs", lambda workdir, reference: [])
    return ran

  return script


def test_no_kill_is_drawn_after_the_run_finished(scripted):
  ran = scripted(
    (143, "stopped by SIGTERM; ..."),
    (-9, ""),
    (130, "FATAL interrupted; ..."),
    (0, "{'test/acc_mean': 0.3}"),
  )
  finished = []
  figures = soak.soak(
    ARGS, KILLS, "/tmp/reference", log=lambda line: None, finish=lambda: finished.append(1)
  )
  assert ran == KILLS[:4]  # The 5th kill is not drawn: the 4th session finished the run.
  assert finished == []  # That session was the final resume.
  assert (figures["drawn"], figures["survived"], figures["differences"]) == (3, 3, [])
  assert soak.summary_line(figures, 12.0) == (
    "survived 3 of 3 kills (the run finished after 3 of 5 kills); differences: none (12 s)"
  )


def test_a_signal_sent_whose_run_still_finished_is_a_lost_signal(scripted):
  """Exit status 0 after the child said it sent the signal: not a late kill but a lost one
  (as when SIGINT was ignored): a difference, and that kill counts as drawn."""
  ran = scripted(
    (-9, ""),
    (0, f"{soak.SENT} SIGINT during evaluate 1\n{{'test/acc_mean': 0.3}}"),
  )
  lines = []
  figures = soak.soak(ARGS, KILLS[1:], "/tmp/reference", log=lines.append, finish=lambda: None)
  assert ran == KILLS[1:3]
  assert figures["differences"] == [
    "kill 2 (SIGINT during evaluate 1 of the session): sent, yet the run finished (exit status 0)"
  ]
  assert (figures["drawn"], figures["survived"]) == (2, 1)
  assert lines[-1] == (
    "  the run finished although this kill was sent (lost); the remaining 2 are not drawn"
  )


def test_a_session_that_ends_otherwise_than_its_kill_is_a_difference(scripted):
  ran = scripted(
    (138, "stopped by SIGUSR1; ..."),
    (1, "FATAL CheckpointError: ..."),
    (-2, ""),
    (-10, ""),
    (-9, ""),
  )
  finished = []
  figures = soak.soak(
    ARGS, KILLS, "/tmp/reference", log=lambda line: None, finish=lambda: finished.append(1)
  )
  # SIGTERM ending 128 + SIGUSR1's number, SIGKILL ending in a FATAL line: not as they should.
  assert figures["differences"] == [
    "kill 1 (SIGTERM during round 1 of the session): exit status 138: stopped by SIGUSR1; ...",
    "kill 2 (SIGKILL during checkpoint 2 of the session): exit status 1: FATAL "
    "CheckpointError: ...",
  ]
  assert ran == KILLS and finished == [1]  # Every kill hit; then the final resume.
  assert (figures["drawn"], figures["survived"]) == (5, 3)
  assert soak.summary_line(figures, 3.0).startswith("survived 3 of 5 kills (all 5 kills drawn)")


def test_expected_statuses_are_the_conventional_ones():
  assert soak.expected_statuses(soak.Kill("SIGKILL", "timed", 2.0)) == (-signal.SIGKILL,)
  assert soak.expected_statuses(soak.Kill("SIGTERM", "round", 1)) == (143, -signal.SIGTERM)
  assert soak.expected_statuses(soak.Kill("SIGINT", "round", 1)) == (130, -signal.SIGINT)
