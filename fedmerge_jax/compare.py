"""Runs several algorithms on one config and data, over seeds and swept settings; tabulates, plots.

  python -m fedmerge_jax.compare --config=configs/default.py --algorithms=fedmerge,fedavg \
      --workdir=/tmp/compare [--seeds=0,1,2] [--sweep=num_global_models=1,2,4 ...] \
      [--replicas=auto|N] [--config.num_rounds=50 ...]

Each algorithm runs in <workdir>/[<setting>/]<algorithm>/[seed_<s>/] with the same config
(only `algorithm`, the swept fields and `seed` change) and the same data, loaded once per
data config (`--seeds` change `config.seed`, never `data.seed`). Writes
<workdir>/comparison.md (a Markdown table: one row per setting and algorithm, mean ± std
over seeds where there are several), <workdir>/comparison.png (test/acc_mean against
rounds, the mean with a ±std band) and, with --sweep, <workdir>/comparison_sweep.png (a
metric against the first swept field), and prints the table. A run whose summary.json is
newer than its config.json, whose config.json is this run's config and whose
experiment.json records this data and model, is reused; any other run is (re)started, and
train_and_evaluate resumes it from its checkpoints, or stops in one line if the folder holds
another experiment (--start_over deletes those runs' results and starts them over).
Runs that differ only in seed and value hyper-parameters run --replicas at a time as one
program (`replica_groups`, fedmerge_jax/replicas.py); each still writes its own folder.
"""

import copy
import itertools
import json
import os
import shlex
import statistics
import sys
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags
import numpy as np

from fedmerge_jax import algorithms as algorithms_lib
from fedmerge_jax import cli
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import failures
from fedmerge_jax import fingerprint as fingerprint_lib
from fedmerge_jax import hyperparams
from fedmerge_jax import metric_writers
from fedmerge_jax import plot
from fedmerge_jax import replicas as replicas_lib
from fedmerge_jax import train

MISSING = "—"
TABLE_NOTE = (
  "Accuracies are fractions in [0, 1] (4 decimals), on each client's own test split: "
  "mean = unweighted over clients, weighted = pooled over examples, std = across "
  "clients, p10 = 10th percentile over clients (the bottom decile); all at the last "
  "round. Best = test acc mean at the evaluation with the lowest validation loss, and "
  "its round. Gap acc = mean over the last round's trained clients of the accuracy of "
  "the model each had just trained minus that of the model the server sends it next. "
  "Wall = train_and_evaluate's time in seconds, compilation included, data "
  f"loading excluded. Comm = floats sent per sampled client per round, down + up. "
  f"{MISSING} = not reported."
)
SEEDS_NOTE = (
  "With several seeds each cell is mean ± std over the seeds (sample standard "
  "deviation, n − 1); the seeds change model init, client sampling and local "
  "shuffling, not the data."
)
METRIC_COLUMNS = (
  ("test acc mean", "test/acc_mean"),
  ("weighted", "test/acc_weighted"),
  ("std", "test/acc_std"),
  ("p10", "test/acc_p10"),
  ("best acc mean", "best/acc_mean"),
)

Setting = Tuple[Tuple[str, Any], ...]  # ((config path, value), ...) of one sweep point.


class SweepError(ValueError):
  """A --sweep, --seeds or --sweep_metric that cannot work, with the form that does."""


class Result(NamedTuple):
  """One run: its summary.json dict, its metrics.jsonl lines, its sweep setting and seed."""

  algorithm: str
  workdir: str
  summary: Dict[str, Any]
  history: List[Dict[str, Any]]
  setting: Setting = ()
  seed: Optional[int] = None


def check_algorithms(names: Sequence[str]) -> None:
  """Raises ValueError for an empty, repeated or unknown algorithm name, listing valid ones."""
  valid = algorithms_lib.registered_names()
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ValueError(
      f"Unknown algorithm(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(valid)}."
    )
  if not names:
    raise ValueError(f"No algorithm given; valid names: {', '.join(valid)}.")
  repeated = sorted({n for n in names if list(names).count(n) > 1})
  if repeated:
    raise ValueError(f"Algorithm(s) {', '.join(map(repr, repeated))} given more than once.")


