"""The comparison tool: runs algorithms on shared data, tabulates, plots; its CLI."""

import os
import re
import subprocess
import sys

from matplotlib import image as mpl_image
import pytest

from fedmerge_jax import algorithms
from fedmerge_jax import compare
from fedmerge_jax import data as data_lib
from fedmerge_jax import train
from fedmerge_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["fedmerge", "fedavg"]


def tiny_digits_config():
  config = base_config()
  config.num_rounds = 3
  config.eval_every = 1
  config.model.name = "mlp"
  config.model.hidden_sizes = (8,)
  config.data.name = "digits_groups"
  config.data.num_clients = 8
  config.data.num_groups = 2
  return config


def table_rows(table):
  """{algorithm: [cells]} of a Markdown table's body."""
  lines = [l for l in table.strip().splitlines() if l.startswith("|")][2:]
  rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
  return {r[0]: r[1:] for r in rows}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  """run_comparison on tiny digits, spying on data loading and on what each run receives."""
  workdir = str(tmp_path_factory.mktemp("compare"))
  loaded, received = [], []
  real_load, real_train = data_lib.load, train.train_and_evaluate

  def load(data_config):
    loaded.append(real_load(data_config))
    return loaded[-1]

  def train_and_evaluate(config, run_dir, data=None):
    received.append((config.algorithm, data))
    return real_train(config, run_dir, data=data)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data_lib, "load", load)
    mp.setattr(train, "train_and_evaluate", train_and_evaluate)
    results = compare.run_comparison(tiny_digits_config(), NAMES, workdir)
  return workdir, results, loaded, received


def test_runs_each_algorithm_once_on_data_loaded_once(comparison):
  workdir, results, loaded, received = comparison
  assert len(loaded) == 1
  assert [name for name, _ in received] == NAMES
  assert all(data is loaded[0] for _, data in received)
  assert [r.algorithm for r in results] == NAMES
  for r in results:
    assert r.workdir == os.path.join(workdir, r.algorithm)
    assert os.path.exists(os.path.join(r.workdir, "summary.json"))
    assert [m["round"] for m in r.history] == [1, 2, 3]


def test_table_has_one_row_per_algorithm_with_the_summaries_numbers(comparison):
  workdir, results, _, _ = comparison
  table = compare.comparison_table(results)
  rows = table_rows(table)
  assert list(rows) == NAMES
  for r in results:
    s = r.summary
    expected = [
      f"{s[k]:.4f}"
      for k in (
        "test/acc_mean",
        "test/acc_weighted",
        "test/acc_std",
        "test/acc_p10",
        "best/acc_mean",
      )
    ]
    expected += [str(s["best/round"]), f"{s['wall_time_s']:.2f}"]
    assert rows[r.algorithm][:7] == expected
    if "comm/params_down_per_client" in s and "comm/params_up_per_client" in s:
      down, up = s["comm/params_down_per_client"], s["comm/params_up_per_client"]
      assert rows[r.algorithm][7].replace(",", "") in (
        f"{down:.0f} + {up:.0f}",
        f"{down:.1f} + {up:.1f}",
      )
    else:
      assert rows[r.algorithm][7] == compare.MISSING
  report = open(os.path.join(workdir, "comparison.md")).read()
  assert report.endswith(table)
  assert report.splitlines()[0].startswith("Produced by `run_comparison(")
  assert "dataset `digits_groups`, model `mlp`, 3 rounds" in report.splitlines()[0]


def test_plot_is_a_readable_png_with_a_line_per_algorithm(comparison, tmp_path):
  workdir, results, _, _ = comparison
  path = os.path.join(workdir, "comparison.png")
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  pixels = mpl_image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  fig = compare.plot_accuracy({r.algorithm: r.history for r in results}, str(tmp_path / "p.png"))
  (ax,) = fig.axes
  assert [line.get_label() for line in ax.get_lines()] == NAMES
  assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3]
  assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
  assert [t.get_text() for t in ax.get_legend().get_texts()] == NAMES


