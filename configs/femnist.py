"""FedMerge (K = 5) on FEMNIST: all 3,400 writers, as in Reddi et al. (2021), 1,500 rounds.

Each round samples 10 writers, who run 1 epoch of SGD (batch 20, lr 0.1) on FedJAX's EMNIST
CNN. The data (FedJAX's federated EMNIST SQLite files, ~0.5 GB) is downloaded and cached
as a TFDS dataset on first use; a GPU is advised:

  python launch.py --config=configs/femnist.py --workdir=/tmp/femnist

With the two SQLite files already on disk (nothing is downloaded):

  python launch.py --config=configs/femnist.py --config.data.data_dir=/path/to/sqlite_dir \
      --workdir=/tmp/femnist

FedAvg baseline: add --config.algorithm=fedavg. 10% of each writer's train examples are
held out for validation (best/* metrics pick the round by validation loss, the paper's
protocol); --config.data.val_fraction=0 trains on all of them, as Reddi et al. did.
"""

from fedmerge_jax.config import femnist_training


def get_config():
  config = femnist_training()
  config.client_chunk_size = 10  # Bounds memory: evaluation runs 10 of 3,400 writers at once.
  config.data.data_dir = ""  # '' : download into TFDS's data dir (~/tensorflow_datasets).
  config.data.client_fraction = 1.0
  return config
