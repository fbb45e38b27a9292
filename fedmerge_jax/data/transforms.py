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
  """Per-channel standardisation in float32: `(x * scale - mean) / std` over the last axis
  (e.g. uint8 images with `scale=1/255` and the data set's channel statistics)."""

  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  scale: float = 1.0

  def __post_init__(self):
    # Tuples of Python floats, whatever the caller gave: hashable, JSON-able, one repr.
    object.__setattr__(self, "mean", tuple(float(m) for m in np.ravel(self.mean)))
    object.__setattr__(self, "std", tuple(float(s) for s in np.ravel(self.std)))
    object.__setattr__(self, "scale", float(self.scale))
    if len(self.mean) != len(self.std) or min(self.std, default=1.0) <= 0:
      raise ValueError(
        f"Standardize: give one positive std per mean (one per channel); got mean={self.mean}, "
        f"std={self.std}."
      )

  def __call__(self, x):
    """`x` (any numeric dtype, channels last) standardised, as float32."""
    mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
    return (jnp.asarray(x).astype(jnp.float32) * self.scale - mean) / std