def parse_seeds(values: Sequence[Any]) -> List[int]:
  """--seeds=0,1,2 -> [0, 1, 2]; ValueError for a non-integer or repeated seed."""
  try:
    seeds = [int(str(v).strip()) for v in values]
  except ValueError:
    raise SweepError(
      f"--seeds={','.join(map(str, values))}: seeds must be integers, e.g. --seeds=0,1,2."
    ) from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise SweepError(
      f"--seeds={','.join(map(str, values))}: give distinct integer seeds, e.g. --seeds=0,1,2."
    )
  return seeds


def _typed(path: str, text: str, like: Any) -> Any:
  """`text` as the type of the config field's current value `like`."""
  text = text.strip()
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise SweepError(f"--sweep {path}: {text!r} is not true or false.")
    return text.lower() in ("true", "1")
  if isinstance(like, (int, float)):
    try:
      value = float(text)
    except ValueError:
      raise SweepError(f"--sweep {path}: {text!r} is not a number.") from None
    if isinstance(like, int):
      if not value.is_integer():
        raise SweepError(f"--sweep {path}: {text!r} is not an integer.")
      return int(value)
    return value
  if isinstance(like, str):
    return text
  raise SweepError(
    f"--sweep {path}: fields of type {type(like).__name__} cannot be swept "
    "(numbers, booleans and strings can)."
  )


def parse_sweeps(specs: Sequence[str], config) -> List[Tuple[str, List[Any]]]:
  """['num_global_models=1,2,4', ...] -> [(path, [typed values]), ...] for `config`'s fields."""
  fields = dict(config_lib.flatten(config_lib.base_config()))
  fields.update(config_lib.flatten(config))
  sweeps = []
  for spec in specs:
    path, sep, values = spec.partition("=")
    path = path.strip()
    if not sep or not values.strip():
      raise SweepError(
        f"--sweep={spec}: expected <config field>=<value>,<value>,... e.g. "
        "--sweep=num_global_models=1,2,4."
      )
    if path in ("algorithm", "seed"):
      raise SweepError(
        f"--sweep={spec}: use --{'algorithms' if path == 'algorithm' else 'seeds'} to vary {path}."
      )
    if path not in fields:
      raise SweepError(
        f"--sweep={spec}: unknown config field {path!r} (every field is "
        "listed in fedmerge_jax/config.py)."
      )
    if path in (p for p, _ in sweeps):
      raise SweepError(f"--sweep={spec}: {path} is swept twice; give its values once.")
    sweeps.append((path, [_typed(path, v, fields[path]) for v in values.split(",")]))
  return sweeps


def sweep_settings(sweeps: Sequence[Tuple[str, Sequence[Any]]]) -> List[Setting]:
  """Every combination of the swept values (the grid), first field slowest; [()] if none."""
  paths = [p for p, _ in sweeps]
  return [tuple(zip(paths, values)) for values in itertools.product(*(v for _, v in sweeps))]


def setting_name(setting: Setting) -> str:
  """'num_global_models=2,client_lr=0.1': the setting's folder name and label."""
  return ",".join(f"{path}={value}" for path, value in setting).replace(os.sep, "_")


def configured(config, algorithm: str, setting: Setting, seed: Optional[int]):
  """`config` with this run's algorithm, swept values and seed, resolved and validated."""
  run_config = copy.deepcopy(config)
  with run_config.unlocked():
    run_config.algorithm = algorithm
    if seed is not None:
      run_config.seed = seed
    if setting:
      run_config.update_from_flattened_dict(dict(setting))
  return config_lib.resolve(run_config)


def run_directory(workdir: str, algorithm: str, setting: Setting, seed: Optional[int]) -> str:
  parts = [workdir] + ([setting_name(setting)] if setting else []) + [algorithm]
  return os.path.join(*parts, *([f"seed_{seed}"] if seed is not None else []))


