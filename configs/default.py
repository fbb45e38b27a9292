"""The offline default: FedMerge on scikit-learn's digits, 20 clients in 4 hidden groups.

Each group relabels the digits with its own permutation, so one shared model cannot serve
everyone; FedMerge's K = 4 merged globals can. Runs in well under a minute on 2 CPU cores:

  python launch.py --config=configs/default.py --workdir=/tmp/fedmerge_default

Compare with FedAvg (K = 1):

  python launch.py --config=configs/default.py --config.algorithm=fedavg --workdir=/tmp/fedavg
"""

from fedmerge_jax.config import base_config


def get_config():
  config = base_config()
  config.algorithm = "fedmerge"
  config.num_global_models = 4
  config.update_mode = "official"
  config.num_rounds = 200
  config.local_epochs = 1
  config.batch_size = 16
  config.client_lr = 0.1
  config.server_lr_logits = 0.1
  config.eval_every = 20
  config.model.name = "mlp"
  config.model.hidden_sizes = (64,)
  config.data.name = "digits_groups"
  config.data.num_clients = 20
  config.data.num_groups = 4
  return config
