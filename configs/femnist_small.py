"""FedMerge (K = 5) on a fixed 5% of FEMNIST's writers (170): a laptop-sized FEMNIST run.

Same setup as configs/femnist.py (10 writers a round, 1 epoch, batch 20, lr 0.1, EMNIST
CNN), 200 rounds. The first run downloads FedJAX's SQLite files (~0.5 GB) and caches all
writers as a TFDS dataset; later runs read the cache:

  python launch.py --config=configs/femnist_small.py --workdir=/tmp/femnist_small

With the SQLite files already on disk (nothing is downloaded):

  python launch.py --config=configs/femnist_small.py \
      --config.data.data_dir=/path/to/sqlite_dir --workdir=/tmp/femnist_small
"""

from fedmerge_jax.config import femnist_training


def get_config():
  config = femnist_training()
  config.num_rounds = 200
  config.eval_every = 20
  config.client_chunk_size = 2  # Evaluation: 2 writers' models at a time (bounds memory).
  config.data.data_dir = ""  # '' : download into TFDS's data dir (~/tensorflow_datasets).
  config.data.client_fraction = 0.05  # A fixed random 5% of the 3,400 writers (data.seed).
  return config
