"""config.compute_dtype: bf16 activations and matmuls, float32 everything that is kept."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import client, config as config_lib, train
from fedmerge_jax.models.layers import BatchNorm
from conftest import TinyBN, make_federation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCURACY_MARGIN = 0.05  # bf16's final mean test accuracy within this of float32's.


def _default_config(rounds: int):
  """The offline default for `rounds` rounds, evaluating every round: one round program to
  compile (an evaluating round's batch also holds the test split), not two."""
  spec = importlib.util.spec_from_file_location(
    "default_config", os.path.join(ROOT, "configs", "default.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.num_rounds, config.eval_every = rounds, 1
  config.checkpoint_every, config.tensorboard = 0, False
  return config


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
  """The offline default, 30 rounds, in float32 and in bfloat16: (summary, train losses at
  rounds 15 and 30)."""
  runs = {}
  for dtype in client.COMPUTE_DTYPES:
    config = _default_config(30)
    config.compute_dtype = dtype
    workdir = str(tmp_path_factory.mktemp(dtype))
    summary = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      losses = {line["round"]: line["train/loss"] for line in map(json.loads, f)}
    runs[dtype] = summary, [losses[15], losses[30]]
  return runs


def test_bf16_default_run_trains_and_stays_near_float32(default_runs):
  (f32, f32_losses), (bf16, bf16_losses) = default_runs["float32"], default_runs["bfloat16"]
  assert bf16_losses[-1] < 0.9 * bf16_losses[0]  # Rounds 15 -> 30 (log(10) = 2.30 at first).
  assert bf16["test/acc_mean"] > 0.4  # 10 classes: far above chance.
  assert abs(bf16["test/acc_mean"] - f32["test/acc_mean"]) <= ACCURACY_MARGIN
  assert bf16_losses != f32_losses  # It did compute in another dtype.


def test_bf16_round_keeps_parameters_optimizer_state_and_statistics_float32(tiny_config):
  config = config_lib.resolve(tiny_config)
  config.compute_dtype = "bfloat16"
  data = make_federation(num_clients=4)
  _, alg = train.build(config, data, model=TinyBN())
  state = alg.init(jax.random.key(0))
  ids = np.arange(4)
  new, metrics = jax.jit(alg.round)(state, ids, data.train.gather(ids), jax.random.key(1))
  assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(jnp.float32)}
  assert metrics["train/loss"].dtype == jnp.float32
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new.globals), jax.tree.leaves(state.globals))
  )
  model = TinyBN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16)))
  one = jax.tree.map(lambda a: a[2], data.train.gather(ids))
  f32_delta, _ = client.local_train(
    model.apply,
    variables,
    one,
    jax.random.key(2),
    client.LocalConfig(2, 4, 0.1, 0.01),
    takes_mask=True,
  )
  bf16_delta, _ = client.local_train(
    model.apply,
    variables,
    one,
    jax.random.key(2),
    client.LocalConfig(2, 4, 0.1, 0.01, compute_dtype="bfloat16"),
    takes_mask=True,
  )
  for a, b in zip(jax.tree.leaves(f32_delta), jax.tree.leaves(bf16_delta)):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.02)  # bf16: 8 bits of mantissa.
  assert not all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(f32_delta), jax.tree.leaves(bf16_delta))
  )


def test_batchnorm_statistics_of_bf16_inputs_are_computed_in_float32():
  """Values near 1000 with a spread of ~1: bf16 sums would lose the variance entirely."""
  x = (1000.0 + jax.random.normal(jax.random.key(0), (64, 3))).astype(jnp.bfloat16)
  bn = BatchNorm(use_running_average=False, momentum=0.0)
  variables = bn.init(jax.random.key(1), x)
  y, updated = bn.apply(variables, x, mutable=["batch_stats"])
  exact = np.asarray(x, np.float64)
  assert y.dtype == jnp.bfloat16
  assert updated["batch_stats"]["mean"].dtype == jnp.float32
  np.testing.assert_allclose(updated["batch_stats"]["mean"], exact.mean(0), rtol=1e-6)
  np.testing.assert_allclose(updated["batch_stats"]["var"], exact.var(0), rtol=1e-3)


def test_compute_dtype_is_validated_in_one_line():
  config = config_lib.base_config()
  config.compute_dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match=r"compute_dtype='float16' is not one of"):
    config_lib.validate(config)
