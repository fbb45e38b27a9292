"""A researcher's workflow: seeds, sweeps, their own model and algorithm, --imports."""

import json
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from fedmerge_jax import algorithms as algorithms_lib
from fedmerge_jax import compare
from fedmerge_jax import config as config_lib
from fedmerge_jax import models as models_lib
from fedmerge_jax import registry
from fedmerge_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("test/acc_mean", "test/acc_weighted", "test/acc_std", "test/acc_p10", "best/acc_mean")


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
  """What a test registers is forgotten after it."""
  for table in (registry.MODELS, registry.ALGORITHMS):
    monkeypatch.setattr(table, "builders", dict(table.builders))


@pytest.fixture
def quick_config(tiny_config):
  """tiny_config without TensorBoard, sampling 3 of the 5 unequal clients each round."""
  tiny_config.tensorboard = False
  tiny_config.clients_per_round = 3
  return tiny_config


def table_rows(table):
  lines = [l for l in table.strip().splitlines() if l.startswith("|")][2:]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def history(run_dir):
  """metrics.jsonl without its timings."""
  return [
    {k: v for k, v in m.items() if k != "rounds_per_s"} for m in compare.read_history(run_dir)
  ]


def rounds_of(run_dir):
  return [m["round"] for m in compare.read_history(run_dir)]


# --- Seeds -------------------------------------------------------------------------------------


def test_seeds_table_is_mean_and_std_of_the_per_seed_runs(quick_config, tiny_data, tmp_path):
  results = compare.run_comparison(
    quick_config, ["fedmerge"], str(tmp_path / "cmp"), data=tiny_data, seeds=[0, 1]
  )
  assert [(r.algorithm, r.seed) for r in results] == [("fedmerge", 0), ("fedmerge", 1)]
  runs = [read_json(tmp_path / "cmp" / "fedmerge" / f"seed_{s}" / "summary.json") for s in (0, 1)]
  # Each seed's run is the plain run of that seed on the same data.
  quick_config.algorithm, quick_config.seed = "fedmerge", 1
  alone = train.train_and_evaluate(quick_config, str(tmp_path / "alone"), data=tiny_data)
  assert all(alone[k] == runs[1][k] for k in METRICS)
  assert history(tmp_path / "alone") == history(tmp_path / "cmp" / "fedmerge" / "seed_1")
  assert any(runs[0][k] != runs[1][k] for k in METRICS)  # The seed reached the runs.
  # Two values: mean (a + b) / 2, sample std |a - b| / sqrt(2).
  (row,) = table_rows(compare.comparison_table(results))
  for cell, key in zip(row[1:6], METRICS):
    a, b = runs[0][key], runs[1][key]
    assert cell == f"{(a + b) / 2:.4f} ± {abs(a - b) / math.sqrt(2):.4f}"
  report = open(tmp_path / "cmp" / "comparison.md").read()
  assert "seeds 0, 1" in report.splitlines()[0] and "mean ± std over the seeds" in report


def test_plot_draws_the_mean_over_seeds_with_a_std_band(tmp_path):
  seeds = [
    [{"round": 1, "test/acc_mean": 0.2}, {"round": 2, "test/acc_mean": 0.5}],
    [{"round": 1, "test/acc_mean": 0.4}, {"round": 2, "test/acc_mean": 0.9}],
  ]
  fig = compare.plot_accuracy({"fedmerge": seeds, "single": seeds[0]}, str(tmp_path / "p.png"))
  (ax,) = fig.axes
  mean, single = ax.get_lines()
  np.testing.assert_allclose(mean.get_ydata(), [0.3, 0.7])
  np.testing.assert_allclose(single.get_ydata(), [0.2, 0.5])
  (band,) = ax.collections  # Only the several-seed entry has a band.
  ys = band.get_paths()[0].vertices[:, 1]
  std = np.array([0.2, 0.4]) / math.sqrt(2)
  np.testing.assert_allclose([ys.min(), ys.max()], [0.3 - std[0], 0.7 + std[1]], rtol=1e-6)


