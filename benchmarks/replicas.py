"""Replica groups against one run at a time: R seeds of one config as one round program.

  python benchmarks/replicas.py --models=mlp,emnist_cnn,resnet9 --replicas=separate,1,4,16
  python benchmarks/replicas.py --models=resnet9 --replicas=4 --paired --group_rounds=10

Per model and R, one JSON line ('separate': one run's own round, without a replica axis, as
`train.train_and_evaluate` runs it, the per-run time a group is held against): seconds per
group round (median of --group_rounds, after a warm-up round that compiles; a later round
needing a new padding bucket runs once untimed first), useful examples/s summed over the
replicas (real examples x epochs / time) and runs per hour for runs of --run_rounds rounds
(training rounds only; evaluation excluded), and with the round program's compile counted
once a run (a group's once for its R runs). `--paired`: each R as a group against R
separate runs on the same clients, round by round, alternating (`time_paired`): the
per-run speed-up with the machine's drift paired out, the measure to trust on a shared
machine. `--replica_parallelism`: how the group runs its replicas ('auto' as the runner
resolves it for the model and backend).
Data: `fedmerge_jax.benchmark.synthetic_data`; 'mlp' is the offline default's shape (20
clients of 90 examples, all every round), 'emnist_cnn' FEMNIST-like writers
(`benchmark.femnist_sizes`, 10 a round of 100), 'resnet9' small rounds (4 of 20 clients of
50 CIFAR-sized examples).
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedmerge_jax import benchmark
from fedmerge_jax import config as config_lib
from fedmerge_jax import evaluation
from fedmerge_jax import hyperparams
from fedmerge_jax import parallel
from fedmerge_jax import replicas
from fedmerge_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "emnist_cnn", "resnet9"], "Models to time.")
flags.DEFINE_list(
  "replicas",
  ["separate", "1", "4", "16"],
  "Replica counts R; 'separate': one run's own round, as train_and_evaluate runs it.",
)
flags.DEFINE_integer("group_rounds", 3, "Timed group rounds (after one warm-up round).")
flags.DEFINE_integer("run_rounds", 200, "Rounds of one run, for runs per hour.")
flags.DEFINE_string("group_algorithm", "fedmerge", "Algorithm of every replica.")
flags.DEFINE_enum(
  "replica_parallelism",
  "auto",
  list(replicas.REPLICA_PARALLELISMS),
  "How a group runs its replicas (config.replica_parallelism; 'auto' as the runner resolves it).",
)
flags.DEFINE_bool(
  "paired",
  False,
  "Time each numeric R as a group against R separate runs on the same clients, round by "
  "round, alternating (time_paired): the per-run speed-up with the machine's drift paired out.",
)
flags.DEFINE_integer(
  "eval_rounds",
  0,
  "Also time this many evaluations (after a warm-up one that compiles): the group's, all "
  "replicas at once (train.round_evaluator(replicas=True)), against one replica at a time.",
)

# model -> (client sizes, clients per round, batch size).
SETTINGS = {
  "mlp": (lambda: np.full(20, 90), 0, 32),
  "emnist_cnn": (lambda: benchmark.femnist_sizes(100, 0), 10, 20),
  "resnet9": (lambda: np.full(20, 50), 4, 32),
}


def workload(model: str):
  """(data, resolved config) of `model`'s row: SETTINGS' sizes, --group_algorithm."""
  sizes, clients_per_round, batch_size = SETTINGS[model]
  data = benchmark.synthetic_data(model, sizes(), seed=0)
  config = config_lib.base_config()
  config.algorithm, config.model.name = FLAGS.group_algorithm, model
  config.clients_per_round, config.batch_size = clients_per_round, batch_size
  return data, config_lib.resolve(config)


def round_shape(batch) -> tuple:
  """A round's input shapes: a new one (padding bucket) compiles the round anew."""
  return tuple(np.shape(x) for x in jax.tree.leaves(batch))


def timed(run, shape, compiled: set, exclude_compile: bool) -> float:
  """`run()`'s seconds; with `exclude_compile`, a round of a shape not yet in `compiled` is
  run once untimed first, so that its compile is not timed (the state advances a round)."""
  if exclude_compile and shape not in compiled:
    run()
  compiled.add(shape)
  return run()


