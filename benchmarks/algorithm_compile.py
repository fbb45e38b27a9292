"""One algorithm on the cluster config's model (ResNet-9) with a small synthetic federation:
init and round compile times, the round's compiled temporaries, three rounds' times.

  PYTHONPATH=. python benchmarks/algorithm_compile.py ALGORITHM [CLIENTS [EXAMPLES [EPOCHS]]]

Client i has EXAMPLES + 3 i random 32x32x3 images (100 classes), a quarter as many test and
validation ones; defaults 6 clients, 40 examples, 1 local epoch. What scales badly in an
algorithm shows here in minutes, before a run at the full shape.
"""

import importlib.util
import resource
import sys
import time

import jax
import numpy as np

from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import train

spec = importlib.util.spec_from_file_location("cluster", "configs/cifar100_cluster.py")
cluster = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cluster)

alg_name = sys.argv[1]
num_clients = int(sys.argv[2]) if len(sys.argv) > 2 else 6
n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
rng = np.random.default_rng(0)


def split(m):
  return {
    i: (
      rng.normal(size=(m + 3 * i, 32, 32, 3)).astype(np.float32),
      rng.integers(0, 100, m + 3 * i).astype(np.int32),
    )
    for i in range(num_clients)
  }


data = data_lib.FederatedData.from_arrays(split(n), split(n // 4), split(n // 4))
config = cluster.get_config()
config.algorithm = alg_name
config.local_epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
config = config_lib.resolve(config)
model, alg = train.build(config, data)
t = time.time()
init = jax.jit(alg.init).lower(jax.random.key(0)).compile()
tc = time.time() - t
t = time.time()
state = init(jax.random.key(0))
jax.block_until_ready(state)
print(f"{alg_name}: init compile {tc:.1f}s run {time.time() - t:.2f}s", flush=True)
ids = np.arange(num_clients)
batch = data.train.gather(ids)
t = time.time()
lowered = jax.jit(alg.round).lower(state, ids, batch, jax.random.key(1))
tl = time.time() - t
t = time.time()
compiled = lowered.compile()
print(f"{alg_name}: round lower {tl:.1f}s compile {time.time() - t:.1f}s", flush=True)
memory = compiled.memory_analysis()
print(
  "  temp MB",
  memory.temp_size_in_bytes / 2**20,
  "args MB",
  memory.argument_size_in_bytes / 2**20,
)
for r in range(3):
  t = time.time()
  state, metrics = compiled(state, ids, batch, jax.random.key(1 + r))
  jax.block_until_ready(state)
  loss = float(metrics["train/loss"])
  print(f"{alg_name}: round {r} {time.time() - t:.2f}s loss {loss:.4f}", flush=True)
print("maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
