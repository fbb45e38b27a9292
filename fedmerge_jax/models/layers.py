"""Layers whose execution is chosen per backend, with identical parameters and outputs.

XLA:CPU hands a convolution to its fast library (YNNPACK) only in the canonical
NHWC x HWIO -> NHWC form; the convolutions JAX's autodiff derives for the backward pass
are not in it, and inside a loop (`lax.scan`) XLA:CPU leaves them to a naive emitter,
~35x slower. 'canonical' writes the backward pass itself as canonical convolutions, so
training runs at library speed inside loops. 'patches' writes a convolution as image
patches x kernel matrix, a (batched) matmul: slower than 'canonical' for one client, but
the fast form when clients' kernels are vmapped. All forms share the parameter names and
shapes of `flax.linen.Conv`, so checkpoints and merges are the same.
"""

import functools
from typing import Any, Callable, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax import custom_batching
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "canonical", "patches")
NHWC = ("NHWC", "HWIO", "NHWC")


# XLA:CPU's default YNNPACK fusions (single dots, reductions, single convolutions) less the
# convolutions: with 'canonical', XLA:CPU then runs them in Eigen, measured ~20% faster
# for the EMNIST CNN's training and no slower for the other models (README, Performance).
CPU_CANONICAL_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def _cpu_accepts(option: str, value: str) -> bool:
  """Whether this XLA knows the (experimental) compiler option, by compiling a no-op."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(0.0).compile()
    return True
  except Exception:  # pylint: disable=broad-except  (an XLA without the option)
    return False


def compiler_options(impl: str):
  """XLA options for jitting training with convolutions `impl` on this backend, or None."""
  if jax.default_backend() != "cpu" or resolve_conv_impl(impl) != "canonical":
    return None
  if not all(_cpu_accepts(k, v) for k, v in CPU_CANONICAL_OPTIONS.items()):
    return None
  return dict(CPU_CANONICAL_OPTIONS)


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'canonical' on CPU (measured fastest there, see README), 'xla' on GPU/TPU."""
  if impl == "auto":
    return "canonical" if jax.default_backend() == "cpu" else "xla"
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl={impl!r}; expected one of {CONV_IMPLS}.")
  return impl


def explicit_padding(padding, kernel_size: Sequence[int], strides: int):
  """'VALID', 'SAME' (stride 1) or an int p (p on every side, as PyTorch) -> ((lo, hi), (lo, hi))."""
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if padding == "VALID":
    return ((0, 0), (0, 0))
  if padding == "SAME" and strides == 1:
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)
  raise ValueError(f"padding={padding!r} with strides={strides}; expected 'VALID', an int, or "
                   "'SAME' with stride 1.")


def extract_patches(x: jax.Array, kernel_size: Sequence[int], padding, strides: int = 1):
  """[B, H, W, C] -> [B, H', W', kh*kw*C] patches, ordered like an HWIO kernel."""
  kh, kw = kernel_size
  x = jnp.pad(x, ((0, 0), *explicit_padding(padding, kernel_size, strides), (0, 0)))
  out_h = (x.shape[1] - kh) // strides + 1
  out_w = (x.shape[2] - kw) // strides + 1
  shifted = [x[:, i:i + (out_h - 1) * strides + 1:strides, j:j + (out_w - 1) * strides + 1:strides]
             for i in range(kh) for j in range(kw)]
  return jnp.concatenate(shifted, axis=-1)


def _conv(x, kernel, strides: int, padding, lhs_dilation: int = 1, rhs_dilation: int = 1):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding, lhs_dilation=(lhs_dilation,) * 2,
      rhs_dilation=(rhs_dilation,) * 2, dimension_numbers=NHWC)


