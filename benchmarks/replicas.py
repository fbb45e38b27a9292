"""Replica groups against one run at a time: R seeds of one config as one vmapped round.

  python benchmarks/replicas.py --models=mlp,emnist_cnn,resnet9 --replicas=separate,1,4,16

Per model and R, one JSON line ('separate': one run's own round, without a replica axis, as
`train.train_and_evaluate` runs it, the per-run time a group is held against): seconds per
group round (median of --group_rounds, after a warm-up round that compiles), useful
examples/s summed over the replicas (real examples x epochs / time) and runs per hour for
runs of --run_rounds rounds (training rounds only; evaluation excluded), and with the round
program's compile counted once a run (a group's once for its R runs).
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


def time_separate(model: str, rounds: int) -> dict:
  """The 'separate' row: one run's own round, as `train.train_and_evaluate` compiles and
  feeds it (no replica axis): what a group's per-run time is held against."""
  data, config = workload(model)
  mesh = parallel.make_mesh(1)
  layout = parallel.client_layout(1, data.num_clients, config.clients_per_round, 0)
  _, algorithm = train.build(config, data, layout)
  state, shardings = parallel.sharded_init(
    algorithm.init, mesh, layout.population, jax.random.key(0)
  )
  round_fn = train.compile_round(algorithm, config, mesh, shardings)
  gather = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
  times, useful = [], 0
  for r in range(rounds + 1):
    sampled = train.sample_clients(
      jax.random.fold_in(jax.random.key(1), r), data.num_clients, config.clients_per_round
    )
    _, ids, batch = gather(sampled, None)
    start = time.perf_counter()
    state, metrics = round_fn(state, ids, batch, jax.random.key(r))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
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


def time_group(model: str, num_replicas: int, rounds: int) -> dict:
  data, config = workload(model)
  clients_per_round, batch_size = config.clients_per_round, config.batch_size
  configs = []
  for seed in range(num_replicas):
    configs.append(config.copy_and_resolve_references())
    configs[-1].seed = seed
  layout = parallel.client_layout(1, data.num_clients, clients_per_round, 0)
  algorithm = hyperparams.valued(lambda c: train.build(c, data, layout)[1], config)
  keys = jnp.stack([jax.random.key(c.seed) for c in configs])
  values = hyperparams.stacked_values(configs)
  init = jax.jit(algorithm.init)
  mesh = replicas.group_mesh(num_replicas)  # Whole replicas over the devices there are.
  spread = NamedSharding(mesh, PartitionSpec(replicas.REPLICAS))
  states = replicas.stack(
    [init((keys[i], {k: v[i] for k, v in values.items()})) for i in range(num_replicas)], spread
  )
  group_round = replicas.make_group_round(algorithm, config, spread)
  round_keys = jax.random.split(keys[0], num_replicas)
  active = np.ones(num_replicas, bool)
  times, useful = [], 0
  for r in range(rounds + 1):
    sampled = [
      train.sample_clients(
        jax.random.fold_in(jax.random.key(c.seed), r), data.num_clients, clients_per_round
      )
      for c in configs
    ]
    _, ids, batch = replicas.round_batches(data, layout, sampled, batch_size, False)
    start = time.perf_counter()
    states, metrics = group_round(states, active, ids, batch, round_keys, np.uint32(r))
    jax.block_until_ready((states, metrics))
    times.append(time.perf_counter() - start)
    if r:  # Round 0 compiles.
      useful += sum(
        benchmark.useful_examples(data.train.counts[s], config.local_epochs) for s in sampled
      )
  evaluations = time_evaluations(
    algorithm, data, config, layout, configs, states, group_round, mesh
  )
  return {**timing_row(model, num_replicas, num_replicas, times, useful), **evaluations}


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
  ordered, ids, batch = replicas.round_batches(data, layout, sampled, config.batch_size, True)
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
      row = (
        time_separate(model, FLAGS.group_rounds)
        if replicas_flag == "separate"
        else time_group(model, int(replicas_flag), FLAGS.group_rounds)
      )
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
