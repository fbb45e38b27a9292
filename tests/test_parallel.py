"""Client execution strategies and streamed server sums give the same results as stacking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import parallel, train
from fedmerge_jax.config import resolve
from conftest import make_federation

STRATEGIES = [("vmap", 0), ("vmap", 2), ("vmap", 3), ("sequential", 0)]


def _close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("parallelism,chunk", STRATEGIES + [("vmap", 1), ("vmap", 7)])
def test_map_clients_maps_and_reduces_like_vmap(parallelism, chunk):
  x = jax.random.normal(jax.random.key(0), (7, 3))
  w = jnp.arange(7.0)
  fn = lambda xi, wi: {"sq": xi**2, "dot": wi * jnp.sum(xi)}
  expected = jax.vmap(fn)(x, w)
  _close(parallel.map_clients(fn, (x, w), chunk, parallelism), expected)

  def reduce(args, out):
    return jnp.einsum("c,cd->d", args[1], out["sq"]), out["dot"]

  total, kept = jax.jit(
    lambda x, w: parallel.map_clients(fn, (x, w), chunk, parallelism, reduce=reduce)
  )(x, w)
  _close(total, jnp.einsum("c,cd->d", w, expected["sq"]))
  _close(kept, expected["dot"])


def test_auto_parallelism_resolves_per_backend():
  expected = "sequential" if jax.default_backend() == "cpu" else "vmap"
  assert parallel.resolve_parallelism("auto") == expected
  assert parallel.resolve_parallelism("vmap") == "vmap"
  with pytest.raises(ValueError, match="client_parallelism"):
    parallel.resolve_parallelism("pmap")


def _round(config, data, algorithm, parallelism, chunk, **overrides):
  config.algorithm = algorithm
  config.client_parallelism = parallelism
  config.client_chunk_size = chunk
  for key, value in overrides.items():
    config[key] = value
  _, alg = train.build(resolve(config), data)
  state = alg.init(jax.random.key(0))
  if hasattr(state, "logits"):  # Non-uniform weights, so that every term matters.
    state = state.replace(logits=jax.random.normal(jax.random.key(5), state.logits.shape))
  ids = np.array([0, 1, 3, 4, 5, 6, 7])
  batch = data.train.gather(ids)
  rng = jax.random.key(7)
  new, metrics = jax.jit(alg.round)(state, ids, batch, rng)
  stacked = None
  if alg.stages is not None and algorithm != "ifca":  # IFCA assigns logits inside its round.
    deltas, _ = jax.jit(alg.stages.train)(state, ids, batch, rng)
    stacked = jax.jit(alg.stages.server)(state, ids, batch, deltas)
  return new, metrics, stacked


CASES = [
  ("fedmerge", {"update_mode": "official"}),
  ("fedmerge", {"update_mode": "gradient"}),
  ("fedmerge", {"update_mode": "official", "num_global_models": 1}),
  ("fedavg", {}),
  ("fedprox", {}),
  ("ifca", {}),
  ("fedem", {}),
  ("ditto", {}),
]


@pytest.mark.parametrize("algorithm,overrides", CASES)
def test_rounds_are_identical_across_strategies_and_equal_the_stacked_server(
  tiny_config, algorithm, overrides
):
  data = make_federation(num_clients=8)
  reference, ref_metrics, stacked = _round(tiny_config, data, algorithm, "vmap", 0, **overrides)
  if stacked is not None:  # The round (streamed where it can) equals server(all deltas).
    _close(reference, stacked, rtol=1e-4, atol=1e-6)
  for parallelism, chunk in STRATEGIES[1:]:
    new, metrics, _ = _round(tiny_config, data, algorithm, parallelism, chunk, **overrides)
    _close(new, reference, rtol=1e-4, atol=1e-6)
    _close(metrics, ref_metrics, rtol=1e-4, atol=1e-6)


def _round_temp_bytes(config, num_clients, algorithm, num_global_models, parallelism):
  """XLA's temporary-buffer bytes of one compiled round over `num_clients` clients, chunks of 2."""
  config.algorithm = algorithm
  config.num_global_models = num_global_models
  config.client_parallelism = parallelism
  config.client_chunk_size = 2
  config.model.hidden_sizes = (256, 256)  # Parameters dominate activations.
  data = make_federation(num_clients=num_clients, sizes=[4] * num_clients)
  _, alg = train.build(resolve(config), data)
  state = jax.eval_shape(alg.init, jax.random.key(0))
  ids = np.arange(num_clients)
  compiled = (
    jax.jit(alg.round).lower(state, ids, data.train.gather(ids), jax.random.key(0)).compile()
  )
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("No memory analysis on this backend.")
  return analysis.temp_size_in_bytes


DELTA_BYTES = 4 * (16 * 256 + 256 * 256 + 256 * 3)  # One client's delta: ~280 kB.


