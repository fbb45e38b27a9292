"""Hyper-parameters as values, and replica groups: R runs as one vmapped program.

The reference is always the separate run (`train.build` with plain constants, or
`train_and_evaluate`). Float tolerance: vmapping replicas changes only the summation order of
batched matmuls, so metrics agree to 1e-5 absolute (observed: bit-equal up to ~1e-7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_federation, tiny_base_config
from fedmerge_jax import config as config_lib
from fedmerge_jax import hyperparams
from fedmerge_jax import train

TOL = 1e-5


@pytest.fixture(scope="module")
def data():
  return make_federation(num_clients=5, sizes=[3, 9, 5, 12, 7])


def test_one_compiled_round_serves_two_learning_rates_and_seeds(data):
  """The program compiled once for the values gives each value's separately built round."""
  config = config_lib.resolve(tiny_base_config())
  build = lambda c: train.build(c, data)[1]
  valued = hyperparams.valued(build, config)
  round_fn, init = jax.jit(valued.round), jax.jit(valued.init)
  ids = np.arange(data.num_clients)
  batch = data.train.gather(ids)
  for client_lr, seed in [(0.1, 0), (0.4, 3)]:
    own = config.copy_and_resolve_references()
    own.client_lr, own.seed = client_lr, seed
    state, metrics = round_fn(init((jax.random.key(seed), hyperparams.values_of(own))), ids,
                              batch, jax.random.key(7))
    separate = build(own)
    expected_state, expected = jax.jit(separate.round)(separate.init(jax.random.key(seed)), ids,
                                                       batch, jax.random.key(7))
    np.testing.assert_allclose(metrics["train/loss"], expected["train/loss"], atol=TOL)
    for got, want in zip(jax.tree.leaves(state.inner), jax.tree.leaves(expected_state)):
      np.testing.assert_allclose(got, want, atol=TOL)
  assert round_fn._cache_size() == 1  # pylint: disable=protected-access


def test_program_key_ignores_only_the_value_fields():
  config = config_lib.resolve(tiny_base_config())
  other = config.copy_and_resolve_references()
  other.client_lr, other.seed, other.ditto_lambda = 0.3, 5, 0.7
  assert hyperparams.program_key(other) == hyperparams.program_key(config)
  other.local_epochs = 3
  assert hyperparams.program_key(other) != hyperparams.program_key(config)