# --- Sweeps ------------------------------------------------------------------------------------


def test_sweep_reuses_finished_runs_and_resumes_a_half_finished_one(
  quick_config, tiny_data, tmp_path, monkeypatch
):
  quick_config.num_rounds = 4
  workdir = str(tmp_path / "sweep")
  k1_dir = os.path.join(workdir, "num_global_models=1", "fedmerge")
  k2_dir = os.path.join(workdir, "num_global_models=2", "fedmerge")
  compare.run_comparison(
    quick_config, ["fedmerge"], workdir, data=tiny_data, sweeps=[("num_global_models", [1])]
  )
  k1_summary = read_json(os.path.join(k1_dir, "summary.json"))
  # K = 2 stopped after 2 of 4 rounds (its config.json says 2 rounds).
  half = config_lib.resolve(quick_config)
  half.num_global_models, half.num_rounds = 2, 2
  train.train_and_evaluate(half, k2_dir, data=tiny_data)
  full = config_lib.resolve(quick_config)
  full.num_global_models = 2
  reference = train.train_and_evaluate(full, str(tmp_path / "uninterrupted"), data=tiny_data)

  calls, real_train = [], train.train_and_evaluate

  def spy(config, run_dir, data=None, **kwargs):
    calls.append(run_dir)
    return real_train(config, run_dir, data=data, **kwargs)

  monkeypatch.setattr(train, "train_and_evaluate", spy)
  sweeps = compare.parse_sweeps(["num_global_models=1,2"], config_lib.resolve(quick_config))
  assert sweeps == [("num_global_models", [1, 2])]
  results = compare.run_comparison(
    quick_config, ["fedmerge"], workdir, data=tiny_data, sweeps=sweeps
  )
  assert calls == [k2_dir]  # K = 1 was finished: reused, not rerun.
  assert results[0].summary == k1_summary
  assert rounds_of(k2_dir) == [1, 2, 3, 4]  # Resumed at round 3, as if it never stopped.
  assert history(k2_dir) == history(tmp_path / "uninterrupted")
  assert all(results[1].summary[k] == reference[k] for k in METRICS)
  rows = table_rows(open(os.path.join(workdir, "comparison.md")).read())
  assert [r[:2] for r in rows] == [["1", "fedmerge"], ["2", "fedmerge"]]
  assert [r[2] for r in rows] == [
    f"{k1_summary['test/acc_mean']:.4f}",
    f"{reference['test/acc_mean']:.4f}",
  ]
  fig = compare.plot_sweep(results, "test/acc_mean", str(tmp_path / "s.png"))
  (bars,) = fig.axes[0].containers  # One algorithm: one error-bar line.
  line = bars.lines[0]
  assert list(line.get_xdata()) == [1, 2]
  np.testing.assert_allclose(
    np.asarray(line.get_ydata(), float), [k1_summary["test/acc_mean"], reference["test/acc_mean"]]
  )


def test_a_run_restarted_after_finishing_is_not_reused(tmp_path, tiny_config):
  config = config_lib.resolve(tiny_config)
  (tmp_path / "summary.json").write_text(json.dumps({"round": 2}))
  os.utime(tmp_path / "summary.json", (1, 1))
  (tmp_path / "config.json").write_text(config.to_json())
  assert compare.finished_summary(str(tmp_path), config) is None  # Config newer: restarted.
  os.utime(tmp_path / "summary.json")
  assert compare.finished_summary(str(tmp_path), config) == {"round": 2}
  config.client_lr = 0.5
  assert compare.finished_summary(str(tmp_path), config) is None  # Another config.


