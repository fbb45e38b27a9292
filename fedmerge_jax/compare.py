"""Runs several algorithms on one config and data, and tabulates and plots them side by side.

  python -m fedmerge_jax.compare --config=configs/default.py --algorithms=fedmerge,fedavg \
      --workdir=/tmp/compare [--config.num_rounds=50 ...]

Each algorithm runs in <workdir>/<algorithm>/ with the same config (only `algorithm`
changes), the same seeds and the same data, loaded once. Writes <workdir>/comparison.md
(a Markdown table) and <workdir>/comparison.png (test/acc_mean against rounds), and
prints the table.
"""

import copy
import json
import os
import shlex
import sys
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags

from fedmerge_jax import algorithms as algorithms_lib
from fedmerge_jax import cli
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import train

MISSING = "—"
TABLE_NOTE = (
    "Accuracies are fractions in [0, 1] (4 decimals), on each client's own test split: "
    "mean = unweighted over clients, weighted = pooled over examples, std = across "
    "clients, p10 = 10th percentile over clients (the bottom decile); all at the last "
    "round. Best = test acc mean at the evaluation with the lowest validation loss, and "
    "its round. Gap acc = mean over the last round's trained clients of the accuracy of "
    "the model each had just trained minus that of the model the server sends it next. Wall = train_and_evaluate's time in seconds, compilation included, data "
    f"loading excluded. Comm = floats sent per sampled client per round, down + up. "
    f"{MISSING} = not reported.")


class Result(NamedTuple):
  """One algorithm's run: its summary.json dict and its metrics.jsonl lines."""
  algorithm: str
  workdir: str
  summary: Dict[str, Any]
  history: List[Dict[str, Any]]


def check_algorithms(names: Sequence[str]) -> None:
  """Raises ValueError for an empty, repeated or unknown algorithm name, listing valid ones."""
  valid = algorithms_lib.ALGORITHM_NAMES
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ValueError(f"Unknown algorithm(s) {', '.join(map(repr, unknown))}; "
                     f"valid names: {', '.join(valid)}.")
  if not names:
    raise ValueError(f"No algorithm given; valid names: {', '.join(valid)}.")
  repeated = sorted({n for n in names if list(names).count(n) > 1})
  if repeated:
    raise ValueError(f"Algorithm(s) {', '.join(map(repr, repeated))} given more than once.")


def read_history(workdir: str) -> List[Dict[str, Any]]:
  """The per-evaluation metrics a run wrote to <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _acc(summary, key) -> str:
  value = summary.get(key)
  return MISSING if value is None else f"{value:.4f}"


def _count(value) -> str:
  return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _comm(summary) -> str:
  down = summary.get("comm/params_down_per_client")
  up = summary.get("comm/params_up_per_client")
  return MISSING if down is None or up is None else f"{_count(down)} + {_count(up)}"


def _gap(summary) -> str:
  """gap/acc_mean at the last evaluation, signed (gap.py): trained minus received accuracy."""
  value = summary.get("gap/acc_mean")
  return MISSING if value is None or value != value else f"{value:+.4f}"  # NaN: none trained.


def comparison_table(results: Sequence[Result]) -> str:
  """A Markdown table, one row per algorithm, of final, best and cost metrics."""
  header = ["algorithm", "test acc mean", "weighted", "std", "p10", "best acc mean",
            "best round", "wall (s)", "comm / client / round (down + up)", "gap acc"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    s = r.summary
    wall = s.get("wall_time_s")
    row = [r.algorithm, _acc(s, "test/acc_mean"), _acc(s, "test/acc_weighted"),
           _acc(s, "test/acc_std"), _acc(s, "test/acc_p10"), _acc(s, "best/acc_mean"),
           MISSING if s.get("best/round") is None else str(s["best/round"]),
           MISSING if wall is None else f"{wall:.2f}", _comm(s), _gap(s)]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def comparison_report(results: Sequence[Result], config, command: str) -> str:
  """comparison.md: the producing command and config, the units note, the table."""
  return (f"Produced by `{command}` (dataset `{config.data.name}`, model "
          f"`{config.model.name}`, {config.num_rounds} rounds, seed {config.seed}).\n\n"
          f"{TABLE_NOTE}\n\n{comparison_table(results)}")


def plot_accuracy(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str,
                  title: str = "Mean client test accuracy") -> Figure:
  """Saves test/acc_mean against rounds, one line per algorithm, as a PNG (Agg, no pyplot)."""
  fig = Figure(figsize=(6.4, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, history in histories.items():
    points = [(m["round"], m["test/acc_mean"]) for m in history if "test/acc_mean" in m]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
            label=name)
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy (unweighted mean over clients)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, format="png", dpi=120)
  return fig


def run_comparison(config, algorithms: Sequence[str], workdir: str,
                   data: Optional[data_lib.FederatedData] = None,
                   command: Optional[str] = None) -> List[Result]:
  """Runs each algorithm on `config` and `data` (loaded once), writes the table and plot."""
  check_algorithms(algorithms)
  config = config_lib.resolve(config)
  data = data if data is not None else data_lib.load(config.data)
  os.makedirs(workdir, exist_ok=True)
  results = []
  for i, name in enumerate(algorithms):
    run_config = copy.deepcopy(config)
    run_config.algorithm = name
    run_dir = os.path.join(workdir, name)
    logging.info("Comparison %d/%d: %s in %s", i + 1, len(algorithms), name, run_dir)
    summary = train.train_and_evaluate(run_config, run_dir, data=data)
    results.append(Result(name, run_dir, summary, read_history(run_dir)))
  command = command or (f"run_comparison(config, algorithms={list(algorithms)!r}, "
                        f"workdir={workdir!r})")
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(comparison_report(results, config, command))
  plot_accuracy({r.algorithm: r.history for r in results},
                os.path.join(workdir, "comparison.png"),
                title=f"Mean client test accuracy on {config.data.name} ({config.model.name})")
  return results


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_list("algorithms", list(algorithms_lib.ALGORITHM_NAMES),
                  f"Comma-separated algorithms to compare, from {algorithms_lib.ALGORITHM_NAMES}.")
flags.DEFINE_string("workdir", "/tmp/fedmerge_compare",
                    "Where each <algorithm>/ run and comparison.md/.png are written.")
flags.mark_flags_as_required(["config"])


def _valid_algorithms(names) -> bool:
  try:
    check_algorithms(names)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("algorithms", _valid_algorithms)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  command = shlex.join(["python", "-m", "fedmerge_jax.compare", *sys.argv[1:]])
  try:
    results = run_comparison(FLAGS.config, FLAGS.algorithms, FLAGS.workdir, command=command)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  print(comparison_table(results), end="", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
