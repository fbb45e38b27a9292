"""Every knob a user may turn, with its default, and the check that rejects bad ones.

`base_config()` is the full schema: experiment configs in `configs/` start from it and
override values. `validate(config)` rejects keys the schema lacks (suggesting the close
valid names) and out-of-range values, before any work is done. This module imports no
JAX or Flax, so a bad key, number or name fails in well under 2 seconds: the names it
checks come from `choices` and `registry`, JAX-free modules below everything.
"""

import difflib

import ml_collections

from fedmerge_jax import choices
from fedmerge_jax import registry


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "fedmerge"  # See fedmerge_jax.registry.BUILTIN_ALGORITHMS.
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
  # Personalised baselines fedbn, fedper, fedrep, apfl, perfedavg (their modules' docstrings):
  c.personal_layers = ("head",)  # fedper, fedrep: top-level layers each client keeps (classifier).
  # fedrep: head epochs (body frozen) before local_epochs on the body (lgcollins/FedRep: 10).
  c.fedrep_head_epochs = 10
  c.apfl_alpha = 0.5  # apfl: initial mixing weight alpha in [0, 1] (FedTorch's default).
  c.apfl_adaptive_alpha = True  # apfl: learn each client's alpha (the paper's adaptive APFL).
  c.perfedavg_alpha = 0.01  # perfedavg: inner and test-time step (beta: client_lr); ours: tune.
  c.perfedavg_variant = "fo"  # perfedavg: 'fo' (first order) or 'hf' (Hessian-vector product).
  # pfedme, fedfomo, fedamp, cfl: defaults of each one's reference code (module docstrings).
  c.pfedme_lambda = 15.0  # pfedme: lambda of the Moreau envelope, lambda/2 ||theta - w_i||^2.
  c.pfedme_inner_steps = 5  # pfedme: K steps on theta per batch.
  c.pfedme_personal_lr = 0.09  # pfedme: theta's learning rate (client_lr is w_i's, eta).
  c.pfedme_beta = 1.0  # pfedme: server w <- (1 - beta) w + beta * average of the w_i.
  c.pfedme_l2 = 0.001  # pfedme: the reference optimizer's l2 term (mu) on theta.
  c.fedfomo_downloads = 4  # fedfomo: other clients' models a client downloads (M).
  c.fedfomo_epsilon = 0.3  # fedfomo: chance of exploring (a random model instead of a top one)...
  c.fedfomo_epsilon_decay = 0.05  # fedfomo: ...less this much per round.
  c.fedfomo_val_fraction = (
    0.2  # fedfomo: share of each client's training data held out to weigh models.
  )
  c.fedamp_alpha = 1.0  # fedamp: alpha_k, step of the attention (xi_ij = alpha e^{-d/sigma}/sigma).
  c.fedamp_lambda = 1.0  # fedamp: local loss F_i(w) + lambda/(2 alpha) ||w - u_i||^2.
  c.fedamp_sigma = 1.0  # fedamp: scale of the squared model distance d in the attention.
  c.cfl_eps1 = 0.4  # cfl: split a cluster when ||mean update|| < eps1 ...
  c.cfl_eps2 = 1.6  # cfl: ... and max ||update|| > eps2 ...
  c.cfl_warmup_rounds = 20  # cfl: ... and more than this many rounds are done.
  c.cfl_max_clusters = 8  # cfl: most clusters (static shapes); a full set splits no more.
  c.eval_every = 10
  c.client_chunk_size = (
    0  # Clients whose outputs are held at once ('vmap': trained at once); 0: all.
  )
  c.client_parallelism = "auto"  # 'auto' | 'vmap' | 'sequential': how clients run (parallel.py).
  # How a replica group's runs share its program (replicas.py): 'vmap' (at once), 'sequential'
  # (one after another inside it), 'auto' ('sequential' for a model with convolutions on CPU).
  c.replica_parallelism = "auto"
  # Evaluation (and the gap's) in chunks: clients at once (0: enough for about 2,048 examples,
  # at most client_chunk_size where set) and examples of one client at once (0: 256).
  c.eval_chunk_size = 0
  c.eval_batch_size = 0
  # Local training's loop: 'while' (stops at each client's own step count), 'static' (a fixed
  # trip count from the round's padded length: no host round-trip per step on GPUs), 'auto'
  # ('static' when a GPU/TPU vmaps the whole round as one chunk, else 'while'). client.py.
  c.local_loop = "auto"
  c.local_unroll = 1  # Steps per iteration of the 'static' loop (lax.fori_loop's unroll).
  # 'float32', or 'bfloat16': activations and matmuls in bf16 (params and inputs cast in the
  # forward/backward of local training and evaluation); params, optimizer state, loss,
  # BatchNorm statistics, deltas and the server update stay float32.
  c.compute_dtype = "float32"
  # XLA:GPU command buffers (CUDA graphs): 'default' (XLA's choice), 'off', or 'loops' (also
  # WHILE and CONDITIONAL, so a whole local loop can run as one graph). GPU only; ignored elsewhere.
  c.command_buffers = "default"
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
  c.model.conv_impl = "auto"  # layers.CONV_IMPLS: 'auto', 'xla', 'canonical', 'patches',
  # 'batched_matmul', 'batched_shifted' (models/layers.py).

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


