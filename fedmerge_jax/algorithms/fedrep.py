"""FedRep (Collins et al. 2021): a shared representation (body), a local head per client.

Follows the authors' code (lgcollins/FedRep, `main_fedrep.py` and `LocalUpdate.train`): a
sampled client joins the global body to its own head, trains the head with the body frozen
for `fedrep_head_epochs` epochs, then the body with the head frozen for `local_epochs`
epochs (their `local_ep - local_rep_ep` and `local_rep_ep`; their scripts use 10 + 5 and
10 + 1), and uploads the body; the server averages the sampled clients' bodies. Unsampled
clients keep their heads (their `w_locals`), as here. BatchNorm statistics follow the
model in train mode in both phases, as PyTorch's do when parameters are frozen. The
personal layers are `config.personal_layers` (default the 'head').

Where this differs, and why:
- Weights: the reference averages bodies with weights n_i on FEMNIST and Sent140 and
  equally on CIFAR (`lens = np.ones`); here always n_i / sum n (FedAvg's rule).
- Local optimizer: the reference uses SGD with momentum 0.5 and weight decay 1e-4; here the
  engine's plain SGD at `client_lr`, as every other method, so that comparisons differ only
  in the method.
With `fedrep_head_epochs=0` a round is FedAvg's with the heads frozen at their values.
"""

from fedmerge_jax.algorithms import partial_sharing
from fedmerge_jax.algorithms.partial_sharing import Phase


def make(model, config, num_clients, example_input):
  return partial_sharing.make(
    model,
    config,
    num_clients,
    example_input,
    personal_mask=lambda v: partial_sharing.personal_layers_mask(v, config.personal_layers),
    phases=(Phase(config.fedrep_head_epochs, "personal"), Phase(config.local_epochs, "shared")),
  )
