"""The static-trip-count local loop against the while loop, and the chosen client chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import client, models, parallel, train
from fedmerge_jax.config import resolve
from conftest import TinyBN, TinyDropout, make_federation

LOCAL = client.LocalConfig(local_epochs=2, batch_size=4, client_lr=0.1, prox_mu=0.05)
SIZES = [13, 7, 5, 2, 0]  # Unequal, partial last batches (B = 4), and one without examples.
MAX_N = 16


def _clients(model, seed=0):
  """SIZES clients padded to MAX_N rows, one received model, one key each."""
  rng = np.random.default_rng(seed)
  x = np.zeros((len(SIZES), MAX_N, 6), np.float32)
  y = np.zeros((len(SIZES), MAX_N), np.int32)
  for i, n in enumerate(SIZES):
    x[i, :n] = rng.normal(size=(n, 6))
    y[i, :n] = rng.integers(0, 3, n)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 6)))
  data = client.ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(SIZES, jnp.int32))
  return variables, data, jax.random.split(jax.random.key(seed + 1), len(SIZES))


def _train(model, local):
  """One client's local training of `model` (told whether it takes BatchNorm's mask)."""
  return lambda v, d, k: client.local_train(
    model.apply, v, d, k, local, takes_mask=models.takes_mask(model)
  )


def _vmapped(model, local):
  return jax.jit(jax.vmap(_train(model, local), in_axes=(None, 0, 0)))


@pytest.mark.parametrize(
  "model,batching,unroll",
  [(TinyBN(), "epoch", 1), (TinyDropout(), "stream", 3)],
  ids=["batchnorm-epoch", "dropout-stream-unroll3"],
)
def test_static_loop_equals_the_while_loop_under_vmap(model, batching, unroll):
  variables, data, keys = _clients(model)
  local = LOCAL._replace(batching=batching)
  expected = _vmapped(model, local)(variables, data, keys)
  static = _vmapped(model, local._replace(loop="static", unroll=unroll))(variables, data, keys)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), static, expected
  )  # Deltas (BatchNorm statistics included) and train_loss.
  one = jax.tree.map(lambda a: a[3], data)  # Alone, with the while loop's own count.
  alone = jax.jit(_train(model, local))(variables, one, keys[3])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a[3], b, rtol=1e-5, atol=1e-6), static, alone
  )


def test_static_loop_has_a_fixed_trip_count_from_the_padded_length():
  """What keeps XLA:GPU from copying the loop predicate to the host every step: no while
  loop whose predicate depends on the data, one scan of the padded length's step count."""
  model = TinyDropout()
  variables, data, keys = _clients(model)
  local = LOCAL._replace(loop="static")
  train_all = jax.vmap(_train(model, local), in_axes=(None, 0, 0))
  jaxpr = str(jax.make_jaxpr(train_all)(variables, data, keys))
  assert "while[" not in jaxpr
  assert f"length={client.num_local_steps(MAX_N, local)}" in jaxpr
  while_jaxpr = str(
    jax.make_jaxpr(jax.vmap(_train(model, LOCAL), in_axes=(None, 0, 0)))(variables, data, keys)
  )
  assert "while[" in while_jaxpr


def test_auto_loop_is_static_only_for_one_vmapped_chunk_on_accelerators():
  assert parallel.resolve_local_loop("auto", "vmap", 0, backend="gpu") == "static"
  assert parallel.resolve_local_loop("auto", "vmap", 0, backend="tpu") == "static"
  assert parallel.resolve_local_loop("auto", "vmap", 32, backend="gpu") == "while"
  assert parallel.resolve_local_loop("auto", "sequential", 0, backend="gpu") == "while"
  assert parallel.resolve_local_loop("auto", "vmap", 0, backend="cpu") == "while"
  assert parallel.resolve_local_loop("static", "sequential", 0, backend="cpu") == "static"


def test_command_buffers_are_gpu_options_only():
  assert parallel.command_buffer_options("loops", backend="gpu") == {
    "xla_gpu_enable_command_buffer": "+WHILE,+CONDITIONAL"
  }
  assert parallel.command_buffer_options("off", backend="gpu") == {
    "xla_gpu_enable_command_buffer": ""
  }
  assert parallel.command_buffer_options("default", backend="gpu") == {}
  assert parallel.command_buffer_options("loops", backend="cpu") == {}
  config = resolve(train.config_lib.base_config())
  config.command_buffers = "loops"
  assert train.compiler_options(config, backend="cpu") == train.compiler_options(
    resolve(train.config_lib.base_config()), backend="cpu"
  )