class SeparateRuns:
  """Runs of `model`'s config with `seeds`, each its own round as `train.train_and_evaluate`
  compiles and feeds it (no replica axis): what a group's per-run time is held against.
  The runs share one compiled round (a run's program does not depend on its seed).
  `__call__(i, sampled, r)` runs run i's round r on the clients `sampled`; returns seconds."""

  def __init__(self, model: str, seeds=(0,)):
    self.data, config = workload(model)
    mesh = parallel.make_mesh(1)
    layout = parallel.client_layout(1, self.data.num_clients, config.clients_per_round, 0)
    _, algorithm = train.build(config, self.data, layout)
    self.states = []
    for seed in seeds:
      state, shardings = parallel.sharded_init(
        algorithm.init, mesh, layout.population, jax.random.key(seed)
      )
      self.states.append(state)
    self.round_fn = train.compile_round(algorithm, config, mesh, shardings)
    self.gather = parallel.RoundGatherer(self.data.train, layout, mesh, config.batch_size)

    self.compiled = set()  # The round shapes (padding buckets) compiled so far.

  def __call__(self, i: int, sampled, r: int, exclude_compile: bool = False) -> float:
    _, ids, batch = self.gather(sampled, None)

    def run():
      start = time.perf_counter()
      self.states[i], metrics = self.round_fn(self.states[i], ids, batch, jax.random.key(r))
      jax.block_until_ready((self.states[i], metrics))
      return time.perf_counter() - start

    return timed(run, round_shape(batch), self.compiled, exclude_compile)


def time_separate(model: str, rounds: int) -> dict:
  """The 'separate' row: one of `SeparateRuns`' rounds on clients sampled as seed 1's."""
  data, config = workload(model)
  run = SeparateRuns(model)
  times, useful = [], 0
  for r in range(rounds + 1):
    sampled = train.sample_clients(
      jax.random.fold_in(jax.random.key(1), r), data.num_clients, config.clients_per_round
    )
    times.append(run(0, sampled, r, exclude_compile=r > 0))  # Round 0 times the compile.
    if r:  # Round 0 compiles.
      useful += benchmark.useful_examples(data.train.counts[sampled], config.local_epochs)
  return timing_row(model, "separate", 1, times, useful)


def timing_row(model: str, label, runs: int, times, useful: int) -> dict:
  """The JSON line of `runs` runs whose first round (it compiles) took `times[0]`, whose
  timed rounds took `times[1:]` and trained `useful` examples. `compile_s`: the first round
  less a timed one, the round program's compile; a run compiles it once (and its evaluated
  round, about as long, once more), so `runs_per_hour_with_compile` counts it once per run
  of `--run_rounds`, or once per group."""
  seconds, timed = float(np.median(times[1:])), times[1:]
  compile_s = max(times[0] - seconds, 0.0)
  return {
    "model": model,
    "algorithm": FLAGS.group_algorithm,
    "replicas": label,
    "s_per_round": round(seconds, 4),
    "useful_examples_per_s": round(useful / sum(timed), 1),
    "runs_per_hour": round(3600 * runs / (seconds * FLAGS.run_rounds), 2),
    "compile_s": round(compile_s, 2),
    "runs_per_hour_with_compile": round(3600 * runs / (compile_s + seconds * FLAGS.run_rounds), 2),
    "backend": jax.default_backend(),
  }


class Group:
  """R seeds (0 .. R-1) of `model`'s config as one replica group, as
  `replicas.train_and_evaluate_many` builds it. `sample(r)`: each replica's clients of round
  r; `__call__(sampled, r)` runs the group's round r on them and returns its seconds."""

  def __init__(self, model: str, num_replicas: int):
    self.data, self.config = data, config = workload(model)
    self.configs = []
    for seed in range(num_replicas):
      self.configs.append(config.copy_and_resolve_references())
      self.configs[-1].seed = seed
    self.layout = parallel.client_layout(1, data.num_clients, config.clients_per_round, 0)
    self.algorithm = hyperparams.valued(lambda c: train.build(c, data, self.layout)[1], config)
    keys = jnp.stack([jax.random.key(c.seed) for c in self.configs])
    values = hyperparams.stacked_values(self.configs)
    init = jax.jit(self.algorithm.init)
    self.mesh = replicas.group_mesh(num_replicas)  # Whole replicas over the devices there are.
    spread = NamedSharding(self.mesh, PartitionSpec(replicas.REPLICAS))
    self.states = replicas.stack(
      [init((keys[i], {k: v[i] for k, v in values.items()})) for i in range(num_replicas)], spread
    )
    model, _ = train.build(config, data, self.layout)
    self.parallelism = replicas.resolve_replica_parallelism(
      FLAGS.replica_parallelism, model, np.zeros(data.example_shape, np.float32)
    )
    self.group_round = replicas.make_group_round(self.algorithm, config, spread, self.parallelism)
    self.round_data = replicas.RoundData(data, self.layout, config.batch_size, spread)
    self.round_keys = jax.random.split(keys[0], num_replicas)
    self.active = np.ones(num_replicas, bool)
    self.compiled = set()

  def sample(self, r: int):
    return [
      train.sample_clients(
        jax.random.fold_in(jax.random.key(c.seed), r),
        self.data.num_clients,
        self.config.clients_per_round,
      )
      for c in self.configs
    ]

  def useful(self, sampled) -> int:
    counts = self.data.train.counts
    return sum(benchmark.useful_examples(counts[s], self.config.local_epochs) for s in sampled)

  def __call__(self, sampled, r: int, exclude_compile: bool = False) -> float:
    _, ids, batch = self.round_data(sampled, evaluating=False)

    def run():
      start = time.perf_counter()
      self.states, metrics = self.group_round(
        self.states, self.active, ids, batch, self.round_keys, np.uint32(r)
      )
      jax.block_until_ready((self.states, metrics))
      return time.perf_counter() - start

    return timed(run, round_shape(batch), self.compiled, exclude_compile)


