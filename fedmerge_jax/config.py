"""Every knob a user may turn, with its default, and the check that rejects bad ones.

`base_config()` is the full schema: experiment configs in `configs/` start from it and
override values. `validate(config)` rejects keys the schema lacks (suggesting the close
valid names) and out-of-range values, before any work is done. This module imports no
JAX or Flax at load time, so a bad key or number fails in well under 2 seconds; the
choice lists (which live beside the code they choose) are imported only to check names.
"""

import difflib

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "fedmerge"  # See fedmerge_jax.algorithms.ALGORITHM_NAMES.
  c.num_global_models = 4  # K.
  c.update_mode = "official"  # 'official' (the authors' code) or 'gradient' (chain rule).
  # 'official' mode's logit step: 'authors' (their update_W: L1-normalised gradient, repeated
  # 0.01 p_i G steps until an entry moved > server_lr_logits, at most 10,000) or
  # 'max_normalized' (one step lr_A G / max|G|). See server_optim.py.
  c.logit_step = "authors"
  c.num_rounds = 100
  c.clients_per_round = 0  # 0: every client, every round.
  c.local_epochs = 1
  c.batch_size = 32
  # 'epoch': each epoch ceil(n/B) batches of a fresh permutation, the last partial (PyTorch's
  # DataLoader, the FedMerge authors'); 'stream': E passes concatenated, cut into ceil(nE/B)
  # batches (FedJAX's shuffle-repeat-batch). Identical when local_epochs = 1.
  c.local_batching = "epoch"
  c.client_lr = 0.05
  c.prox_mu = 0.01  # fedmerge, fedprox: local loss CE + prox_mu * ||theta - theta_received||^2.
  c.server_lr_globals = 1.0
  c.server_lr_logits = 0.01
  c.server_optimizer_globals = "sgd"  # Any optax optimizer name ('gradient' mode, fedavg).
  c.server_optimizer_logits = "sgd"  # Any optax optimizer name ('gradient' mode).
  c.finetune_epochs = 1  # fedavg_ft: local epochs of fine-tuning before evaluation.
  c.ditto_lambda = 0.1  # ditto: personal loss F_i(v) + lambda/2 ||v - w||^2.
  c.eval_every = 10
  c.client_chunk_size = 0  # Clients whose outputs are held at once ('vmap': trained at once); 0: all.
  c.client_parallelism = "auto"  # 'auto' | 'vmap' | 'sequential': how clients run (parallel.py).
  c.num_devices = 0  # Devices the client axis is sharded over; 0: all (every host's).
  c.seed = 0
  c.checkpoint_every = 50  # Checkpoint every this many rounds (and at the end); 0: never.
  # Also checkpoint when this many minutes passed since the last save (whichever of the two
  # comes first); 0: by rounds only. Either alone turns checkpoints on.
  c.checkpoint_every_minutes = 0.0
  c.checkpoint_keep = 2  # How many recent checkpoints to keep in <workdir>/checkpoints.
  c.tensorboard = True  # TensorBoard event files in the workdir.

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"
  c.model.hidden_sizes = (128,)  # mlp only.
  c.model.conv_impl = "auto"  # 'auto' | 'xla' | 'canonical' | 'patches' (models/layers.py).

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits_groups"
  c.data.data_dir = ""  # Local copies of downloadable datasets ('' : the TFDS data dir).
  c.data.num_clients = 20
  c.data.client_fraction = 1.0  # Keep a fixed random fraction of a natural dataset's clients.
  c.data.only_digits = False  # FEMNIST: the 10-class digits-only variant.
  c.data.num_groups = 4  # digits_groups: hidden client groups.
  c.data.group_transform = "label_permutation"  # digits_groups: 'label_permutation' | 'rotation'.
  c.data.partition = "iid"  # 'iid' | 'dirichlet' | 'pathological' | 'cluster' | 'natural'.
  c.data.dirichlet_alpha = 0.5
  c.data.classes_per_client = 2  # 'pathological' partition.
  c.data.num_clusters = 5  # 'cluster' partition (the paper's CIFAR-100 scheme).
  c.data.classes_per_cluster = 30  # 'cluster' partition.
  c.data.min_client_size = 1  # Partitions are redrawn until every client has this many.
  c.data.domains = ()  # Domain datasets: which domains to use; () : all.
  c.data.clients_per_domain = 5  # Domain datasets.
  c.data.classes = ()  # Domain datasets: class names to keep, relabelled 0.. in order; () : all.
  c.data.image_size = 64  # Domain datasets: images are resized to image_size x image_size.
  c.data.test_fraction = 0.2
  c.data.val_fraction = 0.1
  c.data.seed = 0
  return c


def authors_training(num_global_models: int = 5) -> ml_collections.ConfigDict:
  """base_config() with the FedMerge authors' training: all clients every round, 500 rounds,
  2 local epochs of SGD (batch 32, lr 0.01, prox 0.01), narrow ResNet-9, `official` update
  (lr_A 0.01, server lr 1). Used by the CIFAR-100 and domain configs."""
  c = base_config()
  c.algorithm = "fedmerge"
  c.num_global_models = num_global_models
  c.update_mode = "official"
  c.num_rounds = 500
  c.clients_per_round = 0
  c.local_epochs = 2
  c.batch_size = 32
  c.client_lr = 0.01
  c.prox_mu = 0.01
  c.server_lr_logits = 0.01
  c.server_lr_globals = 1.0
  c.eval_every = 1  # The authors evaluate every round and select on mean validation loss.
  c.model.name = "resnet9"
  return c


