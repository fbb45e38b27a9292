"""Chunks on a device mesh: each device trains its own block of clients, chunk by chunk.

8 simulated devices in a subprocess (JAX fixes the device count at import): the compiled,
sharded, chunked round moves none of the round's data between devices, trains
chunk / devices clients per device per step, and equals the unchunked round on one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, re, sys
    import jax, numpy as np
    from conftest import TinyBN, make_federation, tiny_base_config
    from fedmerge_jax import models, parallel, restore, train
    from fedmerge_jax.config import resolve

    models.register_model("tiny_bn", lambda cfg, n: TinyBN(n))

    def one_round(case, num_devices, chunk):
      \"\"\"(compiled per-device HLO, real clients' state and metrics after one round).\"\"\"
      config = tiny_base_config()
      config.update_from_flattened_dict(case["overrides"])
      config.client_chunk_size, config.num_devices = chunk, num_devices
      config = resolve(config)
      n = case["clients"]
      data = make_federation(n, sizes=[3 + (5 * i) % 17 for i in range(n)])
      mesh = parallel.make_mesh(num_devices)
      layout = parallel.client_layout(mesh.size, n, config.clients_per_round, chunk)
      _, alg = train.build(config, data, layout)
      state, shardings = parallel.sharded_init(alg.init, mesh, layout.population,
                                               jax.random.key(0))
      round_fn = train.compile_round(alg, config, mesh, shardings)
      gather = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
      sampled = np.sort(np.random.default_rng(0).choice(n, config.clients_per_round or n,
                                                         replace=False))
      _, ids, batch = gather(sampled)
      compiled = round_fn.lower(state, ids, batch, jax.random.key(1)).compile()
      new, metrics = compiled(state, ids, batch, jax.random.key(1))
      real = restore.without_phantoms(new, layout)
      leaves = [np.asarray(x).tolist() for x in jax.tree.leaves(real)]
      return compiled.as_text(), {"state": leaves, "loss": float(metrics["train/loss"]),
                                  "x_shape": list(batch.x.shape)}

    def data_shapes(hlo, x_shape):
      \"\"\"Leading dims of every array in the HLO shaped like the round's x, and of those
      that an all-gather produces.\"\"\"
      tail = ",".join(map(str, x_shape[1:]))
      shapes = re.findall(r"f32\\[(\\d+)," + tail + r"\\]", hlo)
      gathered = re.findall(r"= f32\\[(\\d+)," + tail + r"\\][^ ]* all-gather", hlo)
      return sorted({int(s) for s in shapes}), sorted({int(s) for s in gathered})

    cases = json.loads(sys.argv[1])
    out = {}
    for name, case in cases.items():
      reference_hlo, reference = one_round(case, 1, 0)
      out[name] = {"reference": reference, "chunked": {}}
      for chunk in case["chunks"]:
        hlo, result = one_round(case, 8, chunk)
        shapes, gathered = data_shapes(hlo, result["x_shape"])
        out[name]["chunked"][chunk] = dict(result, shapes=shapes, gathered=gathered,
                                           all_gathers=hlo.count(" all-gather("))
    print("RESULT " + json.dumps(out))
""")

CASES = {
  # 32 clients, all a round: 4 per device; chunk 8 -> 1 per device per step, 16 -> 2.
  "fedavg_32": {"clients": 32, "chunks": [8, 16], "overrides": {"algorithm": "fedavg"}},
  # Partial participation with phantoms: 12 of 20 -> 16 a round (2 per device), population
  # 24; per-client state (Ditto's models, FedMerge's logits) and a BatchNorm model.
  "ditto_12_of_20": {
    "clients": 20,
    "chunks": [8],
    "overrides": {"algorithm": "ditto", "clients_per_round": 12},
  },
  "fedmerge_bn_12_of_20": {
    "clients": 20,
    "chunks": [8],
    "overrides": {
      "algorithm": "fedmerge",
      "clients_per_round": 12,
      "model.name": "tiny_bn",
      "update_mode": "gradient",
    },
  },
}


@pytest.fixture(scope="module")
def rounds():
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}",
    PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
  )
  result = subprocess.run(
    [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  assert result.returncode == 0 and lines, result.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("chunk", [8, 16])
def test_each_device_trains_its_own_chunk_and_nothing_is_all_gathered(rounds, chunk):
  report = rounds["fedavg_32"]["chunked"][str(chunk)]
  assert report["x_shape"][0] == 32
  assert report["gathered"] == []  # No all-gather yields an array shaped like the round's x.
  # Per device: its block of 32 / 8 = 4 clients' x, and the chunk / 8 clients of one step.
  assert report["shapes"] == sorted({4, chunk // 8})


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_chunked_round_equals_the_unchunked_round_on_one_device(rounds, case):
  reference = rounds[case]["reference"]
  for chunk, report in rounds[case]["chunked"].items():
    assert report["shapes"][-1] < report["x_shape"][0], chunk  # Really split over devices.
    np.testing.assert_allclose(report["loss"], reference["loss"], rtol=1e-5)
    assert len(report["state"]) == len(reference["state"])
    for got, want in zip(report["state"], reference["state"]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{case} chunk {chunk}")
