"""Plots of a workdir: valid PNGs from the files a run writes, group recovery (ARI), the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from fedmerge_jax import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(workdir, weights=True, groups=True, num_clients=12, k=3):
  """A synthetic workdir in the format train_and_evaluate writes."""
  rng = np.random.default_rng(0)
  with open(workdir / "metrics.jsonl", "w") as f:
    for r in (10, 20, 30):
      f.write(
        json.dumps(
          {
            "round": r,
            "train/loss": 1.0 / r,
            "test/acc_mean": 0.5 + r / 100,
            "test/acc_weighted": 0.5 + r / 100,
            "test/acc_p10": 0.3 + r / 100,
            "test/acc_std": 0.1,
            "val/loss": 1.0 / r,
          }
        )
        + "\n"
      )
  json.dump(
    {"round": 30, "test/acc_mean": 0.8, "best/round": 20, "best/acc_mean": 0.7},
    open(workdir / "summary.json", "w"),
  )
  arrays = {
    "round": np.int64(30),
    "client_ids": np.array([f"c{i}" for i in range(num_clients)]),
    "test_acc": np.where(np.arange(num_clients) == 0, np.nan, rng.uniform(0.5, 1.0, num_clients)),
  }
  if weights:
    arrays["merging_weights"] = rng.dirichlet(np.ones(k), num_clients)
  if groups:
    arrays["groups"] = np.arange(num_clients) % k
  np.savez(workdir / "clients.npz", **arrays)
  return arrays


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  with Image.open(path) as image:
    assert image.format == "PNG"
    width, height = image.size
    assert 200 <= width <= 2000 and 200 <= height <= 2000, image.size


def test_write_plots_writes_three_valid_pngs(tmp_path):
  write_run(tmp_path)
  paths = plot.write_plots(str(tmp_path))
  assert set(paths) == {"accuracy", "client_accuracy", "merging_weights"}
  for name, path in paths.items():
    assert path == str(tmp_path / f"{name}.png")
    assert_png(path)


def test_merging_weights_plot_skipped_without_weights(tmp_path):
  write_run(tmp_path, weights=False, groups=False)
  paths = plot.write_plots(str(tmp_path))
  assert set(paths) == {"accuracy", "client_accuracy"}
  assert not (tmp_path / "merging_weights.png").exists()


def test_only_accuracy_plot_without_clients_file(tmp_path):
  write_run(tmp_path)
  os.remove(tmp_path / "clients.npz")
  os.remove(tmp_path / "summary.json")  # A run still in progress has none yet.
  paths = plot.write_plots(str(tmp_path))
  assert list(paths) == ["accuracy"]
  assert_png(paths["accuracy"])


def test_merging_weights_plot_without_groups(tmp_path):
  write_run(tmp_path, groups=False)
  assert_png(plot.write_plots(str(tmp_path))["merging_weights"])


def test_ari_is_one_for_perfect_recovery_up_to_relabelling():
  groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  relabel = np.array([2, 0, 3, 1])  # Group g is served by global model relabel[g].
  weights = np.full((8, 4), 0.1)
  weights[np.arange(8), relabel[groups]] = 0.7
  assert plot.dominant_model_ari(weights, groups) == pytest.approx(1.0)


def test_ari_is_low_when_groups_are_not_recovered():
  groups = np.arange(40) % 4
  one_model = np.tile([0.1, 0.7, 0.1, 0.1], (40, 1))  # Every client prefers model 1.
  assert plot.dominant_model_ari(one_model, groups) == pytest.approx(0.0)
  random = np.random.default_rng(0).dirichlet(np.ones(4), 40)
  assert abs(plot.dominant_model_ari(random, groups)) < 0.3
  half = np.eye(4)[np.where(np.arange(40) < 20, groups, (groups + 1) % 2)]
  assert 0.0 < plot.dominant_model_ari(half, groups) < 1.0


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "fedmerge_jax.plot", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_writes_plots_and_prints_paths_and_ari(tmp_path):
  write_run(tmp_path)
  result = run_cli(f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  for name in ("accuracy", "client_accuracy", "merging_weights"):
    assert str(tmp_path / f"{name}.png") in result.stdout
    assert_png(tmp_path / f"{name}.png")
  assert "ARI" in result.stdout


def test_missing_metrics_gives_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl.*python launch\.py .*--workdir="):
    plot.write_plots(str(tmp_path))
  result = run_cli(f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "metrics.jsonl" in result.stderr and "python launch.py" in result.stderr
  assert "Traceback" not in result.stderr


def test_titles_name_the_run(tmp_path):
  arrays = write_run(tmp_path, k=3)
  json.dump(
    {"algorithm": "fedmerge", "num_global_models": 3, "data": {"name": "femnist"}},
    open(tmp_path / "config.json", "w"),
  )
  assert plot.run_name(str(tmp_path), arrays) == "fedmerge, K = 3, femnist"
  json.dump(
    {"algorithm": "fedavg", "num_global_models": 4, "data": {"name": "femnist"}},
    open(tmp_path / "config.json", "w"),
  )
  assert plot.run_name(str(tmp_path), {}) == "fedavg, K = 1, femnist"  # What it kept.
  fig = plot.accuracy_figure([{"round": 1, "test/acc_mean": 0.5}], {}, "fedavg, K = 1, femnist")
  assert fig.axes[0].get_title().endswith("fedavg, K = 1, femnist")


def test_every_plot_of_a_workdir_names_the_run(tmp_path, monkeypatch):
  write_run(tmp_path, k=3)
  json.dump(
    {"algorithm": "ifca", "num_global_models": 3, "data": {"name": "femnist"}},
    open(tmp_path / "config.json", "w"),
  )
  titles = []
  monkeypatch.setattr(
    plot,
    "_save",
    lambda fig, path: titles.append(" ".join(ax.get_title() for ax in fig.axes)) or path,
  )
  plot.write_plots(str(tmp_path))
  assert len(titles) == 3 and all("ifca, K = 3, femnist" in t for t in titles), titles


def test_a_single_evaluation_draws_its_point_and_value():
  fig = plot.accuracy_figure([{"round": 5, "test/acc_mean": 0.61, "test/acc_p10": 0.4}], {})
  ax = fig.axes[0]
  for line in ax.get_lines()[:2]:
    assert line.get_marker() not in (None, "", "None", ".")  # A visible point, not a dot.
  assert ax.get_xlim() == (4, 6)  # Centred on the one round.
  assert {t.get_text() for t in ax.texts} == {"0.610", "0.400"}


def test_group_strip_has_a_legend():
  weights = np.eye(3)[[0, 1, 2, 0]]
  fig = plot.merging_weights_figure(weights, groups=np.array([0, 1, 2, 0]))
  (legend,) = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == ["group 0", "group 1", "group 2"]
  assert not plot.merging_weights_figure(weights).legends  # No groups, no strip, no legend.