def test_table_formats_communication_and_missing_values():
  full = {
    "test/acc_mean": 0.96112,
    "test/acc_weighted": 0.5,
    "test/acc_std": 0.01,
    "test/acc_p10": 0.88889,
    "best/acc_mean": 0.95,
    "best/round": 180,
    "wall_time_s": 8.6123,
    "comm/params_down_per_client": 4810.0,
    "comm/params_up_per_client": 19240.5,
    "comm/params_per_round": 480100.0,
  }
  bare = {"test/acc_mean": 0.25, "wall_time_s": 1.0}
  rows = table_rows(
    compare.comparison_table([compare.Result("a", "", full, []), compare.Result("b", "", bare, [])])
  )
  assert rows["a"] == [
    "0.9611",
    "0.5000",
    "0.0100",
    "0.8889",
    "0.9500",
    "180",
    "8.61",
    "4,810 + 19,240.5",
    compare.MISSING,
  ]  # No gap/acc_mean: no gap.
  assert rows["b"] == ["0.2500"] + [compare.MISSING] * 5 + ["1.00"] + [compare.MISSING] * 2


VALID = re.escape(", ".join(algorithms.ALGORITHM_NAMES))


@pytest.mark.parametrize(
  "names, match",
  [
    (["fedmerge", "nope"], f"'nope'.*valid names: {VALID}"),
    ([], "No algorithm"),
    (["fedavg", "fedavg"], "more than once"),
  ],
)
def test_bad_algorithm_names_fail_before_any_work(names, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    compare.run_comparison(tiny_digits_config(), names, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "fedmerge_jax.compare", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_runs_writes_and_prints_the_table(tmp_path):
  args = [
    "--config=configs/default.py",
    "--algorithms=fedmerge,fedavg",
    f"--workdir={tmp_path}",
    "--config.num_rounds=2",
  ]
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr
  report = open(tmp_path / "comparison.md").read()
  first = report.splitlines()[0]
  assert f"`python -m fedmerge_jax.compare {' '.join(args)}`" in first
  assert "dataset `digits_groups`, model `mlp`, 2 rounds" in first
  table = report[report.index("| algorithm") :]
  assert result.stdout.endswith(table)
  assert list(table_rows(table)) == NAMES
  with open(tmp_path / "comparison.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  for name in NAMES:
    assert len(open(tmp_path / name / "metrics.jsonl").readlines()) == 1


def test_cli_rejects_bad_algorithms_and_config_keys(tmp_path):
  result = run_cli(
    "--config=configs/default.py", "--algorithms=fedmerge,nope", f"--workdir={tmp_path}"
  )
  assert result.returncode != 0
  assert "FATAL Flags parsing error" in result.stderr and "Traceback" not in result.stderr
  assert "'nope'" in result.stderr and ", ".join(algorithms.ALGORITHM_NAMES) in result.stderr
  result = run_cli("--config=configs/default.py", "--config.num_roundz=3", f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "unknown config key 'num_roundz'" in result.stderr
  assert not os.listdir(tmp_path)


def test_every_registered_algorithm_is_accepted():
  compare.check_algorithms(list(algorithms.ALGORITHM_NAMES))


def test_comparison_legend_covers_no_curve_and_equal_curves_differ(tmp_path):
  same = [{"round": r, "test/acc_mean": 0.5} for r in (1, 2, 3)]
  fig = compare.plot_accuracy(
    {"fedavg": same, "fedprox": same, "local": same}, str(tmp_path / "p.png")
  )
  ax = fig.axes[0]
  renderer = fig.canvas.get_renderer()
  legend = ax.get_legend().get_window_extent(renderer)
  assert not legend.overlaps(ax.get_window_extent(renderer))  # Outside the plotting area.
  styles = {(l.get_linestyle(), l.get_marker()) for l in ax.get_lines()}
  assert len(styles) == 3  # Three identical curves, three looks.