def finished_summary(
  run_dir: str, config, experiment: Optional[Dict[str, Any]] = None
) -> Optional[Dict[str, Any]]:
  """The summary of a finished run of exactly `config` in `run_dir`, else None.

  Finished: summary.json is newer than config.json (train_and_evaluate writes config.json
  when it starts and summary.json when it ends), config.json is `config`, and (given
  `experiment`, a `fingerprint.fingerprint`) experiment.json records the same data and model.
  """
  summary_path, config_path = (os.path.join(run_dir, f) for f in ("summary.json", "config.json"))
  if not (os.path.exists(summary_path) and os.path.exists(config_path)):
    return None
  if os.path.getmtime(summary_path) < os.path.getmtime(config_path):
    return None  # Restarted after it finished, and stopped before finishing again.
  with open(config_path) as f:
    old = dict(config_lib.flatten({k: v for k, v in json.load(f).items() if k != plot.RAN}))
  if old != dict(config_lib.flatten(json.loads(config.to_json()))):
    return None
  recorded = fingerprint_lib.recorded(run_dir)
  if experiment is not None and (
    recorded is None or "data" not in recorded or fingerprint_lib.differences(recorded, experiment)
  ):
    return None
  with open(summary_path) as f:
    return json.load(f)


def read_history(workdir: str) -> List[Dict[str, Any]]:
  """The per-evaluation metrics a run wrote to <workdir>/metrics.jsonl."""
  return metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _count(value) -> str:
  return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _comm(summary) -> str:
  down = summary.get("comm/params_down_per_client")
  up = summary.get("comm/params_up_per_client")
  return MISSING if down is None or up is None else f"{_count(down)} + {_count(up)}"


def _cell(summaries: Sequence[Mapping[str, Any]], key: str, spec: str) -> str:
  """One value formatted with `spec`, or mean ± std over several; — if any lacks it."""
  values = [s.get(key) for s in summaries]
  if not values or any(v is None or v != v for v in values):  # v != v: NaN.
    return MISSING
  if len(values) == 1:
    return format(values[0], spec)
  return f"{format(statistics.fmean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def grouped(results: Sequence[Result]) -> List[List[Result]]:
  """Results of one setting and algorithm together (their seeds), in first-seen order."""
  groups: Dict[Tuple[Setting, str], List[Result]] = {}
  for r in results:
    groups.setdefault((r.setting, r.algorithm), []).append(r)
  return list(groups.values())


def comparison_table(results: Sequence[Result]) -> str:
  """A Markdown table, one row per setting and algorithm, of final, best and cost metrics.

  A row of several seeds shows mean ± std over them; comm is per run (equal over seeds).
  """
  swept = [path for path, _ in results[0].setting] if results else []
  header = (
    swept
    + ["algorithm"]
    + [name for name, _ in METRIC_COLUMNS]
    + ["best round", "wall (s)", "comm / client / round (down + up)", "gap acc"]
  )
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for group in grouped(results):
    summaries = [r.summary for r in group]
    comms = {_comm(s) for s in summaries}
    row = [str(value) for _, value in group[0].setting] + [group[0].algorithm]
    row += [_cell(summaries, key, ".4f") for _, key in METRIC_COLUMNS]
    row += [
      _cell(summaries, "best/round", ".0f" if len(group) > 1 else "d"),
      _cell(summaries, "wall_time_s", ".2f"),
      comms.pop() if len(comms) == 1 else MISSING,
      _cell(summaries, "gap/acc_mean", "+.4f"),
    ]  # gap.py: trained minus received.
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def data_and_model_names(results: Sequence[Result], config) -> Tuple[str, str]:
  """('digits_groups', 'mlp'): the data and model names the runs' config.json record (a
  user's own too: plot.ran_names), several joined by ' / '; the config's where none."""
  names = []
  for r in results:
    path = os.path.join(r.workdir, "config.json")
    if os.path.exists(path):
      with open(path) as f:
        ran = plot.ran_names(json.load(f))
      names.append((ran["data"], ran["model"] or config.model.name))
  names = names or [(config.data.name, config.model.name)]
  return tuple(" / ".join(dict.fromkeys(n[i] for n in names)) for i in range(2))


