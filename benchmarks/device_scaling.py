"""Rounds on 1, 2 and 8 simulated CPU devices, chunked and not, and the NaN guard's cost as
the population grows.

  PYTHONPATH=. python benchmarks/device_scaling.py [--trees=.,/path/to/other/checkout]

Each row runs in a fresh process (its own device count; peak RSS is that row's alone) and
prints one JSON line, `tree` naming the checkout whose library ran it (several trees: each
row runs in each, in turn, to compare before and after on a shared machine):
  kind 'devices': FedAvg, 32 clients of 200 examples, all each round, the MLP, clients
    vmapped, on D devices with client_chunk_size 0 (all), 8 and 16.
  kind 'population': Ditto and Local, 4 clients a round, in populations of 64 and 1,024.
Both report round_s (median of the timed rounds), rounds_per_s, temp_bytes (the compiled
round's XLA temporaries, per device) and peak_rss_bytes (the process's peak resident memory).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(devices, chunks):
  for d in devices:
    for chunk in chunks:
      yield {
        "kind": "devices",
        "algorithm": "fedavg",
        "clients": 32,
        "clients_per_round": 0,
        "devices": d,
        "client_chunk_size": chunk,
        "client_parallelism": "vmap",
      }
  for algorithm in ("ditto", "local"):
    for n in (64, 1024):
      yield {
        "kind": "population",
        "algorithm": algorithm,
        "clients": n,
        "clients_per_round": 4,
        "devices": 1,
        "client_chunk_size": 0,
        "client_parallelism": "auto",
      }


def measure(row, rounds: int):
  """One row, in this process (whose device count the parent set)."""
  import jax  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS is set)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fedmerge_jax import benchmark, config as config_lib, parallel, train  # pylint: disable=import-outside-toplevel

  config = config_lib.base_config()
  config.update_from_flattened_dict(
    {
      "algorithm": row["algorithm"],
      "num_global_models": 1,
      "model.name": "mlp",
      "clients_per_round": row["clients_per_round"],
      "num_devices": row["devices"],
      "client_chunk_size": row["client_chunk_size"],
      "client_parallelism": row["client_parallelism"],
      "batch_size": 20,
      "local_epochs": 1,
    }
  )
  config = config_lib.resolve(config)
  data = benchmark.synthetic_data("mlp", np.full(row["clients"], 200), config.seed)
  timed = benchmark.time_rounds(config, data, rounds)

  mesh = parallel.make_mesh(config.num_devices)  # The same round again, for its memory.
  layout = parallel.client_layout(
    mesh.size, data.num_clients, config.clients_per_round, config.client_chunk_size
  )
  _, alg = train.build(config, data, layout)
  state = jax.eval_shape(alg.init, jax.random.key(0))
  round_fn = train.compile_round(
    alg, config, mesh, parallel.state_shardings(mesh, state, layout.population)
  )
  gather = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
  _, ids, batch = gather(timed["rounds"][0])
  memory = round_fn.lower(state, ids, batch, jax.random.key(0)).compile().memory_analysis()
  return dict(
    row,
    round_s=timed["round_s"],
    rounds_per_s=1 / timed["round_s"],
    temp_bytes=memory.temp_size_in_bytes if memory else None,
    peak_rss_bytes=benchmark.peak_rss_bytes(),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", default=".", help="Comma-separated checkouts to run each row in.")
  parser.add_argument("--devices", default="1,2,8")
  parser.add_argument("--chunks", default="0,8,16")
  parser.add_argument("--rounds", type=int, default=5, help="Timed rounds per row.")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print("ROW " + json.dumps(measure(json.loads(args.worker), args.rounds)))
    return
  devices, chunks = ([int(v) for v in flag.split(",") if v] for flag in (args.devices, args.chunks))
  for row in rows(devices, chunks):  # --devices= (empty): the population rows alone.
    for tree in args.trees.split(","):
      env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.path.abspath(tree),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={row['devices']}",
      )
      out = subprocess.run(
        [
          sys.executable,
          os.path.abspath(__file__),
          f"--rounds={args.rounds}",
          "--worker",
          json.dumps(row),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
      )
      lines = [l for l in out.stdout.splitlines() if l.startswith("ROW ")]
      result = json.loads(lines[-1][4:]) if lines else dict(row, error=out.stderr[-500:])
      print(json.dumps(dict(result, tree=tree)), flush=True)


if __name__ == "__main__":
  main()