def femnist_training() -> ml_collections.ConfigDict:
  """base_config() with Reddi et al. (2021)'s FEMNIST setup and FedMerge (K = 5): 10 writers
  a round, 1 local epoch, batch 20, client lr 0.1, 1,500 rounds, FedJAX's EMNIST CNN."""
  c = base_config()
  c.algorithm = "fedmerge"
  c.num_global_models = 5
  c.update_mode = "official"
  c.num_rounds = 1500
  c.clients_per_round = 10
  c.local_epochs = 1
  c.batch_size = 20
  c.local_batching = "stream"  # FedJAX's, as Reddi et al. ran it.
  c.client_lr = 0.1
  c.eval_every = 50
  c.model.name = "emnist_cnn"
  c.data.name = "femnist"
  c.data.val_fraction = 0.1
  return c


def _registered(module) -> tuple:
  """A registry's names: `registered_names()` where the registry has it, else its constant."""
  names = getattr(module, "registered_names", None)
  if names is not None:
    return tuple(names())
  return tuple(getattr(module, "MODEL_NAMES", None) or getattr(module, "ALGORITHM_NAMES"))


def _choices() -> dict:
  """The valid names of each choice field; imported lazily (they pull in JAX and Flax)."""
  # pylint: disable=import-outside-toplevel
  from fedmerge_jax import algorithms
  from fedmerge_jax import models
  from fedmerge_jax.models.layers import CONV_IMPLS
  from fedmerge_jax.parallel import CLIENT_PARALLELISMS
  from fedmerge_jax.server_optim import LOGIT_STEPS, UPDATE_MODES
  return {
      "algorithm": _registered(algorithms),
      "update_mode": UPDATE_MODES,
      "logit_step": LOGIT_STEPS,
      "model.name": _registered(models),
      "model.conv_impl": CONV_IMPLS,
      "client_parallelism": CLIENT_PARALLELISMS,
      "local_batching": ("epoch", "stream"),
  }
_POSITIVE = ("num_global_models", "num_rounds", "local_epochs", "batch_size", "eval_every",
             "checkpoint_keep")
_NON_NEGATIVE = ("clients_per_round", "client_chunk_size", "num_devices", "prox_mu", "client_lr",
                 "checkpoint_every", "checkpoint_every_minutes",
                 "finetune_epochs", "ditto_lambda",
                 "server_lr_globals", "server_lr_logits")
_FRACTIONS = ("data.test_fraction", "data.val_fraction")


class ConfigError(ValueError):
  """A config key or value that cannot work, with what to do instead."""


def flatten(config, prefix=""):
  """(dotted path, value) of every leaf of a ConfigDict or a nested dict (e.g. config.json)."""
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from flatten(value, path + ".")
    else:
      yield path, value


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` over the defaults of `base_config()`, validated; missing keys get defaults."""
  validate(config, check_values=False)
  full = base_config()
  full.update_from_flattened_dict(dict(flatten(config)))
  validate(full)
  return full


def unknown_key_message(path: str) -> str:
  """'Unknown config key 'model.hidden'. Did you mean 'model.hidden_sizes'?' for a dotted path."""
  schema = dict(flatten(base_config()))
  close = difflib.get_close_matches(path, schema, n=3, cutoff=0.6)
  head = path.rsplit(".", 1)[0] + "." if "." in path else ""
  close += [k for k in schema if head and k.startswith(head) and k not in close
            and path.rsplit(".", 1)[1] in k][:3 - len(close)]
  hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
  return f"Unknown config key {path!r}.{hint}"


def validate(config: ml_collections.ConfigDict, check_values: bool = True) -> None:
  """Raises ConfigError naming the first unknown key or bad value."""
  schema = dict(flatten(base_config()))
  for path, value in flatten(config):
    if path not in schema:
      raise ConfigError(unknown_key_message(path))
    expected = schema[path]
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"Config {path}={value!r} must be a number.")
  if not check_values:
    return
  flat = dict(flatten(config))
  for path in _POSITIVE:
    if flat[path] <= 0:
      raise ConfigError(f"Config {path}={flat[path]!r} must be > 0.")
  for path in _NON_NEGATIVE:
    if flat[path] < 0:
      raise ConfigError(f"Config {path}={flat[path]!r} must be >= 0.")
  for path in _FRACTIONS:
    if not 0 <= flat[path] < 1:
      raise ConfigError(f"Config {path}={flat[path]!r} must be in [0, 1).")
  for path, choices in _choices().items():  # Last: the only check that imports JAX.
    if flat[path] not in choices:
      raise ConfigError(f"Config {path}={flat[path]!r} is not one of {choices}.")


# Datasets split into exactly `data.num_clients` clients by their loaders.
_SPLIT_INTO_NUM_CLIENTS = ("digits_groups", "cifar100_cluster", "cifar100_personal")


def data_warnings(config, num_clients: int, data_name: str = "") -> list:
  """What in a resolved `config` the loaded data cannot honour, naming both numbers.

  Warnings, not errors: the run still works (every round trains every client).
  """
  found = []
  if config.clients_per_round > num_clients:
    found.append(f"config.clients_per_round={config.clients_per_round} but the dataset has only "
                 f"{num_clients} clients: every round trains all {num_clients}.")
  if (data_name == config.data.name and data_name in _SPLIT_INTO_NUM_CLIENTS
      and num_clients < config.data.num_clients):
    found.append(f"config.data.num_clients={config.data.num_clients} but the dataset "
                 f"{data_name} has only {num_clients} clients.")
  return found
