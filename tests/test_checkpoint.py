"""Checkpoints: exact resume after SIGKILL or Ctrl-C, torn checkpoints, NaN and OOM stops."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import make_federation
from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import config as config_lib
from fedmerge_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  "num_global_models": 3,
  "num_rounds": 20,
  "eval_every": 2,
  "checkpoint_every": 5,
  "clients_per_round": 3,
  "local_epochs": 1,
  "batch_size": 4,
  "client_lr": 0.1,
  "server_lr_logits": 0.5,
  "model.name": "mlp",
  "model.hidden_sizes": (8,),
}
TIMING = ("rounds_per_s", "wall_time_s")

KILL_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import make_federation
from fedmerge_jax import config as config_lib, train
config = config_lib.base_config()
config.update_from_flattened_dict(json.loads({overrides!r}))
original = train.compile_round
def killed_at_round(*compile_args):
  jitted, calls = original(*compile_args), [0]
  def round_fn(*args):
    calls[0] += 1
    if calls[0] == {kill_at}:
      os.kill(os.getpid(), signal.SIGKILL)  # No handler runs: as if the machine died.
    return jitted(*args)
  return round_fn
train.compile_round = killed_at_round
train.train_and_evaluate(config, {workdir!r}, data=make_federation())
"""


def make_config(**changes):
  config = config_lib.base_config()
  config.update_from_flattened_dict({**OVERRIDES, **changes})
  return config


def metric_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def without_timing(summary):
  return {k: v for k, v in summary.items() if k not in TIMING}


def fail_at_call(monkeypatch, call, make_failure):
  """Makes the jitted round's `call`-th invocation fail as `make_failure(args)` says."""
  original = train.compile_round

  def patched(*compile_args):
    jitted, calls = original(*compile_args), [0]

    def round_fn(state, ids, data, rng):
      calls[0] += 1
      if calls[0] == call:
        return make_failure(jitted, state, ids, data, rng)
      return jitted(state, ids, data, rng)

    return round_fn

  monkeypatch.setattr(train, "compile_round", patched)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  summary = train.train_and_evaluate(make_config(), workdir, data=make_federation())
  return summary, metric_lines(workdir)


def test_resume_after_sigkill_reproduces_the_uninterrupted_metrics(uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  script = KILL_SCRIPT.format(
    tests=os.path.join(ROOT, "tests"), workdir=workdir, kill_at=14, overrides=json.dumps(OVERRIDES)
  )
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == -signal.SIGKILL, result.stderr
  assert metric_lines(workdir)[-1]["round"] == 12  # It died after the round-12 evaluation.
  killed_at = checkpoint_lib.Checkpoints(workdir).latest_round()
  assert killed_at in (5, 10)

  summary = train.train_and_evaluate(make_config(), workdir, data=make_federation())
  expected_summary, expected_lines = uninterrupted
  assert metric_lines(workdir) == expected_lines  # Rounds after the checkpoint were redone.
  assert without_timing(summary) == without_timing(expected_summary)


def test_ctrl_c_checkpoints_the_last_finished_round(uninterrupted, tmp_path, monkeypatch):
  workdir = str(tmp_path)

  def interrupt(*args):
    raise KeyboardInterrupt

  fail_at_call(monkeypatch, 8, interrupt)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(make_config(), workdir, data=make_federation())
  assert checkpoint_lib.Checkpoints(workdir).latest_round() == 7
  monkeypatch.undo()
  summary = train.train_and_evaluate(make_config(), workdir, data=make_federation())
  assert metric_lines(workdir) == uninterrupted[1]
  assert without_timing(summary) == without_timing(uninterrupted[0])


def test_torn_and_corrupt_checkpoints_are_skipped(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(make_config(num_rounds=10), workdir, data=make_federation())
  directory = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(directory)) == ["10", "5"]
  # A write killed half-way: orbax's temporary folder, never renamed into place.
  shutil.copytree(os.path.join(directory, "10"), os.path.join(directory, "15.orbax-checkpoint-tmp"))
  # A finalized checkpoint whose array files were lost or truncated afterwards.
  for folder, _, files in os.walk(os.path.join(directory, "10", "state")):
    for name in files:
      open(os.path.join(folder, name), "w").close()
  summary = train.train_and_evaluate(make_config(), workdir, data=make_federation())
  assert metric_lines(workdir) == uninterrupted[1]  # Resumed from round 5.
  assert without_timing(summary) == without_timing(uninterrupted[0])


def test_nan_stops_the_run_and_keeps_the_last_good_round(tmp_path, monkeypatch):
  workdir = str(tmp_path)

  def poisoned(jitted, state, ids, data, rng):
    return jitted(state, ids, data._replace(x=data.x * np.nan), rng)

  fail_at_call(monkeypatch, 7, poisoned)
  with pytest.raises(FloatingPointError, match=r"round 7 for clients \[") as info:
    train.train_and_evaluate(make_config(), workdir, data=make_federation())
  assert "Rounds up to 6 are checkpointed" in str(info.value)
  assert [l["round"] for l in metric_lines(workdir)] == [2, 4, 6]  # Finished rounds kept.
  like = {
    "algorithm": jax.jit(train.build(config_lib.resolve(make_config()), make_federation())[1].init)(
      jax.random.key(0)
    ),
    "rngs": jax.random.key_data(jax.random.split(jax.random.key(0), 2)),
  }
  round_index, saved, progress = checkpoint_lib.Checkpoints(workdir).restore_latest(like)
  assert round_index == 6 and progress["round"] == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["algorithm"]))


def test_out_of_memory_suggests_client_chunk_size(tmp_path, monkeypatch):
  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes."
    )

  fail_at_call(monkeypatch, 4, out_of_memory)
  with pytest.raises(train.OutOfMemoryError, match=r"client_chunk_size=1 .*Rounds up to 3"):
    train.train_and_evaluate(make_config(), str(tmp_path), data=make_federation())
  assert checkpoint_lib.Checkpoints(str(tmp_path)).latest_round() == 3


def test_resuming_a_different_experiment_is_refused(tmp_path):
  train.train_and_evaluate(make_config(num_rounds=5), str(tmp_path), data=make_federation())
  with pytest.raises(config_lib.ConfigError, match="num_global_models: 3 -> 2.*new --workdir"):
    train.train_and_evaluate(
      make_config(num_global_models=2), str(tmp_path), data=make_federation()
    )


def test_a_finished_run_rerun_returns_its_summary(tmp_path):
  config = make_config(num_rounds=6)
  first = train.train_and_evaluate(config, str(tmp_path), data=make_federation())
  again = train.train_and_evaluate(config, str(tmp_path), data=make_federation())
  assert without_timing(again) == without_timing(first)
  assert [l["round"] for l in metric_lines(str(tmp_path))] == [2, 4, 6]
