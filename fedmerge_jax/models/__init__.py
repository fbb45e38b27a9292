"""Flax models selected by `config.model.name`.

Every model is called as `model.apply(variables, x, train=...)` and names its last layer
'head': the `official` FedMerge update computes the logit gradient from the head alone.
"""

from typing import Callable, Dict

import flax.linen as nn
import jax
import ml_collections

from fedmerge_jax.models import layers
from fedmerge_jax.models.cnn import EmnistCNN, LeafFemnistCNN
from fedmerge_jax.models.mlp import MLP
from fedmerge_jax.models.resnet import ResNet9

HEAD = "head"

_BUILDERS: Dict[str, Callable[[ml_collections.ConfigDict, int], nn.Module]] = {
    "mlp": lambda cfg, n: MLP(num_classes=n, hidden_sizes=tuple(cfg.hidden_sizes)),
    "emnist_cnn": lambda cfg, n: EmnistCNN(num_classes=n, conv_impl=cfg.conv_impl),
    "leaf_femnist_cnn": lambda cfg, n: LeafFemnistCNN(num_classes=n, conv_impl=cfg.conv_impl),
    "resnet9": lambda cfg, n: ResNet9(num_classes=n, conv_impl=cfg.conv_impl),
}
MODEL_NAMES = tuple(_BUILDERS)


def get_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the flax module named by `model_config.name`."""
  if model_config.name not in _BUILDERS:
    raise ValueError(f"model.name={model_config.name!r} is unknown; choose one of {MODEL_NAMES}.")
  return _BUILDERS[model_config.name](model_config, num_classes)


def compiler_options(model_config: ml_collections.ConfigDict):
  """XLA options for jitting this model's training and evaluation on this backend (or None)."""
  return layers.compiler_options(model_config.get("conv_impl", "auto"))


def head_mask(variables) -> dict:
  """A pytree of bools over `variables`: True on the parameters of the 'head' layer."""
  def is_head(path, _):
    keys = [getattr(k, "key", None) for k in path]
    return len(keys) >= 2 and keys[0] == "params" and keys[1] == HEAD
  return jax.tree_util.tree_map_with_path(is_head, variables)


def count_params(variables) -> int:
  return sum(x.size for x in jax.tree.leaves(variables.get("params", variables)))