def _choices() -> dict:
  """The valid names of each choice field (the registries' as they are now)."""
  return {
    "algorithm": registry.ALGORITHMS.names(),
    "update_mode": choices.UPDATE_MODES,
    "logit_step": choices.LOGIT_STEPS,
    "model.name": registry.MODELS.names(),
    "model.conv_impl": choices.CONV_IMPLS,
    "client_parallelism": choices.CLIENT_PARALLELISMS,
    "replica_parallelism": choices.REPLICA_PARALLELISMS,
    "local_batching": choices.LOCAL_BATCHINGS,
    "perfedavg_variant": choices.PERFEDAVG_VARIANTS,
    "local_loop": choices.LOCAL_LOOP_CHOICES,
    "compute_dtype": choices.COMPUTE_DTYPES,
    "command_buffers": tuple(choices.COMMAND_BUFFERS),
  }


_POSITIVE = (
  "num_global_models",
  "num_rounds",
  "local_epochs",
  "batch_size",
  "eval_every",
  "checkpoint_keep",
  "local_unroll",
  "pfedme_inner_steps",
  "fedfomo_downloads",
  "fedamp_alpha",
  "fedamp_sigma",
  "cfl_max_clusters",
)
_NON_NEGATIVE = (
  "clients_per_round",
  "client_chunk_size",
  "eval_chunk_size",
  "eval_batch_size",
  "num_devices",
  "prox_mu",
  "client_lr",
  "checkpoint_every",
  "checkpoint_every_minutes",
  "finetune_epochs",
  "ditto_lambda",
  "fedrep_head_epochs",
  "perfedavg_alpha",
  "pfedme_lambda",
  "pfedme_personal_lr",
  "pfedme_beta",
  "pfedme_l2",
  "fedfomo_epsilon",
  "fedfomo_epsilon_decay",
  "fedamp_lambda",
  "cfl_eps1",
  "cfl_eps2",
  "cfl_warmup_rounds",
  "server_lr_globals",
  "server_lr_logits",
)
_FRACTIONS = ("data.test_fraction", "data.val_fraction", "fedfomo_val_fraction")
_UNIT_INTERVAL = ("apfl_alpha",)


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
  close += [
    k
    for k in schema
    if head and k.startswith(head) and k not in close and path.rsplit(".", 1)[1] in k
  ][: 3 - len(close)]
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
  for path in _UNIT_INTERVAL:
    if not 0 <= flat[path] <= 1:
      raise ConfigError(f"Config {path}={flat[path]!r} must be in [0, 1].")
  for path, valid in _choices().items():
    if flat[path] not in valid:
      raise ConfigError(f"Config {path}={flat[path]!r} is not one of {valid}.")


# Datasets split into exactly `data.num_clients` clients by their loaders.
_SPLIT_INTO_NUM_CLIENTS = ("digits_groups", "cifar100_cluster", "cifar100_personal")


def data_warnings(config, num_clients: int, data_name: str = "") -> list:
  """What in a resolved `config` the loaded data cannot honour, naming both numbers.

  Warnings, not errors: the run still works (every round trains every client).
  """
  found = []
  if config.clients_per_round > num_clients:
    found.append(
      f"config.clients_per_round={config.clients_per_round} but the dataset has only "
      f"{num_clients} clients: every round trains all {num_clients}."
    )
  if (
    data_name == config.data.name
    and data_name in _SPLIT_INTO_NUM_CLIENTS
    and num_clients < config.data.num_clients
  ):
    found.append(
      f"config.data.num_clients={config.data.num_clients} but the dataset "
      f"{data_name} has only {num_clients} clients."
    )
  return found
