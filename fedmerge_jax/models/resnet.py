"""The FedMerge authors' narrow ResNet-9 for 32x32 images (83,852 parameters, 100 classes).

Their `resnet.ResNet9` is the CIFAR ResNet of He et al. (2016) as written in
kuangliu/pytorch-cifar, with one BasicBlock per stage and widths 8/16/32/64:

  stem:    conv3x3(8) -> BN -> relu                                       32x32x8
  stage 1: block(8,  stride 1)                                            32x32x8
  stage 2: block(16, stride 2), 1x1 conv + BN shortcut                    16x16x16
  stage 3: block(32, stride 2), 1x1 conv + BN shortcut                    8x8x32
  stage 4: block(64, stride 2), 1x1 conv + BN shortcut                    4x4x64
  global average pool (their avg_pool2d(4) on 4x4) -> dense 'head' 64 -> num_classes

block(c, s) = relu(BN(conv3x3(c)(relu(BN(conv3x3(c, stride s)(x))))) + shortcut(x)), the
shortcut the identity in stage 1 and conv1x1(c, stride s) -> BN where the shape changes.
Convolutions have no bias (BatchNorm follows) and PyTorch's padding (1 on each side for
3x3, so a stride-2 conv samples the even positions). BatchNorm uses PyTorch's momentum
0.1 (flax momentum 0.9) and epsilon 1e-5; its running statistics live in the
'batch_stats' collection, which FedMerge merges and updates like the parameters; as in
PyTorch, the running variance is fed the unbiased batch variance, and batch statistics
see only the real rows of a padded batch (`mask`).
Initialisation follows PyTorch's defaults (what the authors' model gets): uniform with
variance 1/(3 fan_in) for kernels, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the head bias.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedmerge_jax.models.layers import BatchNorm, Conv, compute_input

WIDTHS = (8, 16, 32, 64)
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """PyTorch's default Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in**-0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_batch_norm(train: bool, name: str) -> BatchNorm:
  """PyTorch's BatchNorm2d defaults: momentum 0.1 (flax 0.9), eps 1e-5, unbiased running var."""
  return BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, unbiased_running_var=True, name=name
  )


def conv(features: int, size: int, stride: int, impl: str, name: str) -> Conv:
  """A bias-free square conv with PyTorch's padding (size-1)//2 on every side."""
  return Conv(
    features,
    (size, size),
    (size - 1) // 2,
    impl,
    strides=stride,
    use_bias=False,
    kernel_init=torch_kernel_init,
    name=name,
  )


class BasicBlock(nn.Module):
  """conv3x3(stride) -> BN -> relu -> conv3x3 -> BN, plus the (projected) input, -> relu."""

  features: int
  stride: int = 1
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    norm = lambda name, y: torch_batch_norm(train, name)(y, mask)
    y = conv(self.features, 3, self.stride, self.conv_impl, name="conv_0")(x)
    y = nn.relu(norm("bn_0", y))
    y = conv(self.features, 3, 1, self.conv_impl, name="conv_1")(y)
    y = norm("bn_1", y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride, self.conv_impl, name="shortcut_conv")(x)
      x = norm("shortcut_bn", x)
    return nn.relu(y + x)


class ResNet9(nn.Module):
  """The authors' narrow ResNet-9: stem, four one-block stages, global pool, 'head'."""

  num_classes: int = 100
  widths: tuple = WIDTHS
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    """`mask` [B]: the batch's real rows (padding is left out of BatchNorm's statistics)."""
    x = compute_input(x)  # float16 storage -> float32; bf16 compute stays bf16.
    x = conv(self.widths[0], 3, 1, self.conv_impl, name="stem_conv")(x)
    x = nn.relu(torch_batch_norm(train, "stem_bn")(x, mask))
    for stage, width in enumerate(self.widths):
      x = BasicBlock(width, 1 if stage == 0 else 2, self.conv_impl, name=f"stage_{stage + 1}")(
        x, train, mask
      )
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(
      self.num_classes,
      kernel_init=torch_kernel_init,
      bias_init=torch_bias_init(x.shape[-1]),
      name="head",
    )(x)
