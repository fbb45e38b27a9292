"""Plots and records name what ran: a user's own data and model in config.json, the plot
titles and comparison.md; a sweep's plot names its values; gap.png's two axes share a zero;
error bars and bands say what they are and stay within [0, 1]."""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
from matplotlib.collections import LineCollection, PolyCollection
import numpy as np
import pytest

from conftest import make_federation, tiny_base_config
from fedmerge_jax import compare
from fedmerge_jax import config as config_lib
from fedmerge_jax import plot
from fedmerge_jax import train


class OwnNet(nn.Module):
  """A user's own model (not in the registry)."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1).astype(jnp.float32)))
    return nn.Dense(self.num_classes, name="head")(x)


# The suite's runs skip plots (conftest): this module's runs draw them, titles checked.
pytestmark = pytest.mark.plots


@pytest.fixture(scope="module")
def own_comparison(tmp_path_factory):
  """compare's run of FedMerge on a user's own data and model (config: digits_groups, mlp)."""
  workdir = str(tmp_path_factory.mktemp("own"))
  config = tiny_base_config()
  config.update(num_rounds=1, tensorboard=False, checkpoint_every=0)
  config.data.name = "digits_groups"
  data = make_federation()
  titles = []
  original_save = plot._save

  def save(fig, path):
    titles.append((os.path.basename(path), " ".join(ax.get_title() for ax in fig.axes)))
    return original_save(fig, path)

  plot._save = save
  try:
    results = compare.run_comparison(config, ["fedmerge"], workdir, data=data, model=OwnNet())
  finally:
    plot._save = original_save
  return workdir, config, data, results, titles


def test_config_json_and_every_plot_title_name_the_users_data_and_model(own_comparison):
  workdir, _, _, results, titles = own_comparison
  recorded = json.load(open(os.path.join(results[0].workdir, "config.json")))
  assert recorded[plot.RAN] == {"data": "custom", "model": "OwnNet"}
  assert recorded["data"]["name"] == "digits_groups"  # The config itself, as given.
  assert {name for name, _ in titles} == {
    "accuracy.png",
    "gap.png",
    "client_accuracy.png",
    "merging_weights.png",
  }
  for name, title in titles:
    assert "fedmerge, K = 3, custom, OwnNet" in title, (name, title)
  report = open(os.path.join(workdir, "comparison.md")).read()
  assert "(dataset `custom`, model `OwnNet`, 1 rounds, seed 0)." in report.splitlines()[0]


def test_a_finished_run_of_own_data_is_reused(own_comparison, monkeypatch):
  workdir, config, data, results, _ = own_comparison
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("rerun"))
  again = compare.run_comparison(config, ["fedmerge"], workdir, data=data, model=OwnNet())
  assert again[0].summary == results[0].summary


def fake_results(tmp_path, values, metric_values):
  """Results of a sweep over num_global_models = `values`, 3 seeds each, no run files."""
  results = []
  for k, per_seed in zip(values, metric_values):
    for seed, v in enumerate(per_seed):
      history = [{"round": r, "test/acc_mean": min(1.0, v * r / 2)} for r in (1, 2)]
      results.append(
        compare.Result(
          "fedmerge",
          str(tmp_path / f"k{k}_{seed}"),
          {"test/acc_mean": v},
          history,
          (("num_global_models", k),),
          seed,
        )
      )
  return results


def test_a_sweeps_title_and_report_name_the_swept_values_not_the_configs(tmp_path):
  config = config_lib.resolve(tiny_base_config())  # num_global_models = 3.
  results = fake_results(tmp_path, [1, 2, 4], [[0.5] * 3] * 3)
  title = compare.comparison_title(results, config)
  assert title == (
    "Mean client test accuracy: digits_groups, mlp, swept num_global_models = 1, 2, 4"
  )
  assert (
    "swept num_global_models = 1, 2, 4)."
    in compare.comparison_report(results, config, "cmd").splitlines()[0]
  )
  no_sweep = [r._replace(setting=()) for r in results[:3]]
  assert compare.comparison_title(no_sweep, config).endswith("mlp, num_global_models = 3")


def test_error_bars_and_bands_say_what_they_are_and_stay_within_0_and_1(tmp_path):
  results = fake_results(tmp_path, [1, 2], [[0.99, 0.7, 1.0], [0.02, 0.3, 0.0]])
  ax = compare.plot_sweep(results, "test/acc_mean", str(tmp_path / "sweep.png")).axes[0]
  assert "error bars: ± one std over seeds (clipped to [0, 1])" in ax.get_title()
  bars = sorted(
    tuple(np.asarray(seg)[:, 1])
    for c in ax.collections
    if isinstance(c, LineCollection)
    for seg in c.get_segments()
  )
  (m1, s1), (m2, s2) = (
    (np.mean(v), np.std(v, ddof=1)) for v in ([0.99, 0.7, 1.0], [0.02, 0.3, 0.0])
  )
  # Each bar is ± std, cut at 1 above a mean near 1 and at 0 below a mean near 0 only.
  np.testing.assert_allclose(bars, [(0.0, m2 + s2), (m1 - s1, 1.0)], atol=1e-12)
  curves = {"a": [r.history for r in results[:3]], "b": [r.history for r in results[3:]]}
  ax = compare.plot_accuracy(curves, str(tmp_path / "curves.png")).axes[0]
  assert "band: ± one std over seeds (clipped to [0, 1])" in ax.get_title()
  bands = np.concatenate(
    [p.vertices for c in ax.collections if isinstance(c, PolyCollection) for p in c.get_paths()]
  )
  assert bands[:, 1].min() >= 0.0 and bands[:, 1].max() <= 1.0


def test_gap_plot_names_the_run_and_its_two_axes_share_a_zero(tmp_path, monkeypatch):
  metrics = [
    {"round": r, "gap/acc_mean": a, "gap/loss_mean": l}
    for r, a, l in ((1, -0.1, 0.5), (2, 0.05, 1.2), (3, 0.3, 2.0))
  ]
  figures = []
  monkeypatch.setattr(plot, "_save", lambda fig, path: figures.append(fig) or path)
  plot.plot_gap(metrics, str(tmp_path / "gap.png"), "fedmerge, K = 4, custom, OwnNet")
  acc_ax, loss_ax = figures[0].axes
  assert acc_ax.get_title().endswith("\nfedmerge, K = 4, custom, OwnNet")
  zero_height = lambda ax: -ax.get_ylim()[0] / (ax.get_ylim()[1] - ax.get_ylim()[0])
  assert zero_height(acc_ax) == pytest.approx(zero_height(loss_ax))
  assert acc_ax.get_ylim()[0] < -0.1 and acc_ax.get_ylim()[1] > 0.3  # All data shown.
  assert loss_ax.get_ylim()[0] < 0 and loss_ax.get_ylim()[1] > 2.0
