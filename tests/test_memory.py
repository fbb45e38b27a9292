"""Host memory: CIFAR-100's splits stay uint8, built in place (the same arrays as per-client dicts
concatenated, without those copies), standardised inside the jitted programs with the same
results as float32 splits normalised in NumPy, in a quarter of the round's argument bytes; the
benchmark's per-stage peaks are each stage's own."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import config as config_lib
from fedmerge_jax import fingerprint
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax import train
from fedmerge_jax.benchmark import memory
from fedmerge_jax.config import base_config
from fedmerge_jax.data import FederatedData, Standardize, cifar100, partition
from tests.conftest import TinyBN, tiny_base_config


def _cluster_config(num_clients=10):
  c = base_config().data
  c.name, c.partition, c.num_clients, c.num_clusters = "cifar100_cluster", "cluster", num_clients, 5
  c.classes_per_cluster, c.dirichlet_alpha, c.val_fraction, c.seed = 30, 10.0, 0.1, 11
  return c


def _cifar_like_arrays(rng, shape=(2, 2, 3)):
  train_y = rng.permutation(np.repeat(np.arange(100), 50)).astype(np.int32)
  test_y = rng.permutation(np.repeat(np.arange(100), 10)).astype(np.int32)
  images = lambda n: rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  return images(len(train_y)), train_y, images(len(test_y)), test_y


def test_cifar100_split_built_in_place_equals_the_per_client_dicts():
  arrays = _cifar_like_arrays(np.random.default_rng(0))
  train_y, test_y = arrays[1], arrays[3]
  got = cifar100.cluster_federation(arrays, _cluster_config())
  # Reference: each client's uint8 images on their own, through from_arrays.
  split = partition.cluster_partition(train_y, test_y, 10, 5, 30, 10.0, 0.1, 11, num_classes=100)
  dicts = lambda x, y, parts: {f"client_{i:03d}": (x[p], y[p]) for i, p in enumerate(parts)}
  want = FederatedData.from_arrays(
    dicts(arrays[0], train_y, split.train),
    dicts(arrays[2], test_y, split.test),
    dicts(arrays[0], train_y, split.val),
    num_classes=100,
    groups=dict(zip((f"client_{i:03d}" for i in range(10)), split.client_cluster.tolist())),
    name="cifar100_cluster",
    input_transform=cifar100.INPUT_TRANSFORM,
  )
  assert got.client_ids == want.client_ids and got.name == want.name
  assert got.input_transform == want.input_transform == cifar100.INPUT_TRANSFORM
  np.testing.assert_array_equal(got.groups, want.groups)
  for name in ("train", "test", "val"):
    a, b = getattr(got, name), getattr(want, name)
    assert a.x.dtype == b.x.dtype == np.uint8 and a.y.dtype == b.y.dtype
    for field in ("x", "y", "offsets"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=name + field)


def test_cifar100_input_transform_is_the_authors_normalisation():
  """Bit for bit the authors' float32 ToTensor + Normalize, for every pixel value and channel,
  inside a jitted program as outside it."""
  pixels = np.stack([np.arange(256, dtype=np.uint8)] * 3, -1).reshape(1, 16, 16, 3)
  mean = np.array([0.5071, 0.4867, 0.4408], np.float32)
  std = np.array([0.2675, 0.2565, 0.2761], np.float32)
  want = (pixels.astype(np.float32) / np.float32(255) - mean) / std
  got = jax.jit(cifar100.INPUT_TRANSFORM)(pixels)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(cifar100.normalize(pixels), want)
  # Float input (no table): the same to float32 rounding.
  floats = jax.jit(cifar100.INPUT_TRANSFORM)(pixels.astype(np.float32))
  np.testing.assert_allclose(floats, want, rtol=0, atol=1e-6)


SIZES, TEST_SIZES, VAL_SIZES = [3, 6, 9, 13], [4, 5, 2, 7], [3, 2, 4, 1]  # Batch 4: partial last.
EXAMPLE = (8, 8, 3)
TRANSFORM = Standardize((0.3, 0.5, 0.6), (0.2, 0.25, 0.3), divide_by=255)


def _normalised_in_numpy(x):
  """The reference: TRANSFORM's standardisation as torchvision's ToTensor and Normalize compute
  it (the authors' pipeline), in float32 NumPy."""
  mean, std = np.array([0.3, 0.5, 0.6], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
  return (x.astype(np.float32) / np.float32(255) - mean) / std


@pytest.fixture(scope="module")
def uint8_and_float32():
  """The same random uint8 images twice: kept uint8 with TRANSFORM, and float32 normalised in
  NumPy without one; unequal clients."""
  rng = np.random.default_rng(0)
  split = lambda sizes: {
    f"c{i}": (rng.integers(0, 256, (n, *EXAMPLE), dtype=np.uint8), rng.integers(0, 3, n))
    for i, n in enumerate(sizes)
  }
  splits = [split(SIZES), split(TEST_SIZES), split(VAL_SIZES)]
  as_float = lambda d: {k: (_normalised_in_numpy(x), y) for k, (x, y) in d.items()}
  uint8 = FederatedData.from_arrays(*splits, num_classes=3, input_transform=TRANSFORM)
  float32 = FederatedData.from_arrays(*map(as_float, splits), num_classes=3)
  assert uint8.train.x.dtype == np.uint8 and float32.train.x.dtype == np.float32
  return uint8, float32


ROUND_CLIENTS = np.array([3, 0, 2])  # Partial participation: 3 of 4 clients.


def _round_and_evaluation(data):
  """One FedAvg round (BatchNorm model, an evaluation round: the gap probe's test split
  attached) and its evaluation, as train.py runs them; and the compiled round's memory."""
  config = tiny_base_config()
  config.algorithm, config.clients_per_round, config.batch_size = "fedavg", len(ROUND_CLIENTS), 4
  config = config_lib.resolve(config)
  mesh = parallel.make_mesh(1)
  layout = parallel.client_layout(1, data.num_clients, config.clients_per_round, 0)
  _, algorithm = train.build(config, data, layout, TinyBN(3))
  state, shardings = parallel.sharded_init(
    algorithm.init, mesh, layout.population, jax.random.key(0)
  )
  gather = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)
  ids, sharded_ids, batch = gather(ROUND_CLIENTS, data.test)
  rng = jax.random.key(1)
  compiled = (
    train.compile_round(algorithm, config, mesh, shardings)
    .lower(state, sharded_ids, batch, rng)
    .compile()
  )
  state, round_metrics = compiled(state, sharded_ids, batch, rng)
  evaluate = train.round_evaluator(algorithm, data, config, mesh, (0, 0))
  metrics, _, _ = evaluate(state, 1, ids, round_metrics)
  return metrics, compiled.memory_analysis(), batch


@pytest.fixture(scope="module")
def both_runs(uint8_and_float32):
  return [_round_and_evaluation(data) for data in uint8_and_float32]


def test_uint8_standardised_in_the_programs_equals_float32_normalised_in_numpy(both_runs):
  (got, _, _), (want, _, _) = both_runs
  assert set(got) == set(want)
  for key in ("train/loss", "test/loss", "test/acc_mean", "val/loss", "gap/loss_mean"):
    assert got[key] == want[key], key  # Bit for bit: the model sees the same float32 inputs.
  assert got == want


def test_the_round_takes_uint8_in_a_quarter_of_the_bytes_and_converts_a_batch_at_a_time(both_runs):
  (_, got, batch), (_, want, float_batch) = both_runs
  assert batch.train.x.dtype == batch.test.x.dtype == np.uint8
  assert float_batch.train.x.dtype == np.float32
  images = batch.train.x.size + batch.test.x.size
  # The arguments differ by the images' bytes alone: 1 byte each instead of 4.
  assert want.argument_size_in_bytes - got.argument_size_in_bytes == 3 * images
  # No up-front float32 copy of the round's (or a client's) images: a client's padded train
  # split in float32 is a third of the round's; the temporaries stay below a quarter of it.
  assert got.temp_size_in_bytes - want.temp_size_in_bytes < batch.train.x.size


def test_a_transformed_model_computes_in_its_params_dtype_and_is_not_wrapped_twice():
  """bfloat16 params (compute_dtype='bfloat16') get the standardised input in bfloat16, as a
  float input cast to the compute dtype; wrapping again changes nothing."""
  model = models.with_input_transform(TinyBN(3), TRANSFORM)
  assert models.with_input_transform(model, TRANSFORM) is model
  assert models.takes_mask(model) and not models.takes_mask(
    models.with_input_transform(models.get_model(tiny_base_config().model, 3), TRANSFORM)
  )
  x = np.random.default_rng(1).integers(0, 256, (5, *EXAMPLE), dtype=np.uint8)
  variables = jax.jit(TinyBN(3).init)(jax.random.key(0), jnp.zeros((1, *EXAMPLE)))
  shapes = lambda init, x: jax.tree.map(jnp.shape, jax.eval_shape(init, jax.random.key(0), x))
  assert shapes(model.init, x) == shapes(TinyBN(3).init, x)  # Same variables: a shared scope.
  bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables)
  for v, dtype in ((variables, jnp.float32), (bf16, jnp.bfloat16)):
    want = jax.jit(TinyBN(3).apply)(v, jnp.asarray(_normalised_in_numpy(x)).astype(dtype))
    np.testing.assert_allclose(jax.jit(model.apply)(v, x), want, rtol=1e-6, atol=1e-6)


