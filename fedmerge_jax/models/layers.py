"""Layers whose execution is chosen per backend, with identical parameters and outputs.

XLA:CPU runs convolutions inside loops (`lax.scan`) and with per-client (vmapped) kernels
slowly; the same convolution written as image patches x kernel matrix becomes a (batched)
matmul, which XLA:CPU runs fast. `Conv` picks the form from `impl`; both forms share the
parameter names and shapes of `flax.linen.Conv`, so checkpoints and merges are the same.
"""

from typing import Sequence

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


def extract_patches(x: jax.Array, kernel_size: Sequence[int], padding: str) -> jax.Array:
  """[B, H, W, C] -> [B, H', W', kh*kw*C] stride-1 patches, ordered like an HWIO kernel."""
  kh, kw = kernel_size
  if padding == "SAME":
    ph, pw = kh - 1, kw - 1
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  elif padding != "VALID":
    raise ValueError(f"padding={padding!r}; expected 'SAME' or 'VALID'.")
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  shifted = [x[:, i:i + out_h, j:j + out_w, :] for i in range(kh) for j in range(kw)]
  return jnp.concatenate(shifted, axis=-1)


class Conv(nn.Module):
  """Stride-1 2D convolution, as `nn.Conv` ('xla') or as patches x kernel ('patches')."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  padding: str = "VALID"
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if resolve_conv_impl(self.impl) == "xla":
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=self.padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      patches = extract_patches(x, self.kernel_size, self.padding)
      y = patches @ kernel.reshape(-1, self.features)
    return y + bias