def time_group(model: str, num_replicas: int, rounds: int) -> dict:
  group = Group(model, num_replicas)
  times, useful = [], 0
  for r in range(rounds + 1):
    sampled = group.sample(r)
    times.append(group(sampled, r, exclude_compile=r > 0))  # Round 0 times the compile.
    if r:  # Round 0 compiles.
      useful += group.useful(sampled)
  evaluations = time_evaluations(
    group.algorithm,
    group.data,
    group.config,
    group.layout,
    group.configs,
    group.states,
    group.group_round,
    group.mesh,
  )
  row = timing_row(model, num_replicas, num_replicas, times, useful)
  return {**row, "replica_parallelism": group.parallelism, **evaluations}


def time_paired(model: str, num_replicas: int, rounds: int) -> dict:
  """A group of R against R separate runs on the same clients, round by round, the two ways
  alternating which goes first (so the machine's drift hits both alike), no compile timed
  (a separate run compiles a round per padding bucket its clients need, a group per bucket
  of its longest replica: `timed`): the median seconds of a round both ways, and of their
  ratio (R separate rounds / one group round: above 1, the group is faster per run)."""
  group = Group(model, num_replicas)
  runs = SeparateRuns(model, range(num_replicas))
  together, apart = [], []
  for r in range(rounds + 1):
    sampled = group.sample(r)
    ways = [
      lambda: together.append(group(sampled, r, exclude_compile=True)),
      lambda: apart.append(sum(runs(i, s, r, exclude_compile=True) for i, s in enumerate(sampled))),
    ]
    for way in ways if r % 2 else ways[::-1]:
      way()
  ratios = np.array(apart[1:]) / np.array(together[1:])  # Round 0 warms the caches.
  return {
    "model": model,
    "algorithm": FLAGS.group_algorithm,
    "replicas": num_replicas,
    "replica_parallelism": group.parallelism,
    "paired_rounds": rounds,
    "s_per_group_round": round(float(np.median(together[1:])), 4),
    "s_per_separate_rounds": round(float(np.median(apart[1:])), 4),
    "per_run_speedup_median": round(float(np.median(ratios)), 3),
    "per_run_speedup_range": [round(float(ratios.min()), 3), round(float(ratios.max()), 3)],
    "backend": jax.default_backend(),
  }


def time_evaluations(algorithm, data, config, layout, configs, states, group_round, mesh) -> dict:
  """Median seconds of `--eval_rounds` evaluations of the group after a round with the test
  split attached (the gap's): all replicas at once, and one replica at a time (the separate
  evaluator called R times, as the runner evaluated before)."""
  if not FLAGS.eval_rounds:
    return {}
  chunks = evaluation.chunk_sizes(config, data)
  num_replicas = len(configs)
  sampled = [
    train.sample_clients(jax.random.key(c.seed), data.num_clients, config.clients_per_round)
    for c in configs
  ]
  ordered, ids, batch = replicas.RoundData(data, layout, config.batch_size)(sampled, True)
  active = np.ones(num_replicas, bool)
  keys = jax.random.split(jax.random.key(0), num_replicas)
  states, metrics = group_round(states, active, ids, batch, keys, np.uint32(1))
  metrics = jax.device_get(metrics)
  together = train.round_evaluator(algorithm, data, config, mesh, chunks, replicas=True)
  alone = train.round_evaluator(algorithm, data, config, mesh, chunks)
  ways = {
    "s_per_evaluation": lambda: together(states, 1, np.stack(ordered), metrics),
    "s_per_evaluation_one_at_a_time": lambda: [
      alone(replicas.row(states, i), 1, ordered[i], replicas.row(metrics, i))
      for i in range(num_replicas)
    ],
  }
  seconds = {name: [] for name in ways}
  for repeat in range(FLAGS.eval_rounds + 1):
    for name, evaluate in ways.items():  # Interleaved: the machine's load hits both alike.
      start = time.perf_counter()
      evaluate()
      if repeat:  # Repeat 0 compiles.
        seconds[name].append(time.perf_counter() - start)
  return {name: round(float(np.median(s)), 4) for name, s in seconds.items()}


def main(argv):
  del argv
  for model in FLAGS.models:
    for replicas_flag in FLAGS.replicas:
      if replicas_flag == "separate":
        row = time_separate(model, FLAGS.group_rounds)
      elif FLAGS.paired:
        row = time_paired(model, int(replicas_flag), FLAGS.group_rounds)
      else:
        row = time_group(model, int(replicas_flag), FLAGS.group_rounds)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