def test_a_workdir_of_float32_cifar100_is_refused_and_one_without_transforms_accepted(
  tmp_path, uint8_and_float32
):
  """CIFAR-100 workdirs from before (float32 splits, no transform) hold another pipeline:
  refused, naming the change. Data without a transform fingerprints as before."""
  uint8, float32 = uint8_and_float32
  config = config_lib.resolve(tiny_base_config())
  model = TinyBN(3)
  before = fingerprint.fingerprint(config, float32, model)
  before["data"].pop("input_transform", None)  # Recorded before transforms existed.
  (tmp_path / fingerprint.FILE).write_text(json.dumps(before))
  fingerprint.check(str(tmp_path), fingerprint.fingerprint(config, float32, model))  # Accepted.
  with pytest.raises(fingerprint.ExperimentMismatch, match="x_dtype: 'float32' -> 'uint8'"):
    fingerprint.check(str(tmp_path), fingerprint.fingerprint(config, uint8, model))
  other = dataclasses.replace(uint8, input_transform=Standardize((0, 0, 0), (1, 1, 1)))
  found = fingerprint.differences(
    fingerprint.fingerprint(config, uint8, model), fingerprint.fingerprint(config, other, model)
  )
  assert [f.split(":")[1] for f in found] == [" input_transform"]


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