def test_sweep_grid_and_bad_sweeps(tiny_config):
  config = config_lib.resolve(tiny_config)
  sweeps = compare.parse_sweeps(
    ["num_global_models=1,2", "client_lr=0.1,0.5", "update_mode=official,gradient"], config
  )
  assert sweeps[1] == ("client_lr", [0.1, 0.5])
  grid = compare.sweep_settings(sweeps)
  assert len(grid) == 8 and grid[0] == (
    ("num_global_models", 1),
    ("client_lr", 0.1),
    ("update_mode", "official"),
  )
  assert compare.setting_name(grid[-1]) == "num_global_models=2,client_lr=0.5,update_mode=gradient"
  for spec, match in [
    ("num_global_modls=1", "unknown config field"),
    ("num_global_models=1.5", "not an integer"),
    ("seed=1,2", "--seeds"),
    ("num_global_models", "expected"),
    ("model.hidden_sizes=8", "cannot be swept"),
  ]:
    with pytest.raises(compare.SweepError, match=match):
      compare.parse_sweeps([spec], config)
  with pytest.raises(compare.SweepError, match="distinct integer"):
    compare.parse_seeds(["1", "1"])


# --- Your own model ----------------------------------------------------------------------------


class Traces:
  """Records the `train` flag of each trace of a module (flax would freeze a plain list)."""

  def __init__(self):
    self.flags = []


class UserMLP(nn.Module):
  """A user's module: the built-in MLP's layers, no `mask` keyword, recording its traces."""

  num_classes: int
  traces: Traces

  @nn.compact
  def __call__(self, x, train: bool = False):
    self.traces.flags.append(train)
    x = nn.relu(nn.Dense(8, name="hidden_0")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes, name="head")(x)


class Headless(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("mode", ["official", "gradient"])
def test_a_user_module_runs_through_train_and_evaluate(quick_config, tiny_data, tmp_path, mode):
  quick_config.update_mode = mode
  quick_config.model.hidden_sizes = (8,)
  traces = Traces()
  mine = train.train_and_evaluate(
    quick_config,
    str(tmp_path / "mine"),
    data=tiny_data,
    model=UserMLP(tiny_data.num_classes, traces),
  )
  assert (
    True in traces.flags and False in traces.flags
  )  # Trained and evaluated with the user's module.
  builtin = train.train_and_evaluate(quick_config, str(tmp_path / "builtin"), data=tiny_data)
  assert history(tmp_path / "mine") == history(tmp_path / "builtin")
  assert all(mine[k] == builtin[k] for k in METRICS)


def test_official_mode_needs_a_head_and_says_so(quick_config, tiny_data, tmp_path):
  quick_config.update_mode = "gradient"
  train.train_and_evaluate(quick_config, str(tmp_path / "g"), data=tiny_data, model=Headless())
  quick_config.update_mode = "official"
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(quick_config, str(tmp_path / "o"), data=tiny_data, model=Headless())
  assert re.fullmatch(
    r"[^\n]*has none \(its top-level layers: \['out'\]\)[^\n]*"
    r"--config.update_mode=gradient\.",
    str(error.value),
  )  # One line.


def test_a_registered_model_name_works_from_a_config(quick_config, tiny_data, tmp_path):
  traces, built = Traces(), []

  def builder(model_config, num_classes):
    built.append((model_config.name, num_classes))
    return UserMLP(num_classes, traces)

  models_lib.register_model("user_mlp", builder)
  assert models_lib.registered_names()[-1] == "user_mlp"
  quick_config.model.name = "user_mlp"
  summary = train.train_and_evaluate(quick_config, str(tmp_path / "run"), data=tiny_data)
  assert built and built[0] == ("user_mlp", tiny_data.num_classes) and traces.flags
  assert rounds_of(tmp_path / "run") == [1, 2] and 0 <= summary["test/acc_mean"] <= 1
  quick_config.model.name = "user_mpl"
  with pytest.raises(config_lib.ConfigError, match="user_mpl.*'user_mlp'"):
    config_lib.resolve(quick_config)
  with pytest.raises(ValueError, match="built-in"):
    models_lib.register_model("mlp", builder)
  with pytest.raises(ValueError, match="must be callable"):
    algorithms_lib.register_algorithm("mine", "not a factory")


# --- Your own algorithm: the docs' example (docs/pages/extending.md) ----------------------------


def readme_block(containing):
  """The ```python block of docs/pages/extending.md that contains `containing`."""
  text = open(os.path.join(ROOT, "docs", "pages", "extending.md")).read()
  blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if containing in b]
  assert len(blocks) == 1, f"expected one extending.md python block with {containing!r}"
  return blocks[0]