def _reference_choice(steps, bytes_per_member, free_bytes, min_fraction=0.85):
  """The rule written out: try every chunk from large to small, chunks as lists."""
  steps = list(steps)
  for chunk in range(len(steps), 0, -1):
    if chunk * bytes_per_member > free_bytes:
      continue
    parts = [steps[i : i + chunk] for i in range(0, len(steps), chunk)]
    computed = sum(len(p) * max(p) for p in parts)
    if chunk == 1 or sum(steps) / computed >= min_fraction:
      return chunk
  return 1


@pytest.mark.parametrize(
  "steps,bytes_per_member,free_bytes",
  [
    ([10] * 4 + [5] * 4, 1, 100),  # A jump: the whole round would be 0.75 real.
    ([10] * 4 + [5] * 4, 1, 3),  # Memory caps it.
    ([7] * 9, 10, 1000),  # Equal steps: everything that fits.
    ([7] * 9, 10, 95),
    ([22, 21, 20, 20, 18, 15, 12, 11, 11, 10, 9, 8, 6, 4, 3, 3], 3, 40),
    ([22, 21, 20, 20, 18, 15, 12, 11, 11, 10, 9, 8, 6, 4, 3, 3], 3, 1e9),
    ([5, 1], 1, 0),  # Nothing fits: one at a time.
  ],
)
def test_chunk_chooser_keeps_the_real_fraction_and_fits_memory(steps, bytes_per_member, free_bytes):
  chosen = parallel.choose_chunk_size(steps, bytes_per_member, free_bytes)
  assert chosen == _reference_choice(steps, bytes_per_member, free_bytes)
  assert chosen == 1 or chosen * bytes_per_member <= free_bytes


def test_chunk_chooser_on_femnist_like_sizes():
  rng = np.random.default_rng(0)
  sizes = np.sort(np.clip(np.rint(rng.lognormal(5.18, 0.5, 128)), 20, 418))[::-1]
  steps = [
    client.num_local_steps(int(n), LOCAL._replace(local_epochs=1, batch_size=20)) for n in sizes
  ]
  chosen = parallel.choose_chunk_size(steps, 1, 1e9)
  assert 1 < chosen < 128
  assert sum(steps) >= 0.85 * parallel.computed_steps(steps, chosen)
  assert sum(steps) < 0.85 * parallel.computed_steps(steps, 128)  # One chunk would not do.


@pytest.fixture(scope="module")
def femnist_like():
  sizes = [40, 37, 33, 30, 12, 10, 9, 8, 3, 2]
  return make_federation(num_clients=len(sizes), sizes=sizes)


def test_chosen_chunk_on_an_accelerator_and_not_on_cpu(tiny_config, femnist_like):
  config = resolve(tiny_config)
  config.client_parallelism = "vmap"
  mesh = parallel.make_mesh(1)
  assert train.chosen_chunk_size(config, femnist_like, mesh) == 0  # CPU: as given.
  plenty = train.chosen_chunk_size(config, femnist_like, mesh, backend="gpu", free_bytes=10**12)
  no_room = train.chosen_chunk_size(config, femnist_like, mesh, backend="gpu", free_bytes=10**4)
  assert 1 < plenty < femnist_like.num_clients  # The step counts jump: split there.
  assert no_room == 1  # Less than one client's training fits: one at a time.
  assert plenty == 4  # Steps 20 20 18 16 | 6 6 6 4 | 2 2: 100 real of 108 computed.
  config.client_chunk_size = 3
  assert (
    train.chosen_chunk_size(config, femnist_like, mesh, backend="gpu", free_bytes=10**12) == 3
  )  # An explicit number wins.
  equal = make_federation(num_clients=6, sizes=[9] * 6)
  config.client_chunk_size = 0
  assert train.chosen_chunk_size(config, equal, mesh, backend="gpu", free_bytes=10**12) == 0


def test_round_results_do_not_depend_on_the_chosen_chunk(tiny_config, femnist_like):
  """With the static loop: chunks after the first run the round's count, masked."""
  config = resolve(tiny_config)
  config.client_parallelism = "vmap"
  config.local_loop = "static"
  chosen = train.chosen_chunk_size(
    config, femnist_like, parallel.make_mesh(1), backend="gpu", free_bytes=10**12
  )
  assert 0 < chosen < femnist_like.num_clients
  ids = parallel.largest_first(np.arange(femnist_like.num_clients), femnist_like.train.counts)
  batch = femnist_like.train.gather(ids, femnist_like.train.padded_length(ids, config.batch_size))
  results = []
  for chunk in (0, chosen):
    config.client_chunk_size = chunk
    _, alg = train.build(config, femnist_like)
    state = alg.init(jax.random.key(0))
    results.append(jax.jit(alg.round)(state, ids, batch, jax.random.key(1)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)
