"""Layers whose execution is chosen per backend, with identical parameters and outputs.

XLA:CPU hands a convolution to its fast library (YNNPACK) only in the canonical
NHWC x HWIO -> NHWC form; the convolutions JAX's autodiff derives for the backward pass
are not in it, and inside a loop (`lax.scan`) XLA:CPU leaves them to a naive emitter,
~35x slower. 'canonical' writes the backward pass itself as canonical convolutions, so
training runs at library speed inside loops. 'patches' writes a convolution as image
patches x kernel matrix, a (batched) matmul: slower than 'canonical' for one client, but
the fast form when clients' kernels are vmapped. 'batched_matmul' is XLA's convolution for
one client and, when the kernel is batched over clients (`vmap`), client-batched matmuls
forward and backward, so no grouped convolution reaches the accelerator's library
('batched_shifted': the same as a sum of kh*kw shifted 1x1 matmuls). All forms share the
parameter names and shapes of `flax.linen.Conv`, so checkpoints and merges are the same.
"""

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax import custom_batching
import jax.numpy as jnp

from fedmerge_jax import choices

# 'batched_matmul' / 'batched_shifted': per-client kernels as client-batched matmuls (below).
CONV_IMPLS = choices.CONV_IMPLS
BATCHED_IMPLS = {"batched_matmul": "patches", "batched_shifted": "shifted"}  # impl -> form
NHWC = ("NHWC", "HWIO", "NHWC")


# XLA:CPU's default YNNPACK fusions (single dots, reductions, single convolutions) less the
# convolutions: with 'canonical', XLA:CPU then runs them in Eigen, measured ~20% faster
# for the EMNIST CNN's training and no slower for the other models (docs/pages/performance.md).
CPU_CANONICAL_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  )
}


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


def resolve_conv_impl(impl: str, backend: Optional[str] = None) -> str:
  """'auto' -> 'canonical' on CPU (one client at a time; measured fastest: docs' Performance) and
  'batched_matmul' on GPU/TPU (XLA's conv for one client, batched matmuls under `vmap`).
  `backend` defaults to JAX's; pass 'gpu' to see (and test) an accelerator's choice."""
  if impl == "auto":
    backend = backend or jax.default_backend()
    return "canonical" if backend == "cpu" else "batched_matmul"
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl={impl!r}; expected one of {CONV_IMPLS}.")
  return impl


def explicit_padding(padding, kernel_size: Sequence[int], strides: int):
  """'VALID', 'SAME' (stride 1) or an int p (p on every side, as PyTorch) -> ((lo, hi), (lo, hi));
  ((lo, hi), (lo, hi)) itself passes through."""
  if isinstance(padding, (tuple, list)):
    return tuple(tuple(p) for p in padding)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if padding == "VALID":
    return ((0, 0), (0, 0))
  if padding == "SAME" and strides == 1:
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)
  raise ValueError(
    f"padding={padding!r} with strides={strides}; expected 'VALID', an int, or "
    "'SAME' with stride 1."
  )


def pad_spatial(x: jax.Array, padding) -> jax.Array:
  """Zero-pads the H and W axes of [..., H, W, C] by ((lo, hi), (lo, hi))."""
  return jnp.pad(x, ((0, 0),) * (x.ndim - 3) + (*padding, (0, 0)))


def shifted_views(x: jax.Array, kernel_size: Sequence[int], strides: int):
  """The kh*kw strided slices of a padded [..., H, W, C] that kernel tap (i, j) multiplies,
  row-major over (i, j) like an HWIO kernel; each [..., H', W', C]."""
  kh, kw = kernel_size
  out_h = (x.shape[-3] - kh) // strides + 1
  out_w = (x.shape[-2] - kw) // strides + 1
  last_h, last_w = (out_h - 1) * strides + 1, (out_w - 1) * strides + 1
  return [
    x[..., i : i + last_h : strides, j : j + last_w : strides, :]
    for i in range(kh)
    for j in range(kw)
  ]


