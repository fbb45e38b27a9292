"""The client axis sharded over devices: 1, 2 and 8 devices, and 2 hosts, give the same run.

JAX fixes the device count at import, so the multi-device runs happen in subprocesses
with `--xla_force_host_platform_device_count`; `config.num_devices` picks the mesh size.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS, make_federation
from fedmerge_jax import config as config_lib
from fedmerge_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNTS = (1, 2, 8)
CASES = {  # name: (number of clients, config overrides); 10 clients never divide 8 devices.
  "fedmerge_3_of_10": (10, {"algorithm": "fedmerge", "clients_per_round": 3}),
  "fedmerge_all_chunked": (10, {"algorithm": "fedmerge", "client_chunk_size": 4}),
  "fedavg_3_of_10_chunked": (
    10,
    {"algorithm": "fedavg", "clients_per_round": 3, "client_chunk_size": 2},
  ),
  "ditto_5_of_10": (10, {"algorithm": "ditto", "clients_per_round": 5}),
  # BatchNorm (masked batch statistics) and dropout (per-client keys) models, unequal clients
  # (conftest's small ones, registered in the subprocess: they compile fast).
  "fedmerge_batchnorm_4_of_10": (
    10,
    {"algorithm": "fedmerge", "clients_per_round": 4, "model.name": "tiny_bn"},
  ),
  "fedavg_dropout_chunked": (
    10,
    {"algorithm": "fedavg", "client_chunk_size": 4, "model.name": "tiny_dropout"},
  ),
}


RUNS = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from conftest import TinyBN, TinyDropout, make_federation, tiny_base_config
    from fedmerge_jax import models, parallel, train
    from fedmerge_jax.config import resolve

    models.register_model("tiny_bn", lambda cfg, n: TinyBN(n))
    models.register_model("tiny_dropout", lambda cfg, n: TinyDropout(n))

    cases, device_counts, workdir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    out = {"runs": {}, "sharding": {}}
    for name, (num_clients, overrides) in cases.items():
      for n in device_counts:
        config = tiny_base_config()
        config.update_from_flattened_dict(overrides)
        config.num_devices = n
        path = os.path.join(workdir, f"{name}_{n}")
        train.train_and_evaluate(config, path, data=make_federation(num_clients))
        lines = open(os.path.join(path, "metrics.jsonl"))
        out["runs"][f"{name}_{n}"] = [json.loads(line) for line in lines]

    # A checkpoint written on 8 devices (with phantom rows) resumes on 1 device.
    name = "ditto_5_of_10"
    path = os.path.join(workdir, "resumed_8_to_1")
    for n, rounds in ((8, 1), (1, 2)):
      config = tiny_base_config()
      config.update_from_flattened_dict(cases[name][1])
      config.num_devices, config.num_rounds = n, rounds
      train.train_and_evaluate(config, path, data=make_federation(cases[name][0]))
    lines = open(os.path.join(path, "metrics.jsonl"))
    out["runs"][f"{name}_resumed_8_to_1"] = [json.loads(line) for line in lines]

    # One round as train_and_evaluate runs it, on 8 devices: where does per-client state live?
    for algorithm in ("fedmerge", "ditto"):
      config = tiny_base_config()
      config.algorithm, config.clients_per_round = algorithm, 3
      config = resolve(config)
      data = make_federation(10)
      mesh = parallel.make_mesh(8)
      layout = parallel.client_layout(mesh.size, 10, 3, 0)
      _, alg = train.build(config, data, layout)
      state, shardings = parallel.sharded_init(alg.init, mesh, layout.population, jax.random.key(0))
      round_fn = parallel.jit_round(alg.round, mesh, shardings)
      gather = lambda ids: (ids, data.train.gather(ids))
      ids, batch = parallel.client_arrays(mesh, layout.pad_ids([1, 4, 7]), gather)
      state, _ = round_fn(state, ids, batch, jax.random.key(1))
      leaf = state.logits if algorithm == "fedmerge" else jax.tree.leaves(state.personal)[0]
      out["sharding"][algorithm] = {
          "shape": list(leaf.shape), "devices": len(leaf.sharding.device_set),
          "spec": list(leaf.sharding.spec),
          "rows_per_device": sorted({s.data.shape[0] for s in leaf.addressable_shards})}
    # A replica group of 4 seeds (replicas.py): spread over 4 of the 8 devices (one replica
    # each), and on 1 device; and over 4 devices run one after another (each device maps
    # its own replica); the devices each program's state was spread over.
    from fedmerge_jax import replicas
    name = "fedmerge_batchnorm_4_of_10"
    make, meshes = replicas.make_group_round, []
    def make_and_record(a, c, spread, *how):
      meshes.append(spread.mesh.size)
      group_round = make(a, c, spread, *how)
      def recorded(*args):  # The collectives in the compiled sequential round, if any.
        if how == ("sequential",) and "sequential_collectives" not in out:
          text = group_round.lower(*args).compile().as_text()
          out["sequential_collectives"] = [
              op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
              if op in text]
        return group_round(*args)
      return recorded
    replicas.make_group_round = make_and_record
    for n, how in ((0, "auto"), (1, "auto"), (0, "sequential")):
      configs = []
      for i in range(4):
        config = tiny_base_config()
        config.update_from_flattened_dict(cases[name][1])
        config.seed, config.num_devices = config.seed + i, n
        config.replica_parallelism = how
        configs.append(config)
      group = f"group_{n}" if how == "auto" else f"group_{how}_{n}"
      paths = [os.path.join(workdir, group, str(i)) for i in range(4)]
      replicas.train_and_evaluate_many(configs, paths, data=make_federation(cases[name][0]))
      for i, path in enumerate(paths):
        lines = open(os.path.join(path, "metrics.jsonl"))
        out["runs"][f"{group}_{i}"] = [json.loads(line) for line in lines]
    out["group_devices"] = meshes
    replicas.make_group_round = make
    # compare's grouping sees the 8 devices: 13 seeds in groups of up to 16 start with 8.
    from fedmerge_jax import compare
    class FirstGroup(Exception):
      pass
    def first_group(configs, *args, **kwargs):
      out["compare_first_group"] = len(configs)
      raise FirstGroup
    many, replicas.train_and_evaluate_many = replicas.train_and_evaluate_many, first_group
    try:
      compare.run_comparison(
          resolve(tiny_base_config()), ["fedmerge"], os.path.join(workdir, "compare13"),
          data=make_federation(10), seeds=list(range(13)), replicas=16)
    except FirstGroup:
      pass
    replicas.train_and_evaluate_many = many
    out["group_mesh"] = {str(r): replicas.group_mesh(r).size for r in (1, 4, 6, 7, 8, 16)}
    print("RESULT " + json.dumps(out))
""")


