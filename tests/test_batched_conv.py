"""'batched_matmul' / 'batched_shifted' convolutions: XLA's numbers, no grouped convolutions.

Per-client kernels under `vmap` must give what XLA's convolution gives client by client
(outputs, input and kernel gradients), and a vmapped training round with the accelerator's
choice must lower to no convolution grouped over clients.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax import models, train
from fedmerge_jax.config import resolve
from fedmerge_jax.models import layers
from conftest import make_federation, tiny_base_config

CLIENTS = 3
# (kernel, strides, padding): 1x1 shortcuts, 3x3 at strides 1 and 2, each padding kind.
CASES = [
  ((1, 1), 1, "VALID"),
  ((1, 1), 2, 0),
  ((5, 5), 1, "SAME"),
  ((3, 3), 2, 1),
  ((3, 3), 2, "VALID"),
  ((2, 3), 1, "SAME"),
]
# The dtype handling (f32 accumulation, results cast back) does not depend on the shape: one
# bf16 case, 3x3 at stride 2 with padding, the most general one.
BF16_CASES = [CASES[3]]
# bf16: inputs, kernels and results are rounded to 8 significant bits (accumulation is f32),
# so values and gradients are compared within 2% of the reference's largest magnitude.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _reference(x, kernels, cotangents, strides, pads):
  """Client by client (a Python loop of XLA's convolution) in f32, on the same numbers."""

  @jax.jit
  def one_client(x, kernel, cotangent):
    def loss(x, kernel):
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (strides,) * 2,
        pads,
        dimension_numbers=layers.NHWC,
        precision=jax.lax.Precision.HIGHEST,
      )
      return jnp.sum(y * cotangent), y

    (dx, dk), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
    return y, dx, dk

  f32 = lambda a: np.asarray(a, np.float32)
  outs = [one_client(f32(x[i]), f32(kernels[i]), f32(cotangents[i])) for i in range(CLIENTS)]
  return tuple(np.stack(parts) for parts in zip(*outs))


def _assert_close(actual, expected, dtype):
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(
    np.asarray(actual, np.float32), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale
  )


@pytest.mark.parametrize(
  "kernel_size,strides,padding,dtype",
  [(*c, jnp.float32) for c in CASES] + [(*c, jnp.bfloat16) for c in BF16_CASES],
)
def test_per_client_kernels_equal_xla_conv_client_by_client(kernel_size, strides, padding, dtype):
  """Both forms' outputs and gradients under vmap (the batched-matmul rule) and for one
  client (XLA's convolutions), on odd 9x7 images."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (CLIENTS, 2, 9, 7, 3)).astype(dtype)
  kernels = jax.random.normal(keys[1], (CLIENTS, *kernel_size, 3, 4)).astype(dtype)
  pads = layers.explicit_padding(padding, kernel_size, strides)
  out_shape = jax.eval_shape(
    lambda x, k: layers.batched_matmul_conv(x, k, strides, pads), x[0], kernels[0]
  ).shape
  cotangents = jax.random.normal(keys[2], (CLIENTS, *out_shape)).astype(dtype)

  @jax.jit
  def both_forms(x, kernels, cotangents):
    results = {}
    for form in ("patches", "shifted"):
      conv = lambda x, k, form=form: layers.batched_matmul_conv(x, k, strides, pads, form)
      loss = lambda x, k, c, conv=conv: jnp.sum((conv(x, k) * c).astype(jnp.float32))
      grads = jax.grad(loss, argnums=(0, 1))
      results[form, "vmap"] = (jax.vmap(conv)(x, kernels), *jax.vmap(grads)(x, kernels, cotangents))
      results[form, "one"] = (conv(x[1], kernels[1]), *grads(x[1], kernels[1], cotangents[1]))
    return results

  expected = _reference(x, kernels, cotangents, strides, pads)
  for (_, batching), outs in both_forms(x, kernels, cotangents).items():
    assert all(o.dtype == dtype for o in outs)
    for actual, reference in zip(outs, expected):
      _assert_close(actual, reference if batching == "vmap" else reference[1], dtype)
  # Every batched matmul (forward and both gradients) accumulates in f32, whatever the inputs.
  products = re.findall(
    r"stablehlo.dot_general.*-> tensor<[^>]*x(\w+)>",
    jax.jit(both_forms).lower(x, kernels, cotangents).as_text(),
  )
  assert products and set(products) == {"f32"}, set(products)


def test_shared_kernel_with_batched_inputs_keeps_per_client_kernel_gradients():
  """vmap over inputs with one kernel (e.g. per-example gradients): the forward folds the
  clients into the batch, the kernel gradient is still per client."""
  x = jax.random.normal(jax.random.key(0), (CLIENTS, 2, 7, 7, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  pads = layers.explicit_padding(1, (3, 3), 2)
  cotangents = jax.random.normal(jax.random.key(2), (CLIENTS, 2, 4, 4, 4))
  loss = lambda x, k, c: jnp.sum(layers.batched_matmul_conv(x, k, 2, pads) * c)
  dx, dk = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, 0)))(
    x, kernel, cotangents
  )
  _, dx_ref, dk_ref = _reference(x, jnp.stack([kernel] * CLIENTS), cotangents, 2, pads)
  _assert_close(dx, dx_ref, jnp.float32)
  _assert_close(dk, dk_ref, jnp.float32)


def test_auto_picks_batched_matmuls_on_accelerators_and_canonical_on_cpu():
  assert layers.resolve_conv_impl("auto", backend="gpu") == "batched_matmul"
  assert layers.resolve_conv_impl("auto", backend="tpu") == "batched_matmul"
  assert layers.resolve_conv_impl("auto", backend="cpu") == "canonical"
  assert layers.resolve_conv_impl("batched_shifted", backend="cpu") == "batched_shifted"
  with pytest.raises(ValueError, match="model.conv_impl"):
    layers.resolve_conv_impl("grouped")


GROUPS = re.compile(r"(feature|batch)_group_count = (\d+)")
MODELS = [("resnet9", (8, 8, 3)), ("emnist_cnn", (8, 8, 1)), ("leaf_femnist_cnn", (8, 8, 1))]


def _config(model, conv_impl, parallelism):
  config = tiny_base_config()
  config.algorithm = "fedmerge"
  config.model.name, config.model.conv_impl = model, conv_impl
  config.client_parallelism, config.client_chunk_size = parallelism, 0
  config.client_lr = 0.01
  return config


def _round_inputs(config, data, ids, abstract=False):
  """The algorithm and its round's arguments (as shapes only where `abstract`: no init run)."""
  _, alg = train.build(resolve(config), data)

  def init(key):  # Non-uniform merging weights, so that every global model matters.
    state = alg.init(key)
    return state.replace(logits=jax.random.normal(jax.random.key(5), state.logits.shape))

  state = jax.eval_shape(init, jax.random.key(0)) if abstract else jax.jit(init)(jax.random.key(0))
  batch = data.train.gather(ids, data.train.padded_length(ids, 4))
  return alg, (state, np.asarray(ids, np.int32), batch, jax.random.key(7))


