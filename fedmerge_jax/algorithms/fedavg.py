"""FedAvg: FedMerge's machinery with one global model and frozen merging logits.

Theta <- server_optimizer(sum_i p_i Delta_i): with 'sgd' and server lr 1, plain FedAvg.
"""

import optax

from fedmerge_jax.algorithms import fedmerge
from fedmerge_jax.server_optim import ServerUpdate, named_optimizer


def make(model, config, num_clients, example_input):
  server = ServerUpdate(
      globals_tx=optax.with_extra_args_support(
          named_optimizer(config.server_optimizer_globals, config.server_lr_globals)),
      logits_tx=optax.set_to_zero(),
      logit_gradient_params="all",
      logits_first=False)
  return fedmerge.make(model, config, num_clients, example_input,
                       num_global_models=1, server_update=server)
