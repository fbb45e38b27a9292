"""The first hour: every expected failure is one FATAL line that keeps finished work, and
the logs are quiet by default."""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import make_federation, tiny_base_config
from test_checkpoint import fail_at_call
from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import cli
from fedmerge_jax import config as config_lib
from fedmerge_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs launch.py's main in a fresh interpreter, after `patch` (Python source) has run.
LAUNCH = """
import runpy, sys
sys.argv = ["launch.py", *{args!r}]
{patch}
try:
  runpy.run_path("launch.py", run_name="__main__")
finally:
  print("jax imported:", "jax" in sys.modules)
"""


def launch(*args, patch=""):
  result = subprocess.run(
    [sys.executable, "-c", LAUNCH.format(args=list(args), patch=patch)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return result.returncode, result.stdout, result.stderr


def fatal_line(stderr):
  """The one FATAL line, and that nothing else was said (no traceback)."""
  assert "Traceback" not in stderr, stderr
  (fatal,) = [line for line in stderr.splitlines() if line.startswith("FATAL")]
  return fatal


@pytest.mark.parametrize(
  "args,expected",
  [
    (
      ["--config=configs/default.py", "--config.model.hidden=3"],
      "unknown config key 'model.hidden'. Did you mean 'model.hidden_sizes'",
    ),
    (["--config=configs/no_such.py"], "--config=configs/no_such.py: no such file"),
    (["--config=configs/default.py", "--config.num_rounds=-1"], "num_rounds=-1 must be > 0"),
    (["--config=configs/default.py", "--workdir=launch.py"], "--workdir=launch.py is a file"),
  ],
)
def test_bad_command_lines_fail_in_one_line_before_importing_jax(args, expected):
  rc, stdout, stderr = launch(*args)
  assert rc != 0
  assert expected in fatal_line(stderr)
  assert "jax imported: False" in stdout  # Validation did not wait for JAX (seconds).


STUB_RUN = """
from fedmerge_jax import train
train.train_and_evaluate = lambda config, workdir, start_over: {"ran_in": workdir}
"""


def test_a_run_without_workdir_says_where_it_writes(tmp_path):
  rc, stdout, stderr = launch("--config=configs/default.py", patch=STUB_RUN)
  assert rc == 0, stderr
  assert stdout.splitlines()[0] == (
    "Writing to /tmp/fedmerge_jax (no --workdir given; --workdir=DIR chooses)."
  )
  assert "{'ran_in': '/tmp/fedmerge_jax'}" in stdout  # Where it did write.
  rc, stdout, _ = launch("--config=configs/default.py", f"--workdir={tmp_path}", patch=STUB_RUN)
  assert rc == 0 and "Writing to" not in stdout


def test_ctrl_c_says_which_rounds_are_saved_quietly(tmp_path):
  interrupt_at_round_5 = """
from fedmerge_jax import train
original = train.compile_round
def compile_round(*a):
  jitted, calls = original(*a), [0]
  def round_fn(*args):
    calls[0] += 1
    if calls[0] == 5:
      raise KeyboardInterrupt
    return jitted(*args)
  return round_fn
train.compile_round = compile_round
"""
  rc, _, stderr = launch(
    "--config=configs/default.py",
    "--config.num_rounds=8",
    "--config.eval_every=4",
    "--config.checkpoint_every=2",
    "--config.tensorboard=False",
    f"--workdir={tmp_path}",
    patch=interrupt_at_round_5,
  )
  assert rc != 0
  assert fatal_line(stderr) == (
    f"FATAL interrupted; rounds up to 4 are saved in {tmp_path}/checkpoints; rerun to resume."
  )
  assert checkpoint_lib.saved_rounds(str(tmp_path))[-1] == 4
  # Quiet by default: no checkpoint-library INFO lines, no libtpu probe.
  assert "orbax" not in stderr and "libtpu" not in stderr, stderr


def test_noise_filter_keeps_our_lines_and_warnings():
  def record(path, level, msg="x"):
    return logging.LogRecord("n", level, path, 1, msg, None, None)

  assert cli.is_noise(record("/site-packages/orbax/checkpoint/x.py", logging.INFO))
  assert cli.is_noise(record("/site-packages/tensorflow_datasets/core/x.py", logging.INFO))
  assert cli.is_noise(
    record(
      "/site-packages/jax/_src/xla_bridge.py",
      logging.WARNING,
      "Unable to initialize backend 'tpu': libtpu.so not found",
    )
  )
  assert not cli.is_noise(record("/site-packages/orbax/checkpoint/x.py", logging.WARNING))
  assert not cli.is_noise(record("/repo/fedmerge_jax/train.py", logging.INFO))


def run_tiny(workdir, **changes):
  config = tiny_base_config()
  config.update_from_flattened_dict(
    {"checkpoint_every": 2, "num_rounds": 4, "tensorboard": False, **changes}
  )
  return train.train_and_evaluate(config, str(workdir), data=make_federation())


def test_every_checkpoint_unreadable_refuses_and_keeps_them(tmp_path):
  run_tiny(tmp_path)
  directory = tmp_path / "checkpoints"
  for folder, _, files in os.walk(directory):
    for name in files:
      open(os.path.join(folder, name), "w").close()  # A disk that lost its files.
  before = sorted(os.listdir(directory))
  with pytest.raises(
    checkpoint_lib.CheckpointError,
    match=r"None of the 2 checkpoints .* can be read .* kept.*new --workdir",
  ):
    run_tiny(tmp_path, num_rounds=6)
  assert sorted(os.listdir(directory)) == before == ["2", "4"]


def poison_round(monkeypatch, call):
  """The round's `call`-th invocation sees NaN inputs (test_checkpoint's helper)."""
  fail_at_call(
    monkeypatch,
    call,
    lambda jitted, state, ids, data, rng: jitted(state, ids, data._replace(x=data.x * np.nan), rng),
  )


def test_nan_right_after_resuming_says_start_over(tmp_path, monkeypatch):
  poison_round(monkeypatch, call=3)  # A NaN in a fresh run: resuming can help.
  with pytest.raises(FloatingPointError) as info:
    run_tiny(tmp_path, num_rounds=6)
  assert "Rounds up to 2 are checkpointed" in str(info.value)
  assert "start over" not in str(info.value)
  monkeypatch.undo()
  poison_round(monkeypatch, call=1)  # Resumed from round 2 and failed at once: it cannot.
  with pytest.raises(
    FloatingPointError, match="saved round 2 itself .* start over with a new --workdir"
  ):
    run_tiny(tmp_path, num_rounds=6)
  assert checkpoint_lib.saved_rounds(str(tmp_path)) == [2]


def test_clients_per_round_beyond_the_data_is_named():
  config = config_lib.resolve(tiny_base_config())
  config.clients_per_round = 9
  (warning,) = config_lib.data_warnings(config, 5, "custom")
  assert "clients_per_round=9" in warning and "only 5 clients" in warning
  config.clients_per_round = 5
  assert config_lib.data_warnings(config, 5, "custom") == []
  config.data.num_clients = 20
  (warning,) = config_lib.data_warnings(config, 8, config.data.name)
  assert "data.num_clients=20" in warning and "only 8 clients" in warning


def test_a_checkpoint_holding_nans_says_start_over(tmp_path, monkeypatch):
  run_tiny(tmp_path)
  original = checkpoint_lib.Checkpoints.restore_latest

  def restore_nans(self, like):  # As if an older version had saved a ruined state.
    step, state, progress = original(self, like)
    state["algorithm"] = jax.tree.map(
      lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, state["algorithm"]
    )
    return step, state, progress

  monkeypatch.setattr(checkpoint_lib.Checkpoints, "restore_latest", restore_nans)
  with pytest.raises(
    FloatingPointError,
    match="round 4 .* non-finite values; resuming cannot help: start over with a new --workdir",
  ):
    run_tiny(tmp_path, num_rounds=6)
