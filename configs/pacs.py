"""FedMerge (K = 4) on PACS: 4 domains x 5 clients, 7 classes, 64x64 RGB, ResNet-9.

The paper's "domain" non-IID setting (its split is unpublished): every PACS domain
(art_painting, cartoon, photo, sketch) is split iid into 5 clients, each client's data
into train/val/test (70/10/20). Training follows the authors' settings (all clients
every round, 2 local epochs, batch 32, SGD lr 0.01, prox 0.01, lr_A 0.01, `official`).
PACS is a local image folder (no download; see fedmerge_jax/data/domains.py):

  python launch.py --config=configs/pacs.py --config.data.data_dir=/path/to/PACS/kfold \
      --workdir=/tmp/fedmerge_pacs

Compare with FedAvg, or split each domain by Dirichlet(0.5) labels:

  python launch.py --config=configs/pacs.py --config.data.data_dir=/path/to/PACS/kfold \
      --config.algorithm=fedavg --workdir=/tmp/fedavg_pacs
  python launch.py --config=configs/pacs.py --config.data.data_dir=/path/to/PACS/kfold \
      --config.data.partition=dirichlet --workdir=/tmp/fedmerge_pacs_dir
"""

from fedmerge_jax.config import authors_training


def get_config():
  config = authors_training(num_global_models=4)  # One global model per domain.
  config.data.name = "pacs"
  config.data.data_dir = ""  # Set to the folder holding art_painting/ cartoon/ photo/ sketch/.
  config.data.domains = ()  # All four.
  config.data.clients_per_domain = 5
  config.data.partition = "iid"  # Within each domain.
  config.data.image_size = 64
  return config
