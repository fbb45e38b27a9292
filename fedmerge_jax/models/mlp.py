"""A multi-layer perceptron; its last layer is the 'head'."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  num_classes: int
  hidden_sizes: Sequence[int] = (128,)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or batch norm.
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)  # Inputs may be stored as float16.
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)