def swept_text(results: Sequence[Result]) -> str:
  """'num_global_models = 1, 2, 4': each swept field and its values ('' without a sweep)."""
  values: Dict[str, List[Any]] = {}
  for r in results:
    for path, value in r.setting:
      values.setdefault(path, [])
      if value not in values[path]:
        values[path].append(value)
  return "; ".join(f"{path} = {', '.join(map(str, v))}" for path, v in values.items())


def comparison_report(results: Sequence[Result], config, command: str) -> str:
  """comparison.md: the producing command, what ran (data, model, swept values), the
  units note, the table."""
  seeds = sorted({r.seed for r in results if r.seed is not None})
  seed_text = (
    f"seeds {', '.join(map(str, seeds))}"
    if len(seeds) > 1
    else f"seed {seeds[0] if seeds else config.seed}"
  )
  note = TABLE_NOTE + (" " + SEEDS_NOTE if len(seeds) > 1 else "")
  data_name, model_name = data_and_model_names(results, config)
  swept = swept_text(results)
  return (
    f"Produced by `{command}` (dataset `{data_name}`, model `{model_name}`, "
    f"{config.num_rounds} rounds, {seed_text}{f'; swept {swept}' if swept else ''})."
    f"\n\n{note}\n\n{comparison_table(results)}"
  )


def comparison_title(results: Sequence[Result], config) -> str:
  """The comparison plot's title: data and model that ran, then the swept values, or the
  config's K where nothing is swept (single-model methods keep 1 whatever it says)."""
  data_name, model_name = data_and_model_names(results, config)
  swept = swept_text(results)
  return f"Mean client test accuracy: {data_name}, {model_name}, " + (
    f"swept {swept}" if swept else f"num_global_models = {config.num_global_models}"
  )


LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*")


def _mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], metric: str):
  """(rounds, mean, std) of `metric` at the rounds every history evaluated."""
  per_run = [{m["round"]: m[metric] for m in h if metric in m} for h in histories]
  rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
  values = np.array([[p[r] for r in rounds] for p in per_run]).reshape(len(per_run), len(rounds))
  std = values.std(axis=0, ddof=1) if len(per_run) > 1 else np.zeros(len(rounds))
  return rounds, values.mean(axis=0), std