@functools.lru_cache(maxsize=None)
def _unbatched_conv(strides: int, padding, lhs_dilation: int, rhs_dilation: int):
  """`_conv` whose vmap keeps every convolution canonical: a batch of inputs joins the
  conv's own batch; a batch of kernels (per-client models) becomes one conv per kernel,
  independent ops XLA:CPU runs side by side, instead of one slow grouped convolution."""
  @custom_batching.custom_vmap
  def conv(x, kernel):
    return _conv(x, kernel, strides, padding, lhs_dilation, rhs_dilation)

  @conv.def_vmap
  def rule(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if not kernel_batched:
      y = conv(x.reshape(-1, *x.shape[2:]), kernel)
      return y.reshape(axis_size, -1, *y.shape[1:]), True
    return jnp.stack([conv(x[i] if x_batched else x, kernel[i]) for i in range(axis_size)]), True

  return conv


def _canonical(x, kernel, strides, padding, lhs_dilation=1, rhs_dilation=1):
  padding = tuple(tuple(p) for p in padding)
  return _unbatched_conv(strides, padding, lhs_dilation, rhs_dilation)(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x, kernel, strides: int, padding: Tuple[Tuple[int, int], ...]):
  """XLA's NHWC convolution whose gradients are canonical NHWC convolutions too (see top)."""
  return _canonical(x, kernel, strides, padding)


def _canonical_conv_fwd(x, kernel, strides, padding):
  return _canonical(x, kernel, strides, padding), (x, kernel)


def _canonical_conv_bwd(strides, padding, residuals, grad):
  """d/dx: the stride-dilated gradient against the flipped kernel (in/out swapped);
  d/dkernel: input channels as the batch, the batch as features, gradient as kernel."""
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  pads = []
  for size, k, out, (lo, _) in zip(x.shape[1:3], (kh, kw), grad.shape[1:3], padding):
    pads.append((k - 1 - lo, size + lo - (out - 1) * strides - 1))
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = _canonical(grad, flipped, 1, pads, lhs_dilation=strides)
  dk = _canonical(x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3), 1, padding,
                  rhs_dilation=strides)
  return dx, dk[:, :kh, :kw].transpose(1, 2, 0, 3)


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def compute_input(x: jax.Array) -> jax.Array:
  """A model's input as it computes on it: bfloat16 (`config.compute_dtype`) stays bfloat16;
  anything else (float16 storage, integers) becomes float32."""
  return x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)


def max_pool(x: jax.Array, window: int) -> jax.Array:
  """Non-overlapping `window` x `window` max pooling ('VALID'), as reshape + max.

  Same outputs as `nn.max_pool(x, (w, w), (w, w))`; XLA:CPU runs its gradient ~3x faster
  (no reduce-window carrying index arrays). Where a window has tied maxima the gradient
  is shared between them instead of going to the first; after a ReLU ties occur only at
  0, where the ReLU's gradient is 0 anyway.
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % window, :w - w % window]
  return jnp.max(x.reshape(b, h // window, window, w // window, window, c), axis=(2, 4))


class Conv(nn.Module):
  """2D convolution: XLA's ('xla', 'canonical') or patches x kernel ('patches'); same parameters.

  `padding` is 'VALID', 'SAME' (stride 1) or an int applied on every side (PyTorch's).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  padding: Union[str, int] = "VALID"
  impl: str = "auto"
  strides: int = 1
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, in_features, self.features))
    impl = resolve_conv_impl(self.impl)
    padding = explicit_padding(self.padding, self.kernel_size, self.strides)
    if impl == "xla":
      y = _conv(x, kernel, self.strides, padding)
    elif impl == "canonical":
      y = canonical_conv(x, kernel, self.strides, padding)
    else:
      patches = extract_patches(x, self.kernel_size, self.padding, self.strides)
      y = patches @ kernel.reshape(-1, self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return y


class BatchNorm(nn.Module):
  """BatchNorm whose batch statistics see only the real rows of a padded batch.

  The same variables as `flax.linen.BatchNorm` (params 'scale', 'bias'; batch_stats
  'mean', 'var'), so checkpoints and merges are unchanged. In training, the mean and the
  biased variance over (rows marked by `mask` [B]) x spatial positions normalise the
  batch, and the running averages move by `1 - momentum` towards them.
  `unbiased_running_var=True` is PyTorch's rule: the running variance is fed the unbiased
  batch variance (times n / (n - 1)), while normalisation uses the biased one.
  Statistics are computed in float32 whatever the input's dtype (bf16 compute); the output
  has the input's dtype.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    dtype, x = x.dtype, x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      rows = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask.astype(x.dtype)
      weight = rows.reshape((-1,) + (1,) * (x.ndim - 1))
      axes = tuple(range(x.ndim - 1))
      n = jnp.sum(rows) * (x.size // (x.shape[0] * features))  # Real rows x positions.
      mean = jnp.sum(x * weight, axes) / jnp.maximum(n, 1.0)
      var = jnp.sum(weight * jnp.square(x - mean), axes) / jnp.maximum(n, 1.0)
      if not self.is_initializing():
        fed = var * n / jnp.maximum(n - 1.0, 1.0) if self.unbiased_running_var else var
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * fed
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(dtype)
