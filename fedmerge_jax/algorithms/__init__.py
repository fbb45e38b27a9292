"""Federated algorithms, selected by `config.algorithm`; all share one shape (see base).

Each module builds an `Algorithm` from the shared merge, local-training and round pieces.
Users add theirs with `register_algorithm(name, factory)`; README "Your own algorithm".
"""

from typing import Callable, Tuple

from fedmerge_jax import registry
from fedmerge_jax.algorithms import (apfl, cfl, ditto, fedamp, fedavg, fedavg_ft, fedbn, fedem,
                                     fedfomo, fedmerge, fedper, fedrep, ifca, local, perfedavg,
                                     pfedme)
from fedmerge_jax.algorithms.base import Algorithm

_FACTORIES = {
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
ALGORITHM_NAMES = tuple(_FACTORIES)  # The built-ins; registered_names() adds the users'.
Factory = Callable[..., Algorithm]


def register_algorithm(name: str, factory: Factory) -> None:
  """Makes `config.algorithm=name` build `factory(model, config, num_clients, example_input)`.

  The factory returns an `Algorithm` (algorithms/base.py documents the protocol).
  Registering a name again replaces its factory; built-in names cannot be replaced.
  """
  registry.add(_FACTORIES, ALGORITHM_NAMES, name, factory, "algorithm",
               "(model, config, num_clients, example_input) -> Algorithm")


def registered_names() -> Tuple[str, ...]:
  """Every name `config.algorithm` accepts now: the built-ins, then registered ones."""
  return tuple(_FACTORIES)
# Algorithms whose server weights a client by its share of the whole population's examples.
_POPULATION_WEIGHTED = ("fedem",)


def get_algorithm(model, config, num_clients: int, example_input,
                  total_train_examples=None) -> Algorithm:
  """Builds `config.algorithm` for a population of `num_clients` holding
  `total_train_examples` training examples in all (FedEM's server weights need it)."""
  if config.algorithm not in _FACTORIES:
    raise ValueError(f"algorithm={config.algorithm!r} is unknown; choose one of "
                     f"{registered_names()} (or register yours: algorithms.register_algorithm).")
  extra = ({"total_train_examples": total_train_examples}
           if config.algorithm in _POPULATION_WEIGHTED else {})
  return _FACTORIES[config.algorithm](model, config, num_clients, example_input, **extra)
