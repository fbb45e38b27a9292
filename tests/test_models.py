"""Models: parameter counts, heads, and the conv forms giving the same numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedmerge_jax import models
from fedmerge_jax.models.layers import Conv, max_pool


def _config(name, conv_impl="auto"):
  return ml_collections.ConfigDict({"name": name, "hidden_sizes": (16,), "conv_impl": conv_impl})


def test_emnist_cnn_has_fedjax_parameter_count():
  model = models.get_model(_config("emnist_cnn"), 62)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert models.count_params(variables) == 1_206_590


def test_leaf_femnist_cnn_has_leaf_parameter_count():
  model = models.get_model(_config("leaf_femnist_cnn"), 62)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert models.count_params(variables) == 6_603_710


@pytest.mark.parametrize(
  "name,shape", [("mlp", (8, 8, 1)), ("emnist_cnn", (28, 28, 1)), ("leaf_femnist_cnn", (28, 28, 1))]
)
def test_every_model_has_a_head(name, shape):
  model = models.get_model(_config(name), 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  mask = models.head_mask(variables)
  head = [m for m in jax.tree.leaves(mask) if m]
  assert len(head) == 2  # kernel and bias of the last layer only
  assert variables["params"]["head"]["kernel"].shape[-1] == 10


@pytest.mark.parametrize("impl", ["patches", "canonical"])
@pytest.mark.parametrize(
  "padding,kernel,strides",
  [
    ("VALID", (3, 3), 1),
    ("SAME", (5, 5), 1),
    ("SAME", (2, 3), 1),
    (1, (3, 3), 2),
    (0, (1, 1), 2),
    ("VALID", (3, 3), 2),
  ],
)
def test_conv_forms_equal_xla_conv_in_value_and_gradient(impl, padding, kernel, strides):
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
  xla = Conv(4, kernel, padding, impl="xla", strides=strides)
  other = Conv(4, kernel, padding, impl=impl, strides=strides)
  variables = xla.init(jax.random.key(1), x)
  np.testing.assert_allclose(
    xla.apply(variables, x), other.apply(variables, x), rtol=1e-5, atol=1e-5
  )
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  g1 = jax.grad(loss(xla), argnums=(0, 1))(variables, x)
  g2 = jax.grad(loss(other), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g2)
  # And per-client kernels under vmap (how 'vmap' client parallelism runs it).
  stacked = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), variables)
  per_client = lambda m: jax.vmap(jax.grad(loss(m), argnums=(0, 1)), in_axes=(0, None))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
    per_client(xla)(stacked, x),
    per_client(other)(stacked, x),
  )


def test_max_pool_equals_flax_after_relu_in_value_and_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  x = x.at[0, :2, :2].set(-1.0)  # A window of tied (zero) maxima after the ReLU.
  ours = lambda x: max_pool(jax.nn.relu(x), 2)
  flax_pool = lambda x: nn.max_pool(jax.nn.relu(x), (2, 2), (2, 2))
  np.testing.assert_array_equal(ours(x), flax_pool(x))
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))
  np.testing.assert_array_equal(jax.grad(loss(ours))(x), jax.grad(loss(flax_pool))(x))


def test_emnist_cnn_uses_dropout_only_in_training():
  model = models.get_model(_config("emnist_cnn"), 62)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  eval_a = model.apply(variables, x, train=False)
  eval_b = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(train_a, train_b)


def test_unknown_model_is_rejected():
  with pytest.raises(ValueError, match="model.name='resnet' is unknown"):
    models.get_model(_config("resnet"), 10)


def test_cpu_compiler_options_keep_training_results():
  """The XLA options chosen for 'canonical' convolutions change speed, not numbers."""
  model = models.get_model(_config("emnist_cnn", "canonical"), 62)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  variables = model.init(jax.random.key(1), x)
  grad = lambda v: jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(v)
  options = models.compiler_options(_config("emnist_cnn", "canonical"))
  if jax.default_backend() == "cpu":
    assert options is None or "xla_cpu_experimental_ynn_fusion_type" in options
  assert models.compiler_options(_config("emnist_cnn", "patches")) is None
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
    jax.jit(grad)(variables),
    jax.jit(grad, compiler_options=options)(variables),
  )
