"""Host memory: CIFAR-100's splits are built in place (the same arrays as per-client dicts
concatenated, without those copies), and the benchmark's per-stage peaks are each stage's own."""

import numpy as np
import pytest

from fedmerge_jax.benchmark import memory
from fedmerge_jax.config import base_config
from fedmerge_jax.data import FederatedData, cifar100, partition


def test_cifar100_split_built_in_place_equals_the_per_client_dicts():
  rng = np.random.default_rng(0)
  train_y = rng.permutation(np.repeat(np.arange(100), 50)).astype(np.int32)
  test_y = rng.permutation(np.repeat(np.arange(100), 10)).astype(np.int32)
  images = lambda n: rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
  arrays = (images(len(train_y)), train_y, images(len(test_y)), test_y)
  c = base_config().data
  c.name, c.partition, c.num_clients, c.num_clusters = "cifar100_cluster", "cluster", 10, 5
  c.classes_per_cluster, c.dirichlet_alpha, c.val_fraction, c.seed = 30, 10.0, 0.1, 11
  got = cifar100.cluster_federation(arrays, c)
  # Reference: each client's images normalised on their own, through from_arrays.
  split = partition.cluster_partition(train_y, test_y, 10, 5, 30, 10.0, 0.1, 11, num_classes=100)
  dicts = lambda x, y, parts: {
    f"client_{i:03d}": (cifar100.normalize(x[p]), y[p]) for i, p in enumerate(parts)
  }
  want = FederatedData.from_arrays(
    dicts(arrays[0], train_y, split.train),
    dicts(arrays[2], test_y, split.test),
    dicts(arrays[0], train_y, split.val),
    num_classes=100,
    groups=dict(zip((f"client_{i:03d}" for i in range(10)), split.client_cluster.tolist())),
    name="cifar100_cluster",
  )
  assert got.client_ids == want.client_ids and got.name == want.name
  np.testing.assert_array_equal(got.groups, want.groups)
  for name in ("train", "test", "val"):
    a, b = getattr(got, name), getattr(want, name)
    assert a.x.dtype == b.x.dtype == np.float32 and a.y.dtype == b.y.dtype
    for field in ("x", "y", "offsets"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=name + field)


@pytest.mark.skipif(not memory.reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs")
def test_stage_peaks_are_each_stages_own():
  peaks = memory.StagePeaks()
  with peaks.stage("big"):
    block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched.
    del block
  with peaks.stage("small"):
    np.ones(1024, np.uint8)
  assert peaks.bytes["big"] - peaks.bytes["small"] > 48 * 2**20
  assert peaks.after["small"] <= peaks.bytes["small"]


@pytest.mark.skipif(not memory.reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs")
def test_a_gathered_round_is_read_in_place_by_a_jitted_call_not_copied():
  """64 MiB of padded client data: the jitted call adds far less than its size on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedmerge_jax.data import ClientArrays  # pylint: disable=g-import-not-at-top

  n, shape = 4, (1024, 1024)
  arrays = ClientArrays(
    np.ones((n, *shape), np.float32), np.zeros(n, np.int32), np.arange(n + 1, dtype=np.int64)
  )
  total = jax.jit(lambda x: jnp.sum(x[:, :, 0]))
  total(jnp.ones((4, 4, *shape[1:]), jnp.float32))  # The runtime's own first-call memory.
  peaks = memory.StagePeaks()
  with peaks.stage("gather"):
    batch = arrays.gather(np.arange(n), length=4)
  assert batch.x.ctypes.data % 64 == 0 and batch.x.nbytes == 64 * 2**20
  with peaks.stage("call"):
    assert float(total(batch.x)) == n * 1024
  assert peaks.bytes["call"] - peaks.after["gather"] < 16 * 2**20
