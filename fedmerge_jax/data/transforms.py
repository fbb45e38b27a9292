"""Input transforms: what a data set's stored examples become where they enter the model.

A `FederatedData` may carry one (`input_transform`): its splits then stay compact on the host
and in every round's arguments (CIFAR-100: uint8, a quarter of float32), and the model sees
`transform(x)`, computed inside the jitted training, evaluation and gap programs one batch at
a time (`models.with_input_transform`, applied by `train.build`). A transform is a frozen
dataclass: hashable (the model holding it is a static argument of jit) and recorded in the
workdir's data fingerprint.
"""

import dataclasses
from typing import Tuple

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Standardize:
  """Per-channel standardisation in float32: `(x / divide_by - mean) / std` over the last axis
  (e.g. uint8 images with `divide_by=255` and the data set's channel statistics; one mean and
  std for all channels, or one per channel).

  uint8 input is looked up in a table of NumPy's float32 results for its 256 values, so the
  model sees exactly what normalising the images in NumPy gives (XLA computes a division by
  a constant as a multiplication by its reciprocal: 1-ulp differences, which training grows).
  """

  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  divide_by: float = 1.0

  def __post_init__(self):
    # Tuples of Python floats, whatever the caller gave: hashable, JSON-able, one repr.
    object.__setattr__(self, "mean", tuple(float(m) for m in np.ravel(self.mean)))
    object.__setattr__(self, "std", tuple(float(s) for s in np.ravel(self.std)))
    object.__setattr__(self, "divide_by", float(self.divide_by))
    if not self.mean or len(self.mean) != len(self.std) or min(self.std) <= 0:
      raise ValueError(
        f"Standardize: give one positive std per mean (one per channel); got mean={self.mean}, "
        f"std={self.std}."
      )

  def numpy(self, x: np.ndarray) -> np.ndarray:
    """The same in NumPy, float32 throughout: the values the model sees."""
    mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
    return (np.asarray(x).astype(np.float32) / np.float32(self.divide_by) - mean) / std

  def __call__(self, x):
    """`x` (any numeric dtype, channels last) standardised, as float32."""
    x = jnp.asarray(x)
    if x.dtype == jnp.uint8:
      table = self.numpy(np.arange(256, dtype=np.uint8)[:, None])  # [256, channels]
      channel = jnp.arange(x.shape[-1]) if len(self.mean) > 1 else 0
      return jnp.asarray(table)[x.astype(jnp.int32), channel]
    mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
    return (x.astype(jnp.float32) / self.divide_by - mean) / std
