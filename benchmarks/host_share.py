"""The host's share of a round's wall time on the offline default, 5 of 20 clients a round.

  PYTHONPATH=. python benchmarks/host_share.py [--rounds=200] [--repeats=3]

Per repeat, one JSON line: the loop's milliseconds per round (train_and_evaluate for
`rounds` rounds, no checkpoints, evaluated every `WINDOW`: the median of the windows'
rounds/s after the first, which holds most compilations; the rate leaves evaluations out),
the round's own compute (the compiled round back to back on data already on the device),
the host's steps alone (sampling one round's clients, gathering its data), and
host_share = 1 - compute / loop. Works on any
checkout with train.compile_round and parallel.RoundGatherer: run it on two trees back to
back to compare them.
"""

import argparse
import json
import os
import runpy
import statistics
import tempfile

import jax

from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import parallel
from fedmerge_jax import train
from fedmerge_jax.benchmark import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_ROUNDS = 20
WINDOW = 50  # Rounds between evaluations.


def default_config(num_rounds: int):
  config = runpy.run_path(os.path.join(ROOT, "configs", "default.py"))["get_config"]()
  config.clients_per_round, config.num_rounds, config.eval_every = 5, num_rounds, WINDOW
  config.checkpoint_every, config.tensorboard = 0, False
  return config


def loop_ms(data, num_rounds: int) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(default_config(num_rounds), workdir, data=data)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rates = [json.loads(line)["rounds_per_s"] for line in f][1:]
  return 1e3 / statistics.median(rates)


def median_ms(fn, repeats: int) -> float:
  return 1e3 * reference.median_time(fn, repeats)


def round_parts(data, repeats: int):
  """(compute, sampling, gathering) in ms a round, each alone."""
  config = config_lib.resolve(default_config(BASE_ROUNDS))
  mesh = parallel.make_mesh(1)
  layout = parallel.client_layout(1, data.num_clients, 5, 0)
  _, algorithm = train.build(config, data, layout)
  state, shardings = parallel.sharded_init(
    algorithm.init, mesh, layout.population, jax.random.key(0)
  )
  round_fn = train.compile_round(algorithm, config, mesh, shardings)
  gather = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
  key = jax.random.key(1)
  ids = train.sample_clients(key, data.num_clients, 5)
  _, sharded_ids, batch = jax.device_put(gather(ids))
  holder = [state]

  def one_round():
    holder[0], metrics = round_fn(holder[0], sharded_ids, batch, key)
    jax.block_until_ready(metrics)

  one_round()  # Compiles.
  return (
    median_ms(one_round, repeats),
    median_ms(lambda: train.sample_clients(key, data.num_clients, 5), repeats),
    median_ms(lambda: gather(ids), repeats),
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  data = data_lib.load(default_config(BASE_ROUNDS).data)
  for repeat in range(args.repeats):
    per_round = loop_ms(data, args.rounds)
    compute_ms, sampling_ms, gathering_ms = round_parts(data, 100)
    print(
      json.dumps(
        {
          "repeat": repeat,
          "rounds_per_s": round(1e3 / per_round, 1),
          "loop_ms_per_round": round(per_round, 3),
          "compute_ms": round(compute_ms, 3),
          "sampling_ms": round(sampling_ms, 3),
          "gathering_ms": round(gathering_ms, 3),
          "host_share": round(1 - compute_ms / per_round, 3),
        }
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