LOWERED = [(m, s, layers.resolve_conv_impl("auto", backend="gpu"), False) for m, s in MODELS]
LOWERED.append(("emnist_cnn", (8, 8, 1), "xla", True))


@pytest.mark.parametrize(
  "model,shape,conv_impl,grouped",
  LOWERED,
  ids=[f"{m}-{'xla' if g else 'accelerator_auto'}" for m, _, _, g in LOWERED],
)
def test_vmapped_round_lowers_to_no_grouped_convolution(model, shape, conv_impl, grouped):
  """A vmapped FedMerge round (per-client kernels from the merge and local steps) with the
  accelerator's `auto` choice holds no convolution grouped over clients; XLA's convolution
  (the rule broken) shows them, which is what the first half would catch."""
  data = make_federation(num_clients=3, sizes=[3, 7, 5], example_shape=shape)
  alg, args = _round_inputs(_config(model, conv_impl, "vmap"), data, [0, 2], abstract=True)
  text = jax.jit(alg.round).lower(*args).as_text()
  counts = [int(n) for _, n in GROUPS.findall(text)]
  assert (max(counts, default=1) > 1) == grouped, sorted(set(counts))


class TinyConvNet(nn.Module):
  """conv3x3 stride 2 -> BatchNorm (masked) -> relu -> conv1x1 -> dropout -> head: ResNet-9's
  layer kinds and dropout in a model whose round compiles in seconds."""

  conv_impl: str = "auto"
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    x = layers.Conv(4, (3, 3), 1, self.conv_impl, strides=2, use_bias=False)(x)
    x = nn.relu(layers.BatchNorm(use_running_average=not train)(x, mask))
    x = nn.Dropout(0.5, deterministic=not train)(layers.Conv(4, (1, 1), "VALID", self.conv_impl)(x))
    return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


models.register_model(
  "test_tiny_conv_net", lambda cfg, n: TinyConvNet(cfg.conv_impl, num_classes=n)
)


def test_vmapped_round_with_batched_matmuls_equals_one_client_at_a_time():
  """The batched-matmul rule (vmap) and XLA's convolutions (one client at a time) train the
  same FedMerge round, on unequal clients with partial last batches, with BatchNorm and dropout."""
  data = make_federation(num_clients=6, sizes=[3, 17, 6, 11, 1, 9], example_shape=(7, 7, 2))
  ids = [0, 1, 2, 3, 5]
  results = []
  for parallelism in ("vmap", "sequential"):
    alg, args = _round_inputs(
      _config("test_tiny_conv_net", "batched_matmul", parallelism), data, ids
    )
    results.append(jax.jit(alg.round)(*args))
  (new, metrics), (reference, ref_metrics) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), new, reference)
  np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
