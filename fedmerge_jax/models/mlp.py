"""A multi-layer perceptron; its last layer is the 'head'."""

from typing import Sequence

import flax.linen as nn

from fedmerge_jax.models.layers import compute_input


class MLP(nn.Module):
  num_classes: int
  hidden_sizes: Sequence[int] = (128,)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or batch norm.
    x = compute_input(x.reshape(x.shape[0], -1))  # float16 storage -> f32; bf16 stays.
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)
