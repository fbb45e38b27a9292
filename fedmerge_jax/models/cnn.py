"""The two standard (F)EMNIST CNNs of the FL literature."""

import flax.linen as nn

from fedmerge_jax.models.layers import Conv, compute_input, max_pool


class EmnistCNN(nn.Module):
  """FedJAX's / Reddi et al. (2021)'s EMNIST CNN: 1,206,590 parameters with 62 classes.

  conv3x3(32) -> conv3x3(64) -> maxpool2 -> dropout .25 -> dense 128 -> dropout .5 -> head.
  """

  num_classes: int = 62
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = compute_input(x)  # float16 storage -> float32; bf16 compute stays bf16.
    x = nn.relu(Conv(32, (3, 3), "VALID", self.conv_impl, name="conv_0")(x))
    x = nn.relu(Conv(64, (3, 3), "VALID", self.conv_impl, name="conv_1")(x))
    x = max_pool(x, 2)
    x = nn.Dropout(0.25, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, name="dense_0")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x)


class LeafFemnistCNN(nn.Module):
  """LEAF's FEMNIST CNN (Caldas et al. 2018).

  conv5x5(32, same) -> maxpool2 -> conv5x5(64, same) -> maxpool2 -> dense 2048 -> head.
  """

  num_classes: int = 62
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or batch norm.
    x = compute_input(x)  # float16 storage -> float32; bf16 compute stays bf16.
    x = nn.relu(Conv(32, (5, 5), "SAME", self.conv_impl, name="conv_0")(x))
    x = max_pool(x, 2)
    x = nn.relu(Conv(64, (5, 5), "SAME", self.conv_impl, name="conv_1")(x))
    x = max_pool(x, 2)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(2048, name="dense_0")(x))
    return nn.Dense(self.num_classes, name="head")(x)
