"""FedAvg and FedProx: FedMerge's machinery with one global model and frozen logits.

Theta <- server_optimizer(sum_i p_i Delta_i): with 'sgd' and server lr 1, plain FedAvg.
FedAvg trains without a proximal term; FedProx adds prox_mu * ||theta - theta_global||^2.
"""

import optax

from fedmerge_jax.algorithms import fedmerge
from fedmerge_jax.server_optim import ServerUpdate, named_optimizer


def averaging_server(config) -> ServerUpdate:
  """The example-weighted average of the deltas, stepped by the configured optimizer."""
  return ServerUpdate(
    globals_tx=optax.with_extra_args_support(
      named_optimizer(config.server_optimizer_globals, config.server_lr_globals)
    ),
    logits_tx=optax.set_to_zero(),
    logit_gradient_params="all",
    logits_first=False,
  )


def make(model, config, num_clients, example_input, prox_mu: float = 0.0):
  return fedmerge.make(
    model,
    config,
    num_clients,
    example_input,
    num_global_models=1,
    server_update=averaging_server(config),
    prox_mu=prox_mu,
  )


def make_fedprox(model, config, num_clients, example_input):
  return make(model, config, num_clients, example_input, prox_mu=config.prox_mu)
