"""Plots of a finished (or running) experiment, written as PNGs into its workdir.

Reads what `train.train_and_evaluate` writes (metrics.jsonl, summary.json, clients.npz)
and draws on matplotlib's Agg canvas, so no display is needed (servers, Colab, tests):

  python -m fedmerge_jax.plot --workdir=/tmp/fedmerge_default
"""

import json
import os

from absl import app
from absl import flags
import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
import numpy as np

from fedmerge_jax import cli
from fedmerge_jax import metric_writers


def dominant_model_ari(merging_weights, groups) -> float:
  """How well the global models recover the hidden client groups.

  The adjusted Rand index between each client's dominant global model (the argmax of its
  merging-weight row) and its known group: 1.0 when the models split the clients exactly
  as the groups do (whatever the numbering), about 0 when no better than chance.
  """
  from sklearn.metrics import adjusted_rand_score  # pylint: disable=g-import-not-at-top

  # Imported here: ~1 s that only runs with known groups need.
  return float(adjusted_rand_score(np.asarray(groups), np.argmax(merging_weights, axis=1)))


def read_metrics(workdir: str):
  """metrics.jsonl's rows and summary.json ({} if absent); a clear error if never run."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: run `python launch.py --config=configs/default.py "
      f"--workdir={workdir}` first (or point --workdir at a run's workdir)."
    )
  metrics = metric_writers.read_jsonl(path)  # A torn last line (a killed run) is left out.
  summary_path = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary_path):
    return metrics, {}
  with open(summary_path) as f:
    return metrics, json.load(f)


def read_clients(workdir: str):
  """clients.npz (per-client results at the latest evaluation) as a dict; None if absent."""
  path = os.path.join(workdir, "clients.npz")
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as clients:
    return {k: clients[k] for k in clients.files}


RAN = "ran"  # config.json's record of the data and model that ran, by name.


def what_ran(config, data, model=None) -> dict:
  """{'data': name, 'model': name} of what a run uses: `data.name` (a user's own
  FederatedData's, 'custom' unless given) and the config's model name, or the class name of
  a user's own `model` (train_and_evaluate's `model=`)."""
  return {"data": data.name, "model": config.model.name if model is None else type(model).__name__}


def ran_names(config: dict) -> dict:
  """What a config.json says ran: its `ran` record, else (older runs) its config's names."""
  recorded = config.get(RAN) or {}
  return {
    "data": recorded.get("data", config.get("data", {}).get("name", "?")),
    "model": recorded.get("model", config.get("model", {}).get("name")),
  }


def run_name(workdir: str, clients=None) -> str:
  """'fedmerge, K = 4, digits_groups, mlp' from the workdir's config.json ('' if it has
  none): the data and model that ran (a user's own too: `ran_names`).

  K is the number of global models the run actually keeps (the merging weights' columns;
  1 for single-model methods such as FedAvg), not the config's value.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    config = json.load(f)
  k = 1
  if clients is not None and "merging_weights" in clients:
    k = int(np.shape(clients["merging_weights"])[1])
  ran = ran_names(config)
  return ", ".join(
    [f"{config.get('algorithm', '?')}", f"K = {k}", ran["data"]]
    + ([ran["model"]] if ran["model"] else [])
  )


def _titled(title: str, run: str) -> str:
  return f"{title}\n{run}" if run else title


def _at(round_index) -> str:
  return "" if round_index is None else f" at round {round_index}"


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path


def accuracy_figure(metrics, summary, run: str = "") -> Figure:
  """Test accuracy (mean and 10th percentile over clients) against rounds; best round marked.

  Markers on every evaluation, so a run with one evaluation still shows its point (and
  its value); the two curves differ in dash and marker, so equal curves stay visible.
  """
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  rounds = sorted({m["round"] for m in metrics})
  for key, label, style in (
    ("test/acc_mean", "test accuracy, mean over clients", "-o"),
    ("test/acc_p10", "test accuracy, 10th percentile", "--s"),
  ):
    rows = [m for m in metrics if key in m]
    ax.plot([m["round"] for m in rows], [m[key] for m in rows], style, markersize=4, label=label)
    if len(rows) == 1:
      ax.annotate(
        f"{rows[0][key]:.3f}",
        (rows[0]["round"], rows[0][key]),
        textcoords="offset points",
        xytext=(6, 4),
      )
  if "best/round" in summary:
    ax.axvline(
      summary["best/round"],
      color="gray",
      linestyle=":",
      label=f"best by validation loss (round {summary['best/round']})",
    )
  if len(rounds) == 1:  # One evaluation: centre it instead of a degenerate axis.
    ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set(
    xlabel="round",
    ylabel="accuracy",
    ylim=(0, 1.02),
    title=_titled("Personalised test accuracy", run),
  )
  ax.grid(alpha=0.3)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="small")  # Off the curves.
  return fig


def plot_accuracy(metrics, summary, path: str, run: str = "") -> str:
  return _save(accuracy_figure(metrics, summary, run), path)


def share_zero(*axes) -> None:
  """Sets the y-limits of `axes` (twins) so that 0 sits at the same height on each, every
  axis still showing all its data (and 0) with a 5% margin."""
  spans = []
  for ax in axes:
    lo, hi = ax.dataLim.intervaly if ax.has_data() else (0.0, 0.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi, -lo) or 1.0
    spans.append((scale, -lo / scale, hi / scale))
  below = max(b for _, b, _ in spans) * 1.05
  above = max(a for _, _, a in spans) * 1.05
  below, above = (below, above) if below + above > 0 else (1.0, 1.0)
  for ax, (scale, _, _) in zip(axes, spans):
    ax.set_ylim(-below * scale, above * scale)


def plot_gap(metrics, path: str, run: str = "") -> str:
  """The local-global gap (gap.py) against rounds: accuracy gap (left axis), loss gap
  (right), the two axes' zeros level (one line marks both)."""
  rows = [m for m in metrics if "gap/acc_mean" in m]
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  rounds = [m["round"] for m in rows]
  ax.plot(
    rounds,
    [m["gap/acc_mean"] for m in rows],
    marker=".",
    color="C0",
    label="accuracy: trained - received",
  )
  ax.axhline(0, color="gray", linewidth=0.8)
  ax.set(
    xlabel="round",
    ylabel="accuracy gap (mean over trained clients)",
    title=_titled("Local-global gap on the clients' own test data", run),
  )
  loss_ax = ax.twinx()
  loss_ax.plot(
    rounds,
    [m["gap/loss_mean"] for m in rows],
    marker=".",
    color="C1",
    label="loss: received - trained",
  )
  loss_ax.set_ylabel("loss gap")
  share_zero(ax, loss_ax)
  handles = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
  ax.legend(handles=handles, loc="upper right")
  ax.grid(alpha=0.3)
  return _save(fig, path)


