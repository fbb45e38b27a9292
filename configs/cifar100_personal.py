"""FedMerge on the paper's "personal" CIFAR-100: 60k images over 50 clients by Dirichlet(0.1).

The authors' settings (arXiv 2504.06768): K = 5 globals, all 50 clients every round, 500
rounds, 2 local epochs of SGD (batch 32, lr 0.01, prox 0.01), their narrow ResNet-9, the
`official` update (lr_A = 0.01, server lr 1). The split (fedmerge_jax/data/cifar100.py):
train+test pooled, per-class Dirichlet(0.1) over the clients below N/50 examples, redrawn
until every client has >= 100; per client 1/6 test and 10% of the rest validation;
seed 11. Needs CIFAR-100 (see docs/pages/paper.md); a GPU is advised:

  python launch.py --config=configs/cifar100_personal.py --workdir=/tmp/fedmerge_cifar100_personal

With the archive downloaded: add --config.data.data_dir=DIR (DIR holding
cifar-100-python.tar.gz or cifar-100-binary.tar.gz).
"""

from fedmerge_jax.config import authors_training


def get_config():
  config = authors_training(num_global_models=5)
  config.data.name = "cifar100_personal"
  config.data.partition = "dirichlet"
  config.data.num_clients = 50
  config.data.dirichlet_alpha = 0.1
  config.data.min_client_size = 100
  config.data.test_fraction = 1 / 6
  config.data.val_fraction = 0.1  # Of what is left after the test split.
  config.data.seed = 11
  return config