def _env(num_devices: int):
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}",
    PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
  )


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """Every case on 1, 2 and 8 of 8 simulated devices, in one subprocess."""
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      RUNS,
      json.dumps(CASES),
      json.dumps(DEVICE_COUNTS),
      str(tmp_path_factory.mktemp("sharded")),
    ],
    env=_env(8),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  assert result.returncode == 0 and lines, result.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT ") :])


def assert_same_metrics(runs, reference):
  """Every evaluation of every run equals the reference's, up to float reduction order."""
  assert len(runs) == len(reference)
  for run, ref in zip(runs, reference):
    assert run.keys() == ref.keys()
    for key in ref:
      if key != "rounds_per_s":
        np.testing.assert_allclose(run[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_devices_give_the_same_metrics(sharded, case):
  reference = sharded["runs"][f"{case}_1"]
  for n in DEVICE_COUNTS[1:]:
    assert_same_metrics(sharded["runs"][f"{case}_{n}"], reference)


def test_checkpoint_from_8_devices_resumes_on_1(sharded):
  runs = sharded["runs"]
  assert_same_metrics(runs["ditto_5_of_10_resumed_8_to_1"], runs["ditto_5_of_10_1"])


@pytest.mark.parametrize("algorithm", ["fedmerge", "ditto"])
def test_per_client_state_is_split_over_devices(sharded, algorithm):
  report = sharded["sharding"][algorithm]
  assert report["shape"][0] == 16  # 10 clients + 5 phantom ids a round, padded to 8 devices.
  assert report["devices"] == 8
  assert report["spec"] == ["clients"]
  assert report["rows_per_device"] == [2]


def test_a_replica_group_spreads_whole_replicas_over_devices(sharded):
  """4 replicas on 8 devices run one per device (on 4), vmapped or one after another, and
  give the metrics of the group on one device; replica 0 is the separate 1-device run of
  its config."""
  runs = sharded["runs"]
  assert sharded["group_devices"] == [4, 1, 4]
  for i in range(4):
    assert_same_metrics(runs[f"group_0_{i}"], runs[f"group_1_{i}"])
    assert_same_metrics(runs[f"group_sequential_0_{i}"], runs[f"group_1_{i}"])
  assert sharded["sequential_collectives"] == []  # Each device loops over its own replicas.
  assert_same_metrics(runs["group_0_0"], runs["fedmerge_batchnorm_4_of_10_1"])
  assert runs["group_0_1"][-1]["train/loss"] != runs["group_0_0"][-1]["train/loss"]
  # The largest divisor of the replicas up to the 8 devices.
  assert sharded["group_mesh"] == {"1": 1, "4": 4, "6": 6, "7": 7, "8": 8, "16": 8}
  # 13 runs would all go on one device (13's only divisor up to 8 is 1): compare cuts 8 + 5.
  assert sharded["compare_first_group"] == 8


def test_layout_pads_with_phantoms():
  layout = parallel.client_layout(8, num_clients=10, clients_per_round=3, chunk_size=0)
  assert (layout.round_size, layout.population, layout.eval_chunk) == (8, 16, 16)
  ids = layout.pad_ids(np.array([2, 5, 9]))
  np.testing.assert_array_equal(ids, [2, 5, 9, 10, 11, 12, 13, 14])
  assert len(set(ids.tolist())) == len(ids) and ids.max() < layout.population
  every = parallel.client_layout(8, num_clients=10, clients_per_round=0, chunk_size=3)
  assert (every.chunk_size, every.round_size, every.population) == (8, 16, 16)
  one = parallel.client_layout(1, num_clients=10, clients_per_round=0, chunk_size=3)
  assert (one.chunk_size, one.round_size, one.population, one.eval_chunk) == (3, 10, 10, 3)


def test_phantoms_have_no_examples():
  data = make_federation(num_clients=4)
  batch = data.train.gather(np.array([1, 3, 4, 5]))
  np.testing.assert_array_equal(batch.count, [data.train.counts[1], data.train.counts[3], 0, 0])
  np.testing.assert_array_equal(batch.x[1, : data.train.counts[3]], data.train.client(3)[0])
  assert not batch.x[2:].any() and not batch.y[2:].any()


def test_strided_chunks_equal_one_vmap():
  x = np.arange(12.0).reshape(6, 2)
  fn = lambda row, i: (row.sum() * i, row * 2)
  expected = jax.vmap(fn)(x, np.arange(6))
  for chunk in (2, 3, 4):  # 4 does not divide 6: lax.map's batches and a remainder.
    got = parallel.map_clients(fn, (x, np.arange(6)), chunk)
    jax.tree.map(np.testing.assert_allclose, got, expected)


def test_num_devices_is_validated():
  config = config_lib.base_config()
  config.num_devices = -1
  with pytest.raises(config_lib.ConfigError, match="num_devices"):
    config_lib.resolve(config)
  with pytest.raises(ValueError, match="num_devices"):
    parallel.make_mesh(jax.device_count() + 1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_give_the_same_metrics_as_one(tmp_path):
  """launch.py --multihost as 2 processes of 2 CPU devices each on localhost, vs 1 device."""
  command = [
    sys.executable,
    "launch.py",
    "--config=configs/default.py",
    "--config.num_rounds=3",
    "--config.eval_every=1",
    "--config.data.num_clients=10",
    "--config.clients_per_round=3",
    "--config.model.hidden_sizes=(16,)",
  ]
  address = f"localhost:{_free_port()}"
  hosts = [
    subprocess.Popen(
      command
      + [
        f"--workdir={tmp_path / 'hosts'}",
        "--multihost",
        f"--coordinator_address={address}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      env=_env(2),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  single = subprocess.run(
    command + [f"--workdir={tmp_path / 'single'}"],
    env=_env(1),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  outputs = []
  for host in hosts:
    try:
      outputs.append(host.communicate(timeout=300))
    finally:
      host.kill()
  assert single.returncode == 0, single.stderr[-3000:]
  for host, (_, err) in zip(hosts, outputs):
    assert host.returncode == 0, err[-3000:]
  assert "round" in outputs[0][0] and "round" not in outputs[1][0]  # Only process 0 prints.
  read = lambda d: [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")]
  assert_same_metrics(read("hosts"), read("single"))
