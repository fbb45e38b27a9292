"""A workdir resumes only the experiment it holds: config, data and model are recorded and
checked before any work; `compare` reuses finished runs under the same check."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import TinyBN, make_federation, tiny_base_config
from fedmerge_jax import checkpoint as checkpoint_lib
from fedmerge_jax import compare
from fedmerge_jax import fingerprint
from fedmerge_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILES = ("config.json", "experiment.json", "metrics.jsonl", "summary.json", "clients.npz")


def config(**changes):
  c = tiny_base_config()
  c.checkpoint_every = 1
  c.tensorboard = False
  c.update_from_flattened_dict(changes)
  return c


def snapshot(workdir):
  """Every run file's bytes and the checkpoints: what a refused rerun must leave alone."""
  files = {name: open(os.path.join(workdir, name), "rb").read() for name in RUN_FILES}
  return files, checkpoint_lib.saved_rounds(workdir)


def with_train_x_shifted(data):
  """The same clients, counts and labels; other training images."""
  return dataclasses.replace(data, train=dataclasses.replace(data.train, x=data.train.x + 1))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-round run: the workdir every refusal below is tried on (and must keep)."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  summary = train.train_and_evaluate(config(), workdir, data=make_federation())
  return workdir, summary, snapshot(workdir)


@pytest.mark.parametrize(
  "kwargs,differs",
  [
    ({"config": config(client_lr=0.3)}, "client_lr: 0.1 -> 0.3"),
    ({"config": config(eval_every=2)}, "eval_every: 1 -> 2"),
    (
      {"data": make_federation(sizes=[3, 5, 7, 9, 30])},
      "data: train.examples: 35 -> 54; data: train.counts: ",
    ),
    ({"data": make_federation(seed=1)}, "data: train.labels: "),
    ({"data": make_federation(num_clients=6)}, "data: clients: 5 -> 6"),
    ({"data": with_train_x_shifted(make_federation())}, "data: train.x: "),
    (
      {"model": TinyBN()},
      "model: ['params']['head']['kernel']: 'float32[8, 3]' -> 'float32[5, 3]'",
    ),
  ],
)
def test_another_experiment_is_refused_before_any_work(finished, kwargs, differs):
  workdir, _, before = finished
  run = dict({"config": config(), "data": make_federation()}, **kwargs)
  with pytest.raises(fingerprint.ExperimentMismatch) as info:
    train.train_and_evaluate(run["config"], workdir, data=run["data"], model=run.get("model"))
  message = str(info.value)
  assert message.startswith(f"--workdir={workdir} holds a different experiment (")
  assert differs in message, message
  assert message.endswith(
    "Use a new --workdir, or start over there (deleting its results): "
    "--start_over on the command line, start_over=True in "
    "train_and_evaluate."
  )
  assert snapshot(workdir) == before  # Nothing relabelled, nothing redone.


def test_the_same_experiment_still_resumes_and_extends(finished, tmp_path):
  workdir, summary, _ = finished
  again = train.train_and_evaluate(config(), workdir, data=make_federation())
  assert {k: v for k, v in again.items() if k != "wall_time_s"} == {
    k: v for k, v in summary.items() if k != "wall_time_s"
  }
  extended = str(tmp_path / "extended")
  train.train_and_evaluate(config(), extended, data=make_federation())
  # More rounds and other bookkeeping (chunking, checkpoint cadence) are the same experiment.
  train.train_and_evaluate(
    config(num_rounds=3, client_chunk_size=2, checkpoint_keep=3), extended, data=make_federation()
  )
  assert [json.loads(l)["round"] for l in open(os.path.join(extended, "metrics.jsonl"))] == [
    1,
    2,
    3,
  ]


def test_start_over_deletes_all_four_plots(tmp_path):
  plots = ["accuracy.png", "client_accuracy.png", "merging_weights.png", "gap.png"]
  for name in plots:
    open(os.path.join(tmp_path, name), "w").close()
  fingerprint.start_over(str(tmp_path))
  assert [name for name in plots if os.path.exists(os.path.join(tmp_path, name))] == []


def test_start_over_replaces_the_workdir_and_a_legacy_workdir_is_checked_too(finished, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(config(num_rounds=1), workdir, data=make_federation())
  os.remove(os.path.join(workdir, "experiment.json"))  # As an older version left it.
  with pytest.raises(fingerprint.ExperimentMismatch, match="client_lr: 0.1 -> 0.3"):
    train.train_and_evaluate(config(num_rounds=1, client_lr=0.3), workdir, data=make_federation())
  old_events = os.path.join(workdir, "events.out.tfevents.1.old")  # The old run's TensorBoard.
  open(old_events, "w").close()
  train.train_and_evaluate(
    config(num_rounds=1, client_lr=0.3), workdir, data=make_federation(), start_over=True
  )
  assert not os.path.exists(old_events)
  assert json.load(open(os.path.join(workdir, "config.json")))["client_lr"] == 0.3
  recorded = json.load(open(os.path.join(workdir, "experiment.json")))
  assert recorded["config"]["client_lr"] == 0.3 and recorded["data"]["clients"] == 5


def test_compare_reuses_a_finished_run_only_for_the_same_data(tmp_path):
  workdir = str(tmp_path)
  (first,) = compare.run_comparison(config(), ["fedavg"], workdir, data=make_federation())
  (reused,) = compare.run_comparison(config(), ["fedavg"], workdir, data=make_federation())
  assert reused.summary == first.summary  # wall_time_s too: read back, not rerun.
  with pytest.raises(fingerprint.ExperimentMismatch, match="data: train.labels"):
    compare.run_comparison(config(), ["fedavg"], workdir, data=make_federation(seed=1))
  assert (
    open(os.path.join(workdir, "comparison.md"))
    .read()
    .count(f"{first.summary['test/acc_mean']:.4f}")
    >= 1
  )  # The old table was not relabelled.


# Runs a main in a fresh interpreter after `patch` (Python source).
MAIN = """
import runpy, sys
sys.argv = ["main", *{args!r}]
{patch}
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
CTRL_C = """
from fedmerge_jax import data
def interrupted(*args, **kwargs):
  raise KeyboardInterrupt
data.load = interrupted  # Ctrl-C while the comparison loads its data.
"""


@pytest.mark.parametrize(
  "module,args,patch,expected",
  [
    (
      "fedmerge_jax.compare",
      ["--config=configs/default.py", "--workdir=launch.py"],
      "",
      "FATAL --workdir=launch.py is a file, not a directory.",
    ),
    (
      "fedmerge_jax.compare",
      ["--config=configs/default.py", "--sweep=num_global_models"],
      "",
      "FATAL SweepError: --sweep=num_global_models: expected <config field>=<value>,<value>,...",
    ),
    (
      "fedmerge_jax.compare",
      ["--config=configs/default.py", "--workdir={tmp}"],
      CTRL_C,
      "FATAL interrupted; the finished runs in {tmp} are kept and the one in progress keeps its "
      "checkpoints; rerun the same command to go on.",
    ),
    (
      "fedmerge_jax.plot",
      ["--workdir=launch.py"],
      "",
      "FATAL --workdir=launch.py is a file, not a directory.",
    ),
  ],
)
def test_compare_and_plot_stop_in_one_line(tmp_path, module, args, patch, expected):
  args = [a.format(tmp=tmp_path) for a in args]
  script = MAIN.format(args=args, patch=patch, module=module)
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(expected.format(tmp=tmp_path)), (
    result.stderr
  )
