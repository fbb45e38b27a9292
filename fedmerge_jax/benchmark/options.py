"""The benchmark's command-line flags, and the config of one benchmark row from them."""

from absl import flags

from fedmerge_jax import client as client_lib
from fedmerge_jax import config as config_lib
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax.models.layers import CONV_IMPLS

FLAGS = flags.FLAGS
flags.DEFINE_list("algorithm", ["fedmerge"], "Comma-separated algorithms, run in turn.")
flags.DEFINE_list("num_global_models", ["5"], "K values for fedmerge (fedavg always uses 1).")
flags.DEFINE_list("model", ["emnist_cnn"], f"Comma-separated models from {models.MODEL_NAMES}.")
flags.DEFINE_integer(
  "clients", 10, "Clients in the population of `equal` and `femnist` sizes.", lower_bound=1
)
flags.DEFINE_integer(
  "clients_per_round", 0, "Clients sampled a round (0: all, every round).", lower_bound=0
)
flags.DEFINE_list(
  "client_sizes",
  ["equal"],
  "Workloads: equal|femnist|cifar100_cluster (comma-separated), or one "
  "comma-separated list of client sizes.",
)
flags.DEFINE_integer(
  "examples_per_client", 200, "Training examples per client of `equal`.", lower_bound=1
)
flags.DEFINE_integer("batch_size", 20, "Local batch size.", lower_bound=1)
flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.", lower_bound=1)
flags.DEFINE_enum(
  "local_batching",
  "epoch",
  client_lib.BATCHINGS,
  "'epoch' (PyTorch DataLoader) or 'stream' (FedJAX); see client.py.",
)
flags.DEFINE_enum("data_dtype", "float32", ["float32", "float16"], "Synthetic pixels' dtype.")
flags.DEFINE_enum("conv_impl", "auto", CONV_IMPLS, "Convolution implementation.")
flags.DEFINE_integer(
  "client_chunk_size", 0, "Clients held (vmap: trained) at once; 0: all.", lower_bound=0
)
flags.DEFINE_enum(
  "client_parallelism", "auto", parallel.CLIENT_PARALLELISMS, "How clients run (see parallel.py)."
)
flags.DEFINE_integer("rounds", 5, "Timed rounds, after one warm-up (compile) round.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for data, init and rounds.")
flags.DEFINE_bool("reference", True, "Also time the Python loop of jitted steps (FedJAX's way).")
flags.DEFINE_enum(
  "reference_conv_impl",
  "xla",
  CONV_IMPLS,
  "The reference's convolutions: 'xla' is what FedJAX's models use.",
)
flags.DEFINE_bool("breakdown", False, "Time merge, training, server update, evaluation apart.")
flags.DEFINE_bool("scaling", False, "Time rounds and measure memory for --scaling_clients.")
flags.DEFINE_list("scaling_clients", ["10", "100", "1000", "3400"], "Clients per round to scale.")
flags.DEFINE_integer(
  "scaling_rounds", 1, "Timed rounds per scale (after compiling).", lower_bound=1
)
flags.DEFINE_integer("scaling_worker", 0, "Internal: run one scale in this process.")
flags.DEFINE_bool("targets", False, "Print a line checking the measurements against targets.")
flags.DEFINE_list(
  "image_shape",
  [],
  "Synthetic examples' shape H,W,C instead of the model's "
  "default (MODELS), e.g. 32,32,3 for the CIFAR-10 shape.",
)
flags.DEFINE_integer(
  "num_classes", 0, "Synthetic labels' classes instead of the model's default (0).", lower_bound=0
)
flags.DEFINE_integer("peak_size", 2048, "Matrix size of the matmul that measures peak FLOP/s.")
flags.DEFINE_enum(
  "compute_dtype",
  "float32",
  client_lib.COMPUTE_DTYPES,
  "config.compute_dtype: local training's and evaluation's activations and matmuls.",
)
flags.DEFINE_enum(
  "local_loop",
  "auto",
  parallel.LOCAL_LOOP_CHOICES,
  "config.local_loop: 'while' | 'static' (fixed trip count) | 'auto'.",
)
flags.DEFINE_integer(
  "local_unroll", 1, "config.local_unroll: steps per 'static' loop iteration.", lower_bound=1
)
flags.DEFINE_enum(
  "command_buffers",
  "default",
  tuple(parallel.COMMAND_BUFFERS),
  "config.command_buffers: XLA:GPU command buffers (CUDA graphs); GPU only.",
)
flags.DEFINE_integer(
  "profile_kernels",
  0,
  "After timing, trace one more round with the "
  "profiler and report its top this many kernels by device time (0: off).",
  lower_bound=0,
)
# What a scaling worker process is passed on, besides its scale, algorithm, model and K.
SCALING_WORKER_FLAGS = (
  "examples_per_client",
  "batch_size",
  "local_epochs",
  "local_batching",
  "conv_impl",
  "client_chunk_size",
  "client_parallelism",
  "scaling_rounds",
  "seed",
  "compute_dtype",
  "local_loop",
  "local_unroll",
  "command_buffers",
  "image_shape",
  "num_classes",
)


def make_config(algorithm: str, model: str, num_global_models: int):
  """The resolved config for one benchmark row, from the command-line flags."""
  config = config_lib.base_config()
  config.algorithm = algorithm
  config.num_global_models = 1 if algorithm == "fedavg" else num_global_models
  config.model.name = model
  config.model.conv_impl = FLAGS.conv_impl
  config.local_epochs = FLAGS.local_epochs
  config.batch_size = FLAGS.batch_size
  config.local_batching = FLAGS.local_batching
  config.client_chunk_size = FLAGS.client_chunk_size
  config.client_parallelism = FLAGS.client_parallelism
  config.clients_per_round = FLAGS.clients_per_round
  config.seed = FLAGS.seed
  config.compute_dtype = FLAGS.compute_dtype
  config.local_loop = FLAGS.local_loop
  config.local_unroll = FLAGS.local_unroll
  config.command_buffers = FLAGS.command_buffers
  return config_lib.resolve(config)
