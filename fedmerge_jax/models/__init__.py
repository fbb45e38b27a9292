"""Flax models selected by `config.model.name`, and the registry users add theirs to.

Every model is called as `model.apply(variables, x, train=...)` and names its last layer
'head': the `official` FedMerge update computes the logit gradient from the head alone.
"""

import inspect
from typing import Callable, Tuple

import flax.linen as nn
import jax
import ml_collections

from fedmerge_jax import config as config_lib
from fedmerge_jax import registry
from fedmerge_jax.models import layers
from fedmerge_jax.models.cnn import EmnistCNN, LeafFemnistCNN
from fedmerge_jax.models.mlp import MLP
from fedmerge_jax.models.resnet import ResNet9
from fedmerge_jax.models import transformed

# `model` seeing the data's input transform (train.build wraps every run's model in it).
with_input_transform = transformed.with_input_transform

HEAD = "head"

registry.MODELS.add_builtins(
  {
    "mlp": lambda cfg, n: MLP(num_classes=n, hidden_sizes=tuple(cfg.hidden_sizes)),
    "emnist_cnn": lambda cfg, n: EmnistCNN(num_classes=n, conv_impl=cfg.conv_impl),
    "leaf_femnist_cnn": lambda cfg, n: LeafFemnistCNN(num_classes=n, conv_impl=cfg.conv_impl),
    "resnet9": lambda cfg, n: ResNet9(num_classes=n, conv_impl=cfg.conv_impl),
  }
)
MODEL_NAMES = registry.BUILTIN_MODELS  # The built-in models; registered_names() adds the users'.
Builder = Callable[[ml_collections.ConfigDict, int], nn.Module]


def register_model(name: str, builder: Builder) -> None:
  """Makes `config.model.name=name` build `builder(config.model, num_classes)`.

  The module is called as `apply(variables, x, train=...)` (and with `mask=` where its
  __call__ takes it: `takes_mask`); its last layer named 'head' feeds the `official` logit
  gradient.
  Registering a name again replaces its builder; built-in names cannot be replaced.
  """
  registry.MODELS.add(name, builder)


def registered_names() -> Tuple[str, ...]:
  """Every name `config.model.name` accepts now: the built-ins, then registered ones."""
  return registry.MODELS.names()


def get_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the flax module named by `model_config.name`."""
  return registry.MODELS.get(model_config.name)(model_config, num_classes)


def compiler_options(model_config: ml_collections.ConfigDict):
  """XLA options for jitting this model's training and evaluation on this backend (or None)."""
  return layers.compiler_options(model_config.get("conv_impl", "auto"))


CONVOLUTION = "conv_general_dilated"  # The primitive every JAX/flax convolution lowers to.


def _primitives(jaxpr):
  """The names of every primitive in `jaxpr` and the programs nested in it (custom
  derivatives and batching rules, calls, loops, branches)."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr holds its Jaxpr.
        if hasattr(inner, "eqns"):
          yield from _primitives(inner)


def has_convolution(model: nn.Module, example_input) -> bool:
  """Whether `model` convolves: its forward pass on a batch of `example_input` (one
  example's array) traces a convolution anywhere. Traced abstractly: no FLOPs."""
  example = jax.ShapeDtypeStruct((1, *jax.numpy.shape(example_input)), jax.numpy.float32)
  jaxpr = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x))(example)
  return CONVOLUTION in set(_primitives(jaxpr.jaxpr))


def takes_mask(model: nn.Module) -> bool:
  """Whether the module's `__call__` takes `mask=` (a batch's real rows, for BatchNorm).

  Algorithms ask this of the module they build and tell local training
  (`client.local_train(..., takes_mask=...)`), so wrappers around `apply` keep it.
  """
  module = transformed.unwrapped(model)  # A wrapper passes `mask=` on to the module it wraps.
  return "mask" in inspect.signature(type(module).__call__).parameters


def head_mask(variables) -> dict:
  """A pytree of bools over `variables`: True on the parameters of the 'head' layer.

  Raises config.ConfigError if there are none: the `official` update would otherwise
  silently compute a zero logit gradient and never personalise.
  """
  mask = layers_mask(variables, (HEAD,), collections=("params",))
  if not any(jax.tree.leaves(mask)):
    top = sorted(variables.get("params", {})) if hasattr(variables, "get") else []
    raise config_lib.ConfigError(
      f"update_mode='official' computes the logit gradient from the model's last layer "
      f"named 'head', and this model has none (its top-level layers: {top}). Name the "
      f"last layer 'head' (e.g. nn.Dense(num_classes, name='head')), or set "
      f"--config.update_mode=gradient."
    )
  return mask


def count_params(variables) -> int:
  return sum(x.size for x in jax.tree.leaves(variables.get("params", variables)))


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", None) for k in path)


def layers_mask(variables, names, collections=None) -> dict:
  """Bools over `variables`: True on the leaves of the top-level layers named in `names`
  (e.g. ('head',)), in every collection or only those in `collections`."""

  def inside(path, _):
    keys = _keys(path)
    return len(keys) >= 2 and keys[1] in names and (collections is None or keys[0] in collections)

  return jax.tree_util.tree_map_with_path(inside, variables)


def batch_norm_mask(variables) -> dict:
  """Bools over `variables`: True on BatchNorm layers, i.e. every module that keeps
  'batch_stats': its statistics and its 'params' (scale, bias). All False without any."""
  stats = {
    _keys(path)[:-1]
    for path, _ in jax.tree_util.tree_flatten_with_path(dict(variables).get("batch_stats", {}))[0]
  }

  def in_batch_norm(path, _):
    keys = _keys(path)
    return keys[0] == "batch_stats" or (keys[0] == "params" and keys[1:-1] in stats)

  return jax.tree_util.tree_map_with_path(in_batch_norm, variables)
