"""The reporter: each evaluated round written once, the best round by validation loss, a
resumed session's files as if it had never stopped; the failure guard's saves."""

import json
import os

import ml_collections
import numpy as np
import pytest

from fedmerge_jax import failures
from fedmerge_jax import metric_writers
from fedmerge_jax import reporting
from fedmerge_jax import rounds as rounds_lib

VAL_LOSSES = {2: 0.5, 4: 0.3, 6: 0.4, 8: 0.3}  # Round 4 is the best; 8 only ties it.


class Data:
  client_ids, groups = ["a", "b"], None


def config():
  return ml_collections.ConfigDict({"num_rounds": 8, "tensorboard": False})


def evaluation(r):
  """What an evaluation of round r returns: its metrics, per-client arrays, no weights."""
  metrics = {"round": r, "test/acc_mean": r / 10, "val/loss": VAL_LOSSES[r]}
  metrics.update({f"test/{k}": r / 100 for k in reporting.SUMMARY_KEYS if k != "acc_mean"})
  return lambda: (metrics, {"clients/test_acc": np.full(2, r / 10)}, None)


def rounds_in(workdir):
  return [m["round"] for m in metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def test_each_evaluated_round_is_written_once_and_the_best_is_kept(tmp_path):
  workdir = str(tmp_path)
  with reporting.Reporter(workdir, config(), Data(), 0, None, {}) as reporter:
    for r in (2, 4, 6):
      reporter.report(r, evaluation(r))
  best, latest = reporter.progress()
  assert rounds_in(workdir) == [2, 4, 6] and latest["round"] == 6
  assert best["best/round"] == 4 and best["best/val_loss"] == 0.3
  assert best["best/acc_mean"] == 0.4  # The test metrics at the best round.
  assert int(np.load(os.path.join(workdir, "clients.npz"))["round"]) == 6

  # Resumed from round 4's checkpoint: round 6 is redone and written once; 8 ties 4.
  with reporting.Reporter(workdir, config(), Data(), 4, best, latest) as resumed:
    for r in (6, 8):
      resumed.report(r, evaluation(r))
    summary = resumed.summary()
  assert rounds_in(workdir) == [2, 4, 6, 8]
  assert summary["best/round"] == 4 and summary["round"] == 8
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == pytest.approx(summary)


class FakeRounds:
  """Rounds whose unread flags hold a failure at `failed` (None: all finite)."""

  def __init__(self, state_round, failed=None):
    self.state, self.state_round, self.failed = np.zeros(2), state_round, failed

  def confirm(self):
    if self.failed is None:
      return None
    self.state_round, failed, self.failed = self.failed - 1, self.failed, None
    return rounds_lib.Failure(failed, np.arange(2), {"clients/train_loss": [np.nan, 1.0]})

  def known_good(self):
    return None if self.failed else self.state_round


class FakeCheckpointing:
  start_round, layout = 0, None

  def __init__(self):
    self.saved = []

  def save(self, round_index, state_round, state, progress):
    if round_index == state_round:
      self.saved.append(round_index)
    return f"Saved {self.saved}."

  def due(self, round_index):
    return False

  def close(self):
    pass


@pytest.mark.parametrize("failed,saved", [(None, [6]), (5, [4])])
def test_an_interrupt_saves_the_last_good_round_even_with_flags_unread(failed, saved):
  checkpointing = FakeCheckpointing()
  with pytest.raises(KeyboardInterrupt):
    with failures.Guard(config(), FakeRounds(6, failed), checkpointing, lambda: (None, {})) as g:
      g.round_done(6)
      raise KeyboardInterrupt
  assert checkpointing.saved == saved


def test_a_non_finite_round_read_late_stops_naming_it_and_saves_the_one_before():
  checkpointing = FakeCheckpointing()
  rounds = FakeRounds(7, failed=7)
  with pytest.raises(FloatingPointError, match=r"round 7 for clients \[0\]\. Saved \[6\]"):
    with failures.Guard(config(), rounds, checkpointing, lambda: (None, {})) as guard:
      guard.check(rounds.confirm())
