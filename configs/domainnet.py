"""FedMerge (K = 6) on DomainNet: 6 domains x 5 clients, 10 classes, 64x64 RGB, ResNet-9.

Every DomainNet domain (clipart, infograph, painting, quickdraw, real, sketch) is split
iid into 5 clients, each client's data into train/val/test (70/10/20). The 10 classes
are FedBN's (Li et al. 2021) DomainNet subset: all 345 classes at 64x64 would need about
30 GB of host memory as float32 (set `--config.data.classes='()'` on a machine that has
it). Training follows the authors' settings (all clients every round, 2 local epochs,
batch 32, SGD lr 0.01, prox 0.01, lr_A 0.01, `official`).

DomainNet is read from TFDS (array_record; preparing it needs TensorFlow, see
fedmerge_jax/data/domains.py):

  python launch.py --config=configs/domainnet.py --config.data.data_dir=/path/to/tfds \
      --workdir=/tmp/fedmerge_domainnet

Compare with FedAvg:

  python launch.py --config=configs/domainnet.py --config.data.data_dir=/path/to/tfds \
      --config.algorithm=fedavg --workdir=/tmp/fedavg_domainnet
"""

from fedmerge_jax.config import authors_training

FEDBN_CLASSES = (
  "bird",
  "feather",
  "headphones",
  "ice_cream",
  "teapot",
  "tiger",
  "whale",
  "windmill",
  "wine_glass",
  "zebra",
)


def get_config():
  config = authors_training(num_global_models=6)  # One global model per domain.
  config.data.name = "domainnet"
  config.data.data_dir = ""  # '' : TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.data.domains = ()  # All six.
  config.data.classes = FEDBN_CLASSES
  config.data.clients_per_domain = 5
  config.data.partition = "iid"  # Within each domain.
  config.data.image_size = 64
  return config
