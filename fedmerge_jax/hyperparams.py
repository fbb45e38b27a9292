"""Hyper-parameters as values: the seed and the floats a sweep varies reach jitted code as arrays.

An algorithm is built from its config (`algorithms.get_algorithm`), its hyper-parameters
closed over as Python constants, so each value compiles a program of its own. `valued`
builds it instead *inside* the traced functions, from a config whose `VALUE_FIELDS` read as
traced values (optax takes array learning rates, as `optax.inject_hyperparams` does): its
state is the pair (the algorithm's state, the values), and one compiled program serves every
value, so R replicas of different seeds and learning rates run as one `vmap`
(replicas.py). Every registered algorithm gets this unchanged, provided it uses these
fields in arithmetic only (no Python `if` on them) and its `predict` reads none of them.
"""

import json
from typing import Any, Callable, Dict

import flax
import jax
import numpy as np

from fedmerge_jax import config as config_lib

# The config fields that are values of the state (`ValuedState.values`), not constants: the
# seed and every float that a built-in algorithm reads but `fedfomo_val_fraction`, which sets
# the length of FedFomo's validation part (a shape), so runs that differ in it split groups.
VALUE_FIELDS = (
  "seed",
  "client_lr",
  "prox_mu",
  "server_lr_globals",
  "server_lr_logits",
  "ditto_lambda",
  "apfl_alpha",
  "perfedavg_alpha",
  "pfedme_lambda",
  "pfedme_personal_lr",
  "pfedme_beta",
  "pfedme_l2",
  "fedfomo_epsilon",
  "fedfomo_epsilon_decay",
  "fedamp_alpha",
  "fedamp_lambda",
  "fedamp_sigma",
  "cfl_eps1",
  "cfl_eps2",
)


class ConfigWithValues:
  """`config` read through, except that `VALUE_FIELDS` read as `values` (traced arrays);
  setting another field sets it on `config` (so wrap a copy)."""

  def __init__(self, config, values: Dict[str, Any]):
    object.__setattr__(self, "_config", config)
    object.__setattr__(self, "_values", values)

  def __getattr__(self, name):
    values = object.__getattribute__(self, "_values")
    if name in values:
      return values[name]
    return getattr(object.__getattribute__(self, "_config"), name)

  def __setattr__(self, name, value):
    if name in object.__getattribute__(self, "_values"):
      raise AttributeError(f"ConfigWithValues: {name!r} is a traced value; it cannot be set.")
    setattr(object.__getattribute__(self, "_config"), name, value)

  def get(self, name, default=None):
    values = object.__getattribute__(self, "_values")
    return values[name] if name in values else self._config.get(name, default)

  def copy_and_resolve_references(self):
    return ConfigWithValues(self._config.copy_and_resolve_references(), self._values)


def values_of(config) -> Dict[str, np.ndarray]:
  """A config's `VALUE_FIELDS` as NumPy scalars: the seed int32, the others float32."""
  return {
    name: np.asarray(getattr(config, name), np.int32 if name == "seed" else np.float32)
    for name in VALUE_FIELDS
  }


def stacked_values(configs) -> Dict[str, np.ndarray]:
  """`values_of` of several configs, each field stacked: [R] arrays, replica r's at row r."""
  rows = [values_of(c) for c in configs]
  return {name: np.stack([row[name] for row in rows]) for name in VALUE_FIELDS}


def program_key(config) -> str:
  """What a config's compiled program depends on: every field but `VALUE_FIELDS` (as JSON).

  Configs with equal keys share every shape and constant: they can be replicas of one group.
  """
  flat = dict(config_lib.flatten(json.loads(config.to_json())))
  return json.dumps({k: v for k, v in sorted(flat.items()) if k not in VALUE_FIELDS})


@flax.struct.dataclass
class ValuedState:
  """An algorithm's state with the hyper-parameter values it runs with."""

  inner: Any  # The algorithm's own state (what checkpoints hold).
  values: Dict[str, jax.Array]  # VALUE_FIELDS -> scalar arrays.


def valued(build_algorithm: Callable[[Any], Any], config):
  """The `Algorithm` that `build_algorithm(config)` returns, with its state a `ValuedState`.

  Every function builds the algorithm from `ConfigWithValues(config, state.values)` while it
  is traced, so values are arguments of the compiled program. `init` takes (rng, values).
  """
  host = build_algorithm(config)  # For what does not depend on the values: predict, sizes.
  at = lambda values: build_algorithm(
    ConfigWithValues(config.copy_and_resolve_references(), values)
  )

  def init(rng_and_values) -> ValuedState:
    rng, values = rng_and_values
    return ValuedState(at(values).init(rng), values)

  def round_fn(state: ValuedState, client_ids, data, rng):
    inner, metrics = at(state.values).round(state.inner, client_ids, data, rng)
    return ValuedState(inner, state.values), metrics

  def personalized(state: ValuedState, client_ids, train_data):
    return at(state.values).personalized(state.inner, client_ids, train_data)

  def received(state: ValuedState, client_ids, train_data):
    algorithm = at(state.values)
    return (algorithm.received or algorithm.personalized)(state.inner, client_ids, train_data)

  def merging_weights(state: ValuedState, client_ids, train_data):
    return at(state.values).merging_weights(state.inner, client_ids, train_data)

  def client_rows(state: ValuedState) -> ValuedState:  # The values are never per client.
    return ValuedState(host.client_rows(state.inner), jax.tree.map(lambda _: False, state.values))

  return host._replace(
    init=init,
    round=round_fn,
    personalized=personalized,
    received=received,
    merging_weights=merging_weights if host.merging_weights else None,
    client_rows=client_rows if host.client_rows else None,
    stages=None,
  )
