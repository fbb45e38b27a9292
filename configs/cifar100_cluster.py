"""FedMerge on the paper's "cluster" CIFAR-100: 50 clients in 5 overlapping class clusters.

The authors' settings (arXiv 2504.06768): K = 5 globals, all 50 clients every round, 500
rounds, 2 local epochs of SGD (batch 32, lr 0.01, prox 0.01), their narrow ResNet-9, the
`official` update (lr_A = 0.01, server lr 1). The split (fedmerge_jax/data/cifar100.py):
5 clusters of 30 classes, clients per cluster from uniform_filter1d(rand(5), 3) scaled
to 50, each class split among its holders by Dirichlet(10), seed 11. Needs CIFAR-100
(see docs/pages/paper.md); a GPU is advised:

  python launch.py --config=configs/cifar100_cluster.py --workdir=/tmp/fedmerge_cifar100_cluster

With the archive downloaded: add --config.data.data_dir=DIR (DIR holding
cifar-100-python.tar.gz or cifar-100-binary.tar.gz).
"""

from fedmerge_jax.config import authors_training


def get_config():
  config = authors_training(num_global_models=5)
  config.data.name = "cifar100_cluster"
  config.data.partition = "cluster"
  config.data.num_clients = 50
  config.data.num_clusters = 5
  config.data.classes_per_cluster = 30
  config.data.dirichlet_alpha = 10.0  # Each class's samples among the clients holding it.
  config.data.val_fraction = 0.1  # Of each class's training samples.
  config.data.seed = 11
  return config