@pytest.mark.parametrize(
  "algorithm,k,parallelism,deltas_kept",
  [
    ("fedavg", 1, "vmap", 0),
    ("fedavg", 1, "sequential", 0),
    ("fedmerge", 1, "vmap", 0),
    ("fedmerge", 3, "vmap", 1),
    ("fedmerge", 3, "sequential", 1),
  ],
)
def test_round_memory_grows_with_chunk_size_not_clients(
  tiny_config, algorithm, k, parallelism, deltas_kept
):
  """Streamed rounds hold no per-client deltas; official K > 1 holds exactly one per client."""
  extra = (
    _round_temp_bytes(tiny_config, 64, algorithm, k, parallelism)
    - _round_temp_bytes(tiny_config, 8, algorithm, k, parallelism)
  ) / 56
  assert deltas_kept * DELTA_BYTES <= extra < (deltas_kept + 0.1) * DELTA_BYTES


# 16x16 images and a small step: on tiny images BatchNorm over a 2-row batch at 1x1 spatial
# size amplifies float rounding differences between strategies into visible ones.
@pytest.mark.parametrize(
  "model,shape", [("resnet9", (16, 16, 3)), ("emnist_cnn", (8, 8, 1))], ids=["batchnorm", "dropout"]
)
def test_batchnorm_and_dropout_rounds_do_not_depend_on_strategy_or_order(tiny_config, model, shape):
  """vmap (one chunk, chunks of 3), one client at a time and any order of the round's clients
  give the same round for a BatchNorm model and a dropout model on unequal clients."""
  data = make_federation(num_clients=6, sizes=[3, 17, 6, 11, 1, 9], example_shape=shape)
  tiny_config.model.name = model
  tiny_config.algorithm = "fedmerge"
  tiny_config.client_lr = 0.01
  _, alg = train.build(resolve(tiny_config), data)
  state = alg.init(jax.random.key(0))
  state = state.replace(logits=jax.random.normal(jax.random.key(5), state.logits.shape))
  rng = jax.random.key(7)

  def run(ids, parallelism, chunk):
    config = tiny_config.copy_and_resolve_references()
    config.client_parallelism, config.client_chunk_size = parallelism, chunk
    _, alg = train.build(resolve(config), data)
    batch = data.train.gather(ids, data.train.padded_length(ids, 4))
    return jax.jit(alg.round)(state, np.asarray(ids, np.int32), batch, rng)

  ids = np.array([0, 1, 2, 3, 5])
  reference, ref_metrics = run(ids, "vmap", 0)
  for order, parallelism, chunk in [
    (parallel.largest_first(ids, data.train.counts), "vmap", 2),
    (ids[::-1], "sequential", 0),
  ]:
    new, metrics = run(order, parallelism, chunk)
    _close(new, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)


def test_largest_first_groups_clients_by_size():
  counts = np.array([5, 40, 7, 40, 0, 12])
  np.testing.assert_array_equal(parallel.largest_first([0, 2, 3, 5, 1], counts), [3, 1, 5, 2, 0])


def test_round_gatherer_pads_to_the_rounds_bucket_not_the_population(tiny_data):
  """A round of small clients is padded to its own largest (bucketed), not the population's."""
  data = make_federation(num_clients=5, sizes=[3, 40, 5, 9, 2])
  layout = parallel.client_layout(1, 5, 2, 0)
  gather = parallel.RoundGatherer(data.train, layout, parallel.make_mesh(1), multiple=4)
  ids, _, batch = gather(np.array([0, 2]))
  np.testing.assert_array_equal(ids, [2, 0])  # Largest first.
  assert batch.x.shape[1] == 8  # 5 examples -> bucket 4 * 2; the population's largest is 40.
  np.testing.assert_array_equal(batch.count, [5, 3])
  np.testing.assert_array_equal(batch.x[1, :3], data.train.client(0)[0])
  assert not batch.x[1, 3:].any()
  _, _, batch = gather(np.array([1, 4]))
  assert batch.x.shape[1] == 40  # 40 -> 64 would exceed the largest client: capped at 40.


def test_inits_compile_at_the_cheaper_cpu_level_to_the_same_bits(monkeypatch):
  """An algorithm's init compiled with INIT_CPU_OPTIONS (LLVM level 1: seconds less to
  compile) equals the default level 2's bit for bit (truncated normals, BatchNorm, K
  stacked models); the level of a user's own XLA_FLAGS, and other backends, are left alone."""
  from conftest import TinyBN, tiny_base_config  # pylint: disable=g-import-not-at-top

  config = resolve(tiny_base_config())
  config.num_global_models = 3
  _, algorithm = train.build(config, make_federation(), model=TinyBN())
  init = lambda options: jax.jit(algorithm.init, compiler_options=options)(jax.random.key(4))
  default = jax.tree.leaves(init({"xla_backend_optimization_level": 2}))
  cheaper = jax.tree.leaves(init(parallel.INIT_CPU_OPTIONS))
  assert len(default) == len(cheaper) > 4
  for want, got in zip(default, cheaper):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
  assert parallel.init_compiler_options("cpu") == parallel.INIT_CPU_OPTIONS
  assert parallel.init_compiler_options("gpu") is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  assert parallel.init_compiler_options("cpu") is None