def client_accuracy_figure(test_acc, round_index=None, run: str = "") -> Figure:
  """Histogram of per-client test accuracy (clients without test examples left out)."""
  acc = np.asarray(test_acc, np.float64)
  acc = acc[np.isfinite(acc)]
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  ax.hist(acc, bins=np.linspace(0, 1, 21), edgecolor="white")
  if acc.size:
    ax.axvline(acc.mean(), color="black", linestyle="--", label=f"mean {acc.mean():.3f}")
    ax.legend(loc="upper left")
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set(
    xlabel="test accuracy",
    ylabel="clients",
    title=_titled(f"Per-client test accuracy{_at(round_index)} ({acc.size} clients)", run),
  )
  return fig


def plot_client_accuracy(test_acc, path: str, round_index=None, run: str = "") -> str:
  return _save(client_accuracy_figure(test_acc, round_index, run), path)


def merging_weights_figure(weights, groups=None, round_index=None, run: str = "") -> Figure:
  """Clients x K heatmap, rows grouped by dominant global model; known groups as a side
  strip, with a legend naming each group's colour."""
  weights = np.asarray(weights)
  dominant = np.argmax(weights, axis=1)
  order = np.lexsort((-weights[np.arange(len(weights)), dominant], dominant))
  fig = Figure(figsize=(6, 5))
  title = f"Merging weights{_at(round_index)}"
  if groups is None:
    ax = fig.subplots()
  else:
    strip, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 12], "wspace": 0.05})
    groups = np.asarray(groups)
    vmax = max(9, groups.max())
    strip.imshow(
      groups[order][:, None],
      aspect="auto",
      cmap="tab10",
      vmin=0,
      vmax=vmax,
      interpolation="nearest",
    )
    strip.set(xticks=[], yticks=[], xlabel="group", ylabel="clients (by dominant model)")
    cmap = matplotlib.colormaps["tab10"]
    handles = [Patch(color=cmap(g / vmax), label=f"group {g}") for g in np.unique(groups)]
    fig.legend(
      handles=handles,
      loc="upper center",
      bbox_to_anchor=(0.45, 0.0),
      ncol=min(len(handles), 6),
      title="known client group (left strip)",
      fontsize="small",
    )
    title += f"; ARI with known groups {dominant_model_ari(weights, groups):.2f}"
  image = ax.imshow(
    weights[order], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
  )
  ax.set_xticks(range(weights.shape[1]))
  ax.set(xlabel="global model k", title=_titled(title, run))
  if groups is None:
    ax.set_ylabel("clients (by dominant model)")
  else:
    ax.set_yticks([])
  fig.colorbar(image, ax=ax, label="merging weight")
  return fig


def plot_merging_weights(weights, path: str, groups=None, round_index=None, run: str = "") -> str:
  return _save(merging_weights_figure(weights, groups, round_index, run), path)


def write_plots(workdir: str) -> dict:
  """Writes every plot the workdir's files allow; returns {name: path of its PNG}."""
  metrics, summary = read_metrics(workdir)
  out = lambda name: os.path.join(workdir, f"{name}.png")
  clients = read_clients(workdir)
  run = run_name(workdir, clients)
  paths = {"accuracy": plot_accuracy(metrics, summary, out("accuracy"), run)}
  if any("gap/acc_mean" in m for m in metrics):
    paths["gap"] = plot_gap(metrics, out("gap"), run)
  if clients is not None:
    round_index = int(clients["round"]) if "round" in clients else None
    paths["client_accuracy"] = plot_client_accuracy(
      clients["test_acc"], out("client_accuracy"), round_index, run
    )
    if "merging_weights" in clients:
      paths["merging_weights"] = plot_merging_weights(
        clients["merging_weights"], out("merging_weights"), clients.get("groups"), round_index, run
      )
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  cli.check_workdir(workdir)
  try:
    paths = write_plots(workdir)
  except FileNotFoundError as e:
    cli.fatal(str(e))
  except KeyboardInterrupt:
    cli.fatal(f"interrupted; {workdir} is unchanged but for the plots already written.")
  print("\n".join(paths.values()))
  clients = read_clients(workdir)
  if clients is not None and {"merging_weights", "groups"} <= clients.keys():
    ari = dominant_model_ari(clients["merging_weights"], clients["groups"])
    print(f"dominant-model ARI with the known groups: {ari:.4f}")


if __name__ == "__main__":
  # Defined here, not on import, so that importing this module never clashes with
  # launch.py's own --workdir.
  flags.DEFINE_string(
    "workdir", None, "A run's workdir (the --workdir given to launch.py).", required=True
  )
  app.run(main, flags_parser=cli.parse_flags)  # One-line flag errors; quiet logs.
