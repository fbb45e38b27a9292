"""Layers whose execution is chosen per backend, with identical parameters and outputs.

XLA:CPU runs convolutions inside loops (`lax.scan`) and with per-client (vmapped) kernels
slowly; the same convolution written as image patches x kernel matrix becomes a (batched)
matmul, which XLA:CPU runs fast. `Conv` picks the form from `impl`; both forms share the
parameter names and shapes of `flax.linen.Conv`, so checkpoints and merges are the same.
"""

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "patches")


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'patches' on CPU (measured faster there), 'xla' on GPU/TPU."""
  if impl == "auto":
    return "patches" if jax.default_backend() == "cpu" else "xla"
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


class Conv(nn.Module):
  """2D convolution, as XLA's ('xla') or as patches x kernel ('patches'); same parameters.

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
    if resolve_conv_impl(self.impl) == "xla":
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.strides, self.strides),
          padding=explicit_padding(self.padding, self.kernel_size, self.strides),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      patches = extract_patches(x, self.kernel_size, self.padding, self.strides)
      y = patches @ kernel.reshape(-1, self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return y
