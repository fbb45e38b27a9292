"""Federated algorithms, selected by `config.algorithm`; all share one shape (see base)."""

from fedmerge_jax.algorithms import fedavg, fedmerge
from fedmerge_jax.algorithms.base import Algorithm

_FACTORIES = {
    "fedmerge": fedmerge.make,
    "fedavg": fedavg.make,
}
ALGORITHM_NAMES = tuple(_FACTORIES)


def get_algorithm(model, config, num_clients: int, example_input) -> Algorithm:
  """Builds `config.algorithm` for a population of `num_clients`."""
  if config.algorithm not in _FACTORIES:
    raise ValueError(f"algorithm={config.algorithm!r} is unknown; choose one of {ALGORITHM_NAMES}.")
  return _FACTORIES[config.algorithm](model, config, num_clients, example_input)
