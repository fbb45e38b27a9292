"""Federated algorithms, selected by `config.algorithm`; all share one shape (see base).

Each module builds an `Algorithm` from the shared merge, local-training and round pieces.
Users add theirs with `register_algorithm(name, factory)`: docs/pages/extending.md,
"Your own algorithm".
"""

from typing import Callable, Tuple

from fedmerge_jax import registry
from fedmerge_jax.algorithms import (
  apfl,
  cfl,
  ditto,
  fedamp,
  fedavg,
  fedavg_ft,
  fedbn,
  fedem,
  fedfomo,
  fedmerge,
  fedper,
  fedrep,
  ifca,
  local,
  perfedavg,
  pfedme,
)
from fedmerge_jax.algorithms.base import Algorithm

registry.ALGORITHMS.add_builtins(
  {
    "fedmerge": fedmerge.make,
    "fedavg": fedavg.make,
    "fedprox": fedavg.make_fedprox,
    "fedavg_ft": fedavg_ft.make,
    "local": local.make,
    "ditto": ditto.make,
    "ifca": ifca.make,
    "fedem": fedem.make,
    "fedbn": fedbn.make,
    "fedper": fedper.make,
    "fedrep": fedrep.make,
    "apfl": apfl.make,
    "perfedavg": perfedavg.make,
    "pfedme": pfedme.make,
    "fedfomo": fedfomo.make,
    "fedamp": fedamp.make,
    "cfl": cfl.make,
  }
)
ALGORITHM_NAMES = registry.BUILTIN_ALGORITHMS  # The built-ins; registered_names() adds the users'.
Factory = Callable[..., Algorithm]


def register_algorithm(name: str, factory: Factory) -> None:
  """Makes `config.algorithm=name` build `factory(model, config, num_clients, example_input)`.

  The factory returns an `Algorithm` (algorithms/base.py documents the protocol).
  Registering a name again replaces its factory; built-in names cannot be replaced.
  """
  registry.ALGORITHMS.add(name, factory)


def registered_names() -> Tuple[str, ...]:
  """Every name `config.algorithm` accepts now: the built-ins, then registered ones."""
  return registry.ALGORITHMS.names()


# Algorithms whose server weights a client by its share of the whole population's examples.
_POPULATION_WEIGHTED = ("fedem",)


def get_algorithm(
  model, config, num_clients: int, example_input, total_train_examples=None
) -> Algorithm:
  """Builds `config.algorithm` for a population of `num_clients` holding
  `total_train_examples` training examples in all (FedEM's server weights need it)."""
  factory = registry.ALGORITHMS.get(config.algorithm)
  extra = (
    {"total_train_examples": total_train_examples}
    if config.algorithm in _POPULATION_WEIGHTED
    else {}
  )
  return factory(model, config, num_clients, example_input, **extra)
