"""Federated datasets: `FederatedData` and the loaders selected by `config.data.name`."""

from fedmerge_jax.data import digits
from fedmerge_jax.data.federated import ClientArrays, FederatedData

__all__ = ["ClientArrays", "FederatedData", "DATASET_NAMES", "load"]

_LOADERS = {
    "digits_groups": digits.load,
}
DATASET_NAMES = tuple(_LOADERS)


def load(data_config) -> FederatedData:
  """Loads the dataset named by `data_config.name`."""
  if data_config.name not in _LOADERS:
    raise ValueError(f"data.name={data_config.name!r} is unknown; choose one of {DATASET_NAMES}.")
  return _LOADERS[data_config.name](data_config)