def test_readme_custom_algorithm_is_fedavg_with_server_momentum(tiny_config, tiny_data):
  exec(compile(readme_block("register_algorithm("), "extending.md", "exec"), {})
  assert "fedavgm" in algorithms_lib.registered_names()
  tiny_config.server_lr_globals = 0.5
  built = {}
  for name in ("fedavg", "fedavgm"):
    tiny_config.algorithm = name
    config = config_lib.resolve(tiny_config)  # The registered name passes validation.
    built[name] = train.build(config, tiny_data)[1]
  ids, data = np.array([0, 2, 4]), tiny_data.train.gather(np.array([0, 2, 4]))
  states = {name: [alg.init(jax.random.key(0))] for name, alg in built.items()}
  for name, alg in built.items():
    for r in range(2):
      states[name].append(jax.jit(alg.round)(states[name][-1], ids, data, jax.random.key(r))[0])
  theta = {
    name: [np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.globals)]) for s in states[name]]
    for name in built
  }
  # Round 1: momentum's first step is plain SGD. Round 2 (same start, same deltas g2):
  # FedAvgM steps lr (g2 + 0.9 g1) where FedAvg steps lr g2, and lr g1 = theta0 - theta1.
  np.testing.assert_allclose(theta["fedavgm"][1], theta["fedavg"][1], rtol=0, atol=0)
  expected = theta["fedavg"][2] + 0.9 * (theta["fedavg"][1] - theta["fedavg"][0])
  np.testing.assert_allclose(theta["fedavgm"][2], expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(theta["fedavgm"][2], theta["fedavg"][2], atol=1e-4)


# --- From the command line: --imports -----------------------------------------------------------

USER_MODULE = """
import flax.linen as nn
from fedmerge_jax import models

class Linear(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))

models.register_model("linear", lambda model_config, num_classes: Linear(num_classes))
"""


def test_imports_flag_registers_before_the_config_is_checked(tmp_path):
  (tmp_path / "my_models.py").write_text(USER_MODULE)
  (tmp_path / "my_algorithms.py").write_text(readme_block("register_algorithm("))
  env = dict(os.environ, PYTHONPATH=ROOT)
  config = os.path.join(ROOT, "configs", "default.py")
  common = [
    "--imports=my_models,my_algorithms",
    f"--config={config}",
    "--config.model.name=linear",
    "--config.num_rounds=2",
    "--config.eval_every=1",
  ]
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedmerge_jax.compare",
      *common,
      "--algorithms=fedavgm",
      "--seeds=0,1",
      f"--workdir={tmp_path / 'cmp'}",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = table_rows(result.stdout)
  assert row[0] == "fedavgm" and " ± " in row[1]
  assert (
    read_json(tmp_path / "cmp" / "fedavgm" / "seed_1" / "config.json")["model"]["name"] == "linear"
  )
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch.py"),
      *common,
      "--config.algorithm=fedavgm",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  ours = [l for l in result.stderr.splitlines() if l.startswith("I") and "xla_bridge" not in l]
  first = ours[0]  # JAX's own backend probing may come before; ours starts with this.
  assert re.search(r"JAX backend cpu: \d+ devices?", first), first
  assert rounds_of(tmp_path / "run") == [1, 2]
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedmerge_jax.compare",
      "--imports=no_such_module",
      f"--config={config}",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "FATAL --imports=no_such_module: cannot import it" in result.stderr
