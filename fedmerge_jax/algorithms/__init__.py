"""Federated algorithms, selected by `config.algorithm`; all share one shape (see base).

Each module builds an `Algorithm` from the shared merge, local-training and round pieces.
"""

from fedmerge_jax.algorithms import ditto, fedavg, fedavg_ft, fedem, fedmerge, ifca, local
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
}
ALGORITHM_NAMES = tuple(_FACTORIES)


def get_algorithm(model, config, num_clients: int, example_input) -> Algorithm:
  """Builds `config.algorithm` for a population of `num_clients`."""
  if config.algorithm not in _FACTORIES:
    raise ValueError(f"algorithm={config.algorithm!r} is unknown; choose one of {ALGORITHM_NAMES}.")
  return _FACTORIES[config.algorithm](model, config, num_clients, example_input)
