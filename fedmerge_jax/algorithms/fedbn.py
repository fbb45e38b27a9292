"""FedBN (Li et al. 2021): FedAvg on everything but the BatchNorm layers, which stay local.

Follows the authors' code (med-air/FedBN, `federated/fed_digits.py`, `communication`):
every key with 'bn' in its name (BatchNorm's weight, bias, running mean and variance) is
left out of the average and kept by its client; all other parameters are averaged and sent
back. Here a BatchNorm layer is any module that keeps 'batch_stats' (`models.batch_norm_mask`):
its statistics and its scale and bias are personal. On a model without BatchNorm FedBN is
FedAvg, exactly.

Where this differs, and why:
- The reference trains every client every round; under partial participation (not in the
  reference) the sampled clients' shared layers are averaged and an unsampled client keeps
  its BatchNorm layers unchanged.
- The reference weights clients equally (`client_weights = 1/client_num`; its clients hold
  equal numbers of examples); here p_i = n_i / sum n, FedAvg's weights: the same on equal
  clients, and the engine's one averaging rule on unequal ones.
- Local training is the engine's plain SGD at `client_lr` (the reference: SGD, and Adam for
  some datasets). Padded rows are masked out of the BatchNorm statistics (client.py).
"""

from fedmerge_jax.algorithms import partial_sharing
from fedmerge_jax.models import batch_norm_mask


def make(model, config, num_clients, example_input):
  return partial_sharing.make(
    model, config, num_clients, example_input, personal_mask=batch_norm_mask
  )
