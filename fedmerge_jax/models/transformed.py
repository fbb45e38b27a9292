"""A model that sees its data set's input transform applied: `module(transform(x), ...)`.

`train.build` wraps every run's model in it where the data carries an `input_transform`, so
every path that calls `model.apply` (local training, evaluation, the gap probe, algorithms'
own validation and mixtures, replicas, benchmarks) transforms each batch inside its jitted
program, and no algorithm knows. The wrapper shares the module's scope: same variables,
names and checkpoints as the bare module.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class TransformedInput(nn.Module):
  """`module` called on `transform(x)`, cast to its parameters' dtype (bfloat16 under
  `compute_dtype='bfloat16'`, as a float input would be cast); other arguments passed on."""

  module: nn.Module
  transform: Callable[[Any], Any]

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, x, *args, **kwargs):
    x = self.transform(x)
    params = jax.tree.leaves(self.variables.get("params", {}))
    if params:  # (None while initialising: float32.)
      x = x.astype(jnp.result_type(*params))
    return self.module(x, *args, **kwargs)


def with_input_transform(model: nn.Module, transform) -> nn.Module:
  """`model` seeing `transform(x)`; `model` itself where `transform` is None or `model` is
  already wrapped in it (so building twice never transforms twice)."""
  if transform is None or (isinstance(model, TransformedInput) and model.transform == transform):
    return model
  return TransformedInput(model, transform)


def unwrapped(model: nn.Module) -> nn.Module:
  """The bare module inside any `TransformedInput`s."""
  while isinstance(model, TransformedInput):
    model = model.module
  return model