def extract_patches(x: jax.Array, kernel_size: Sequence[int], padding, strides: int = 1):
  """[..., H, W, C] -> [..., H', W', kh*kw*C] patches, ordered like an HWIO kernel."""
  x = pad_spatial(x, explicit_padding(padding, kernel_size, strides))
  return jnp.concatenate(shifted_views(x, kernel_size, strides), axis=-1)


def _conv(x, kernel, strides: int, padding, lhs_dilation: int = 1, rhs_dilation: int = 1):
  """XLA's NHWC convolution, accumulating in float32 (for bf16 inputs), in the inputs' dtype."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (strides, strides),
    padding,
    lhs_dilation=(lhs_dilation,) * 2,
    rhs_dilation=(rhs_dilation,) * 2,
    dimension_numbers=NHWC,
    preferred_element_type=jnp.float32,
  ).astype(x.dtype)


def _fold_clients_into_batch(conv, axis_size, x, kernel):
  """vmap rule for one shared kernel: the clients' inputs [N, B, ...] join the conv's batch."""
  y = conv(x.reshape(-1, *x.shape[2:]), kernel)
  return y.reshape(axis_size, -1, *y.shape[1:])


def per_client_kernel_op(unbatched, batched_kernel):
  """A `custom_vmap` op of (x, kernel): `unbatched(x, kernel)` for one client; under vmap a
  shared kernel folds the clients into the batch, and a batched one (per-client models)
  gives `batched_kernel(op, axis_size, x_batched, x, kernel)`."""

  @custom_batching.custom_vmap
  def op(x, kernel):
    return unbatched(x, kernel)

  @op.def_vmap
  def rule(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if not kernel_batched:
      return _fold_clients_into_batch(op, axis_size, x, kernel), True
    return batched_kernel(op, axis_size, x_batched, x, kernel), True

  return op


@functools.lru_cache(maxsize=None)
def _unbatched_conv(strides: int, padding, lhs_dilation: int, rhs_dilation: int):
  """`_conv` whose vmap keeps every convolution canonical: a batch of inputs joins the
  conv's own batch; a batch of kernels (per-client models) becomes one conv per kernel,
  independent ops XLA:CPU runs side by side, instead of one slow grouped convolution."""

  def one_conv_per_kernel(conv, axis_size, x_batched, x, kernel):
    return jnp.stack([conv(x[i] if x_batched else x, kernel[i]) for i in range(axis_size)])

  return per_client_kernel_op(
    lambda x, kernel: _conv(x, kernel, strides, padding, lhs_dilation, rhs_dilation),
    one_conv_per_kernel,
  )


def _canonical(x, kernel, strides, padding, lhs_dilation=1, rhs_dilation=1):
  padding = tuple(tuple(p) for p in padding)
  return _unbatched_conv(strides, padding, lhs_dilation, rhs_dilation)(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x, kernel, strides: int, padding: Tuple[Tuple[int, int], ...]):
  """XLA's NHWC convolution whose gradients are canonical NHWC convolutions too (see top)."""
  return _canonical(x, kernel, strides, padding)


def _canonical_conv_fwd(x, kernel, strides, padding):
  return _canonical(x, kernel, strides, padding), (x, kernel)


def input_grad_as_conv(conv, grad, kernel, in_hw, strides, padding):
  """d/dx of a convolution as one canonical convolution `conv`: the stride-dilated gradient
  against the flipped kernel (in/out swapped), for an input of spatial size `in_hw`."""
  pads = []
  for size, k, out, (lo, _) in zip(in_hw, kernel.shape[:2], grad.shape[1:3], padding):
    pads.append((k - 1 - lo, size + lo - (out - 1) * strides - 1))
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  return conv(grad, flipped, 1, pads, lhs_dilation=strides)


def kernel_grad_as_conv(conv, x, grad, kernel_hw, strides, padding):
  """d/dkernel of a convolution as one canonical convolution `conv`: input channels as the
  batch, the batch as features, the gradient as the (stride-dilated) kernel."""
  dk = conv(x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3), 1, padding, rhs_dilation=strides)
  return dk[:, : kernel_hw[0], : kernel_hw[1]].transpose(1, 2, 0, 3)