def plot_accuracy(
  histories: Mapping[str, Sequence[Any]], path: str, title: str = "Mean client test accuracy"
) -> Figure:
  """Saves test/acc_mean against rounds, one line per entry, as a PNG (Agg, no pyplot).

  An entry is one run's history, or a list of histories (its seeds): their mean, with a
  band of ± one standard deviation. Each line has its own dash and marker (identical curves
  stay distinguishable), and the legend sits outside the axes, so it covers no curve.
  """
  fig = Figure(figsize=(7.6, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  banded = False
  for i, (name, runs) in enumerate(histories.items()):
    runs = [runs] if not runs or isinstance(runs[0], Mapping) else list(runs)
    rounds, mean, std = _mean_curve(runs, "test/acc_mean")
    (line,) = ax.plot(
      rounds,
      mean,
      label=name,
      linestyle=LINE_STYLES[i % len(LINE_STYLES)],
      marker=MARKERS[i % len(MARKERS)],
      markersize=5 + 3 * (i % 4),
      markerfacecolor="none" if i else None,
    )  # Nested markers.
    if len(runs) > 1:  # Accuracies: the band is clipped to [0, 1].
      banded = True
      ax.fill_between(
        rounds,
        np.clip(mean - std, 0, 1),
        np.clip(mean + std, 0, 1),
        color=line.get_color(),
        alpha=0.2,
        linewidth=0,
      )
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy (unweighted mean over clients)")
  ax.set_title(
    title
    + ("\nline: mean over seeds, band: ± one std over seeds (clipped to [0, 1])" if banded else ""),
    fontsize=10,
  )
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
  fig.savefig(path, format="png", dpi=120)
  return fig


def plot_sweep(results: Sequence[Result], metric: str, path: str) -> Figure:
  """Saves `metric` (from each summary) against the first swept field, one line per
  algorithm and setting of the other swept fields, with ± std error bars over seeds."""
  fig = Figure(figsize=(6.4, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  field = results[0].setting[0][0]
  xs = list(dict.fromkeys(r.setting[0][1] for r in results))
  numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
  lines: Dict[str, Dict[Any, List[float]]] = {}
  for group in grouped(results):
    setting = group[0].setting
    label = " ".join([group[0].algorithm] + [f"{p}={v}" for p, v in setting[1:]])
    values = [r.summary[metric] for r in group if r.summary.get(metric) is not None]
    if values:
      lines.setdefault(label, {})[setting[0][1]] = values
  if not lines:
    raise SweepError(
      f"--sweep_metric={metric!r} is in no run's summary; choose one of "
      f"{sorted(k for k, v in results[0].summary.items() if isinstance(v, float))}."
    )
  bounded = metric.split("/")[-1].startswith("acc")  # Accuracies are fractions in [0, 1].
  barred = False
  for label, points in lines.items():
    keys = [x for x in xs if x in points]
    at = keys if numeric else [xs.index(x) for x in keys]
    means = [statistics.fmean(points[x]) for x in keys]
    errors = np.array([statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in keys])
    barred = barred or bool(errors.any())
    lower, upper = errors, errors
    if bounded:  # A fraction: the bars stop at 0 and 1.
      lower, upper = np.minimum(errors, means), np.minimum(errors, 1 - np.asarray(means))
    ax.errorbar(at, means, yerr=[lower, upper], marker="o", markersize=4, capsize=3, label=label)
  if not numeric:
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
  else:
    if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8:
      ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
  ax.set_xlabel(field)
  ax.set_ylabel(metric)
  ax.set_title(
    f"{metric} against {field}"
    + (
      "\nerror bars: ± one std over seeds" + (" (clipped to [0, 1])" if bounded else "")
      if barred
      else ""
    ),
    fontsize=10,
  )
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
  fig.savefig(path, format="png", dpi=120)
  return fig


def replica_groups(
  pending: Sequence[Tuple[int, Any]], replicas, devices: Callable[[Any], int] = lambda c: 1
) -> List[List[Tuple[int, Any]]]:
  """Pending runs [(index, run config)] in groups that can run as one program, each at most
  `replicas` long (a callable: the group's first config -> its size, for `auto`).

  Runs go together when their configs differ only in `hyperparams.VALUE_FIELDS` (seed,
  learning rates, prox_mu, ditto_lambda): one algorithm, model, data, K, batch size, local
  epochs, clients per round, update mode, batching, parallelism, rounds, ... A setting is
  then split into groups of `replicas`, in the grid's order, a remainder that would not
  spread evenly over the `devices(first config)` a group takes cut in two
  (`replicas.spread_sizes`: 29 runs in groups of 16 on 8 GPUs go as 16, 8 and 5)."""
  by_program: Dict[str, List[Tuple[int, Any]]] = {}
  for index, run_config in pending:
    by_program.setdefault(hyperparams.program_key(run_config), []).append((index, run_config))
  groups = []
  for members in by_program.values():
    size = replicas
    if callable(replicas):  # `auto`: sized only where there is something to group.
      size = replicas(members[0][1]) if len(members) > 1 else 1
    size = max(1, int(size))
    count = devices(members[0][1]) if size > 1 else 1
    start = 0
    for length in replicas_lib.spread_sizes(len(members), size, count):
      groups.append(members[start : start + length])
      start += length
  return groups


def parse_replicas(value) -> Any:
  """--replicas: 'auto' or a positive integer; SweepError otherwise."""
  if str(value).strip().lower() == "auto":
    return "auto"
  try:
    count = int(str(value).strip())
  except ValueError:
    count = 0
  if count < 1:
    raise SweepError(f"--replicas={value}: give a positive integer (1: one run at a time) or auto.")
  return count


def run_comparison(
  config,
  algorithms: Sequence[str],
  workdir: str,
  data: Optional[data_lib.FederatedData] = None,
  command: Optional[str] = None,
  seeds: Optional[Sequence[int]] = None,
  sweeps: Sequence[Tuple[str, Sequence[Any]]] = (),
  sweep_metric: str = "test/acc_mean",
  model=None,
  start_over: bool = False,
  replicas: Any = 1,
) -> List[Result]:
  """Runs each setting x algorithm x seed on `config`, writes the table and plots.

  `seeds`: None runs `config.seed` in <algorithm>/ (today's layout); a list runs each in
  <algorithm>/seed_<s>/. `sweeps`: [(config path, values)], as `parse_sweeps` returns;
  their grid's settings each get a <path=value,...>/ folder. Data (`data`, or loaded once
  per distinct data config) and `model` (see train_and_evaluate) are shared by every run.
  Finished runs of the same config, data and model are reused (`finished_summary`);
  `start_over` reruns every run from round 0, deleting what its folder held.
  `replicas`: up to this many runs that differ only in seed and value hyper-parameters run as
  one program (`replica_groups`, `replicas.train_and_evaluate_many`); 'auto' as many as
  memory allows (`replicas.auto_replicas`); 1 one run at a time. Each run's folder is the same.
  """
  check_algorithms(algorithms)
  config = config_lib.resolve(config)
  replicas = parse_replicas(replicas)
  run_seeds = [None] if seeds is None else parse_seeds(seeds)
  settings = sweep_settings(sweeps)
  runs = [
    (setting, name, seed, configured(config, name, setting, seed))
    for setting in settings
    for name in algorithms
    for seed in run_seeds
  ]  # Validates all first.
  os.makedirs(workdir, exist_ok=True)
  loaded: Dict[str, data_lib.FederatedData] = {}
  summaries: Dict[int, Dict[str, Any]] = {}
  run_dirs = [run_directory(workdir, name, setting, seed) for setting, name, seed, _ in runs]
  pending = []

  def data_of(run_config):
    if data is not None:
      return data
    key = run_config.data.to_json()
    if key not in loaded:
      loaded[key] = data_lib.load(run_config.data)
    return loaded[key]

  for i, (setting, name, seed, run_config) in enumerate(runs):
    run_data = data_of(run_config)
    run_model = train.run_model(run_config, run_data, model)  # What train.build applies.
    experiment = fingerprint_lib.fingerprint(run_config, run_data, run_model)
    summary = None if start_over else finished_summary(run_dirs[i], run_config, experiment)
    if summary is not None:
      logging.info("Run %d/%d: reusing the finished run in %s", i + 1, len(runs), run_dirs[i])
      summaries[i] = summary
    else:
      pending.append((i, run_config))
  size = replicas
  if replicas == "auto":
    size = lambda c: replicas_lib.auto_replicas(c, data_of(c), model)
  kwargs = dict(
    {} if model is None else {"model": model}, **({"start_over": True} if start_over else {})
  )
  devices = lambda c: replicas_lib.group_devices(c.num_devices)  # What a group spreads over.
  for group in replica_groups(pending, size, devices):
    indices = [i for i, _ in group]
    configs = [c for _, c in group]
    dirs = [run_dirs[i] for i in indices]
    if len(group) == 1:
      logging.info("Run %d/%d: %s in %s", indices[0] + 1, len(runs), configs[0].algorithm, dirs[0])
      summaries[indices[0]] = train.train_and_evaluate(
        configs[0], dirs[0], data=data_of(configs[0]), **kwargs
      )
      continue
    logging.info(
      "Runs %s of %d: %s as one program of %d replicas, in %s",
      ", ".join(str(i + 1) for i in indices),
      len(runs),
      configs[0].algorithm,
      len(group),
      ", ".join(dirs),
    )
    for i, summary in zip(
      indices,
      replicas_lib.train_and_evaluate_many(configs, dirs, data=data_of(configs[0]), **kwargs),
    ):
      summaries[i] = summary
  results = [
    Result(name, run_dirs[i], summaries[i], read_history(run_dirs[i]), setting, seed)
    for i, (setting, name, seed, _) in enumerate(runs)
  ]
  command = command or (
    f"run_comparison(config, algorithms={list(algorithms)!r}, workdir={workdir!r})"
  )
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(comparison_report(results, config, command))
  curves = {}
  for group in grouped(results):
    label = " ".join([group[0].algorithm] + [f"{p}={v}" for p, v in group[0].setting])
    curves[label] = [r.history for r in group]
  plot_accuracy(
    curves, os.path.join(workdir, "comparison.png"), title=comparison_title(results, config)
  )
  if sweeps:
    plot_sweep(results, sweep_metric, os.path.join(workdir, "comparison_sweep.png"))
  return results


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_list(
  "algorithms",
  list(algorithms_lib.ALGORITHM_NAMES),
  f"Comma-separated algorithms to compare, from {algorithms_lib.ALGORITHM_NAMES} "
  "and any that --imports registers.",
)
flags.DEFINE_string(
  "workdir", "/tmp/fedmerge_compare", "Where each run and comparison.md/.png are written."
)
flags.DEFINE_list(
  "seeds",
  None,
  "Comma-separated seeds (config.seed), e.g. 0,1,2: every "
  "algorithm runs once per seed on the same data; the table shows mean ± std.",
)
flags.DEFINE_multi_string(
  "sweep",
  [],
  "<config field>=<v1>,<v2>,...: one run per value, e.g. "
  "num_global_models=1,2,4,8. Repeat for a grid.",
)
flags.DEFINE_string(
  "sweep_metric",
  "test/acc_mean",
  "The summary metric comparison_sweep.png plots against the swept field.",
)
flags.mark_flags_as_required(["config"])


def _valid_algorithms(names) -> bool:
  try:
    check_algorithms(names)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


def _valid_seeds(values) -> bool:
  try:
    values is None or parse_seeds(values)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("algorithms", _valid_algorithms)
flags.register_validator("seeds", _valid_seeds)


flags.DEFINE_string(
  "replicas",
  "auto",
  "Runs that differ only in seed, client_lr, prox_mu, server "
  "learning rates or ditto_lambda run as one program, up to this many at once "
  "(auto: as many as memory allows, up to 16; 1: one run at a time).",
)
flags.DEFINE_bool(
  "start_over",
  False,
  "Rerun every run from round 0, deleting the results "
  "and checkpoints its folder holds (of another experiment, or this one).",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  cli.check_workdir(FLAGS.workdir)
  command = shlex.join(["python", "-m", "fedmerge_jax.compare", *sys.argv[1:]])
  try:
    sweeps = parse_sweeps(FLAGS.sweep, config_lib.resolve(FLAGS.config))
    parse_replicas(FLAGS.replicas)
  except (config_lib.ConfigError, SweepError) as e:
    cli.fatal(f"{type(e).__name__}: {e}")
  kept = (
    f"the finished runs in {FLAGS.workdir} are kept and the one in progress keeps its "
    "checkpoints; rerun the same command to go on."
  )
  interrupted = lambda: f"FATAL interrupted; {kept}"
  stopped = lambda signal_name: f"stopped by {signal_name}; {kept}"
  results = failures.reporting_run_failures(
    lambda: run_comparison(
      FLAGS.config,
      FLAGS.algorithms,
      FLAGS.workdir,
      command=command,
      seeds=FLAGS.seeds,
      sweeps=sweeps,
      sweep_metric=FLAGS.sweep_metric,
      start_over=FLAGS.start_over,
      replicas=FLAGS.replicas,
    ),
    interrupted,
    stopped,
  )
  print(comparison_table(results), end="", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
