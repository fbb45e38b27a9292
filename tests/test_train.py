"""End to end: the offline default learns, FedMerge beats FedAvg on it, runs are repeatable."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedmerge_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config():
  spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "configs/default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
  """FedMerge (K=4) and FedAvg for 60 rounds of the offline default."""
  out = {}
  for name, overrides in {"fedmerge": {}, "fedavg": {"algorithm": "fedavg"}}.items():
    config = default_config()
    config.num_rounds = 60
    config.eval_every = 30
    config.update(overrides)
    out[name] = train.train_and_evaluate(config, str(tmp_path_factory.mktemp(name)))
  return out


def test_default_learns_above_chance(default_runs):
  for summary in default_runs.values():
    assert summary["test/acc_mean"] > 0.2  # Chance is 0.1.


def test_fedmerge_beats_fedavg_on_hidden_groups(default_runs):
  fedmerge, fedavg = default_runs["fedmerge"], default_runs["fedavg"]
  assert fedmerge["test/acc_mean"] > 0.8
  assert fedmerge["test/acc_mean"] > fedavg["test/acc_mean"] + 0.3
  assert fedmerge["best/acc_mean"] > fedavg["best/acc_mean"]


def test_outputs_and_metric_keys(tiny_config, tiny_data, tmp_path):
  summary = train.train_and_evaluate(tiny_config, str(tmp_path), data=tiny_data)
  for key in (
    "test/acc_mean",
    "test/acc_weighted",
    "test/acc_std",
    "test/acc_p10",
    "train/loss",
    "best/acc_mean",
    "best/acc_weighted",
    "best/acc_std",
    "best/acc_p10",
    "best/round",
  ):
    assert key in summary, key
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["round"] for l in lines] == [1, 2]
  best = min(lines, key=lambda l: l["val/loss"])
  assert summary["best/round"] == best["round"]
  assert summary["best/acc_mean"] == best["test/acc_mean"]
  assert json.load(open(tmp_path / "summary.json"))["test/acc_mean"] == summary["test/acc_mean"]
  assert json.load(open(tmp_path / "config.json"))["num_global_models"] == 3
  # Unweighted mean over clients, as the paper reports.
  assert 0.0 <= summary["test/acc_p10"] <= summary["test/acc_mean"] <= 1.0


def test_same_seed_gives_identical_metrics(tiny_config, tiny_data, tmp_path):
  tiny_config.clients_per_round = 3
  a = train.train_and_evaluate(tiny_config, str(tmp_path / "a"), data=tiny_data)
  b = train.train_and_evaluate(tiny_config, str(tmp_path / "b"), data=tiny_data)
  drop = lambda s: {k: v for k, v in s.items() if k not in ("wall_time_s", "rounds_per_s")}
  assert drop(a) == drop(b)
  tiny_config.seed = 1
  c = train.train_and_evaluate(tiny_config, str(tmp_path / "c"), data=tiny_data)
  assert drop(c) != drop(a)


def test_client_sampling_is_without_replacement():
  import jax

  ids = train.sample_clients(jax.random.key(0), 100, 30)
  assert len(set(ids.tolist())) == 30 and ids.max() < 100
  np.testing.assert_array_equal(train.sample_clients(jax.random.key(0), 5, 0), np.arange(5))


def test_nan_loss_stops_the_run_naming_round_and_clients(tiny_config, tiny_data, tmp_path):
  tiny_config.client_lr = 1e30
  with pytest.raises(FloatingPointError, match=r"round 1 for clients \["):
    train.train_and_evaluate(tiny_config, str(tmp_path), data=tiny_data)


def test_launch_runs_the_default(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config=configs/default.py",
      f"--workdir={tmp_path}",
      "--config.num_rounds=4",
      "--config.eval_every=2",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert "round     4 | train/loss" in result.stdout
  assert len(open(tmp_path / "metrics.jsonl").readlines()) == 2


def read_events(path):
  """(tag, kind) of every summary value in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  found = set()
  with open(path, "rb") as f:
    while header := f.read(12):
      length = int.from_bytes(header[:8], "little")
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      for value in event.summary.value:
        found.add((value.tag, value.WhichOneof("value")))
  return found


@pytest.mark.plots  # The suite's runs skip plots (conftest); this one draws them.
def test_tensorboard_clients_npz_and_plots_are_written(tiny_config, tiny_data, tmp_path):
  tiny_data = tiny_data.__class__(**{**tiny_data.__dict__, "groups": np.array([0, 0, 1, 1, 2])})
  summary = train.train_and_evaluate(tiny_config, str(tmp_path), data=tiny_data)
  events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
  assert len(events) == 1
  found = read_events(tmp_path / events[0])
  for tag, kind in [
    ("test/acc_mean", "simple_value"),
    ("train/loss", "simple_value"),
    ("clients/test_acc", "histo"),
    ("merging_weights/model_2", "histo"),
    ("merging_weights/clients_x_models", "image"),
  ]:
    assert (tag, kind) in found, (tag, kind, sorted(found))
  clients = np.load(tmp_path / "clients.npz")
  assert clients["merging_weights"].shape == (5, 3)
  np.testing.assert_allclose(clients["merging_weights"].sum(1), 1.0, rtol=1e-5)
  assert clients["test_acc"].shape == (5,) and int(clients["round"]) == 2
  assert -1.0 <= summary["groups/ari"] <= 1.0
  for name in ("accuracy.png", "client_accuracy.png", "merging_weights.png"):
    with open(tmp_path / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def launch_default(workdir, stderr):
  return subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config=configs/default.py",
      f"--workdir={workdir}",
      "--config.num_rounds=30",
      "--config.eval_every=10",
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=stderr,
    timeout=300,
  )


def test_progress_bar_on_a_terminal_and_quiet_off_it(tmp_path):
  import fcntl
  import pty
  import struct
  import termios

  piped = launch_default(tmp_path / "piped", subprocess.PIPE)
  assert piped.returncode == 0
  assert b"round/s" not in piped.stderr and b"\r" not in piped.stderr
  assert piped.stdout.count(b"round ") == 3  # The evaluation lines alone.

  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # rows, cols
  on_terminal = launch_default(tmp_path / "tty", follower)
  os.close(follower)
  drawn = b""
  try:
    while chunk := os.read(leader, 65536):
      drawn += chunk
  except OSError:  # The terminal is closed once everything is read.
    pass
  assert on_terminal.returncode == 0
  assert b"30/30" in drawn and b"round/s" in drawn and b"acc=" in drawn