def _canonical_conv_bwd(strides, padding, residuals, grad):
  x, kernel = residuals
  return (
    input_grad_as_conv(_canonical, grad, kernel, x.shape[1:3], strides, padding),
    kernel_grad_as_conv(_canonical, x, grad, kernel.shape[:2], strides, padding),
  )


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


# 'batched_matmul' / 'batched_shifted'. On GPU/TPU, `vmap` of XLA's convolution with per-client
# kernels becomes grouped convolutions (feature_group_count = clients; the kernel gradient
# batch_group_count = clients) that cuDNN runs slowly. Here one client (no vmap, or a shared
# kernel) runs XLA's convolutions, forward and backward; a kernel batched over N clients runs
# every pass as matmuls with the clients as the batch dimension, on strided slices of the
# padded input: 'patches' concatenates the kh*kw slices into one [.., kh*kw*C] operand (one
# matmul with a deep contraction), 'shifted' sums kh*kw matmuls of depth C (no kh*kw-times
# patch tensor). Only x and the kernel are saved for the backward pass.


def _matmul_f32(spec: str, a, b):
  """einsum accumulating (and returning) float32, whatever the operands' dtype."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _unshift(d, tap: Tuple[int, int], strides: int, padded_hw: Sequence[int]):
  """The transpose of `shifted_views`' slice for kernel tap (i, j): [..., H', W', C] scattered
  back into a zero [..., Hp, Wp, C] (an interior-padded pad, no scatter)."""
  config = [(0, 0, 0)] * (d.ndim - 3)
  for start, out, size in zip(tap, d.shape[-3:-1], padded_hw):
    config.append((start, size - start - (out - 1) * strides - 1, strides - 1))
  return jax.lax.pad(d, jnp.zeros((), d.dtype), config + [(0, 0, 0)])


def client_conv_forward(form: str, x, kernel, strides: int, padding):
  """[N, B, H, W, C] x per-client [N, kh, kw, C, O] -> [N, B, H', W', O] as batched matmuls."""
  n, kh, kw, c, o = kernel.shape
  views = shifted_views(pad_spatial(x, padding), (kh, kw), strides)
  if form == "patches":
    y = _matmul_f32("nbhwk,nko->nbhwo", jnp.concatenate(views, -1), kernel.reshape(n, -1, o))
  else:
    taps = kernel.reshape(n, kh * kw, c, o)
    y = sum(_matmul_f32("nbhwc,nco->nbhwo", v, taps[:, t]) for t, v in enumerate(views))
  return y.astype(x.dtype)


def client_conv_kernel_grad(form: str, x, grad, kernel_hw, strides: int, padding):
  """d/dkernel [N, kh, kw, C, O] of `client_conv_forward`: patches^T . grad per client."""
  n, c, o = x.shape[0], x.shape[-1], grad.shape[-1]
  views = shifted_views(pad_spatial(x, padding), kernel_hw, strides)
  if form == "patches":
    dk = _matmul_f32("nbhwk,nbhwo->nko", jnp.concatenate(views, -1), grad)
  else:
    dk = jnp.stack([_matmul_f32("nbhwc,nbhwo->nco", v, grad) for v in views], 1)
  return dk.reshape(n, *kernel_hw, c, o).astype(x.dtype)


def client_conv_input_grad(form: str, grad, kernel, in_hw, strides: int, padding):
  """d/dx [N, B, H, W, C] of `client_conv_forward`: grad . kernel^T per client, each tap's
  share shifted back to where its slice came from, summed, the padding cropped."""
  n, kh, kw, c, o = kernel.shape
  if form == "patches":
    d_patches = _matmul_f32("nbhwo,nko->nbhwk", grad, kernel.reshape(n, -1, o))
    d_views = jnp.split(d_patches, kh * kw, axis=-1)
  else:
    taps = kernel.reshape(n, kh * kw, c, o)
    d_views = [_matmul_f32("nbhwo,nco->nbhwc", grad, taps[:, t]) for t in range(kh * kw)]
  padded_hw = [size + lo + hi for size, (lo, hi) in zip(in_hw, padding)]
  taps_ij = [(i, j) for i in range(kh) for j in range(kw)]
  dx = sum(_unshift(d, tap, strides, padded_hw) for d, tap in zip(d_views, taps_ij))
  (top, _), (left, _) = padding
  return dx[..., top : top + in_hw[0], left : left + in_hw[1], :].astype(grad.dtype)


def _clients(axis_size, batched, x):
  return x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))


@functools.lru_cache(maxsize=None)
def _client_batched_ops(form: str, strides: int, padding, kernel_hw, in_hw):
  """(forward, input_grad, kernel_grad): XLA's convolutions for one client; under vmap with
  a batched kernel (or, for the kernel gradient, any batched operand) client-batched matmuls."""
  forward = per_client_kernel_op(
    lambda x, kernel: _conv(x, kernel, strides, padding),
    lambda _, n, x_batched, x, kernel: client_conv_forward(
      form, _clients(n, x_batched, x), kernel, strides, padding
    ),
  )
  input_grad = per_client_kernel_op(
    lambda grad, kernel: input_grad_as_conv(_conv, grad, kernel, in_hw, strides, padding),
    lambda _, n, grad_batched, grad, kernel: client_conv_input_grad(
      form, _clients(n, grad_batched, grad), kernel, in_hw, strides, padding
    ),
  )

  @custom_batching.custom_vmap
  def kernel_grad(x, grad):
    return kernel_grad_as_conv(_conv, x, grad, kernel_hw, strides, padding)

  @kernel_grad.def_vmap
  def kernel_grad_rule(axis_size, in_batched, x, grad):
    x, grad = (_clients(axis_size, b, a) for a, b in zip((x, grad), in_batched))
    return client_conv_kernel_grad(form, x, grad, kernel_hw, strides, padding), True

  return forward, input_grad, kernel_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def batched_matmul_conv(
  x, kernel, strides: int, padding: Tuple[Tuple[int, int], ...], form: str = "patches"
):
  """XLA's NHWC convolution for one client; with per-client kernels under `vmap`, client-batched
  matmuls forward and backward (`form` 'patches' or 'shifted', see above). x, kernel: one dtype."""
  return _batched_matmul_conv_fwd(x, kernel, strides, padding, form)[0]


def _batched_matmul_conv_fwd(x, kernel, strides, padding, form):
  forward, _, _ = _client_batched_ops(form, strides, padding, kernel.shape[:2], x.shape[1:3])
  return forward(x, kernel), (x, kernel)


def _batched_matmul_conv_bwd(strides, padding, form, residuals, grad):
  x, kernel = residuals
  _, input_grad, kernel_grad = _client_batched_ops(
    form, strides, padding, kernel.shape[:2], x.shape[1:3]
  )
  return input_grad(grad, kernel), kernel_grad(x, grad)


batched_matmul_conv.defvjp(_batched_matmul_conv_fwd, _batched_matmul_conv_bwd)


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
  x = x[:, : h - h % window, : w - w % window]
  return jnp.max(x.reshape(b, h // window, window, w // window, window, c), axis=(2, 4))


class Conv(nn.Module):
  """2D convolution: XLA's ('xla', 'canonical'), patches x kernel ('patches') or XLA's with
  client-batched matmuls under vmap ('batched_matmul', 'batched_shifted'); same parameters.

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
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, in_features, self.features))
    impl = resolve_conv_impl(self.impl)
    padding = explicit_padding(self.padding, self.kernel_size, self.strides)
    if impl == "xla":
      y = _conv(x, kernel, self.strides, padding)
    elif impl == "canonical":
      y = canonical_conv(x, kernel, self.strides, padding)
    elif impl in BATCHED_IMPLS:
      dtype = jnp.result_type(x, kernel)
      y = batched_matmul_conv(
        x.astype(dtype), kernel.astype(dtype), self.strides, padding, BATCHED_IMPLS[impl]
      )
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
