"""Federated datasets: `FederatedData` and the loaders selected by `config.data.name`."""

from fedmerge_jax.data import cifar100
from fedmerge_jax.data import digits
from fedmerge_jax.data import domains
from fedmerge_jax.data import femnist
from fedmerge_jax.data import leaf
from fedmerge_jax.data.errors import DataError
from fedmerge_jax.data.federated import ClientArrays, FederatedData
from fedmerge_jax.data.transforms import Standardize

__all__ = ["ClientArrays", "DataError", "FederatedData", "DATASET_NAMES", "Standardize", "load"]

_LOADERS = {
  "digits_groups": digits.load,
  "cifar100_cluster": cifar100.load_cluster,
  "cifar100_personal": cifar100.load_personal,
  "domainnet": domains.load_domainnet,
  "pacs": domains.load_pacs,
  "femnist": femnist.load,
  "leaf_femnist": leaf.load,
}
DATASET_NAMES = tuple(_LOADERS)


def load(data_config) -> FederatedData:
  """Loads the dataset named by `data_config.name`."""
  if data_config.name not in _LOADERS:
    raise DataError(f"data.name={data_config.name!r} is unknown; choose one of {DATASET_NAMES}.")
  return _LOADERS[data_config.name](data_config)
