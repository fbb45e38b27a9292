"""FedPer (Arivazhagan et al. 2019): FedAvg on the body; each client keeps its own head.

Follows FL-bench's and PFLlib's FedPer: a sampled client receives the global body, joins
its own personal layers (`config.personal_layers`, default the classifier 'head'), trains
the whole model jointly for `local_epochs` and uploads only the body, which the server
averages over the sampled clients weighted by n_i (FedAvg's rule). Unsampled clients keep
their personal layers, as in both references; a client never sampled predicts with the
initial head. With `personal_layers=()` FedPer is FedAvg.

Differences: none in the rule. Local training is the engine's (plain SGD at `client_lr`,
'epoch' or 'stream' batching, masked BatchNorm statistics) so that comparisons differ only
in the method. BatchNorm layers in the body are shared (statistics averaged like weights):
the references' personal part is the classifier only.
"""

from fedmerge_jax.algorithms import partial_sharing


def make(model, config, num_clients, example_input):
  return partial_sharing.make(
    model,
    config,
    num_clients,
    example_input,
    personal_mask=lambda v: partial_sharing.personal_layers_mask(v, config.personal_layers),
  )
