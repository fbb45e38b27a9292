"""What a workdir holds: the experiment's result-changing config, its data and its model.

`<workdir>/experiment.json` is written when a run starts in an empty workdir. A later run
there must be the same experiment, else it stops before any work with one line naming what
differs (`ExperimentMismatch`): resuming would splice two experiments, and a finished run's
files would be relabelled. Only settings that cannot change results may differ (more rounds,
checkpoint cadence, chunking, devices, where the data is read from).
"""

import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import config as config_lib

FILE = "experiment.json"
# Config fields that never change a round's results; everything else identifies the run.
NOT_RESULT_CHANGING = (
  "num_rounds",
  "checkpoint_every",
  "checkpoint_every_minutes",
  "checkpoint_keep",
  "tensorboard",
  "client_chunk_size",
  "client_parallelism",
  "replica_parallelism",
  "num_devices",
  "data.data_dir",
  # How clients and convolutions execute: same results (tested equal).
  "local_loop",
  "local_unroll",
  "command_buffers",
  "model.conv_impl",
  "eval_chunk_size",
  "eval_batch_size",
)
# A run's own files in its workdir, removed when it starts over there.
RUN_FILES = (
  "metrics.jsonl",
  "summary.json",
  "clients.npz",
  "config.json",
  FILE,
  "accuracy.png",
  "client_accuracy.png",
  "merging_weights.png",
  "gap.png",
)
SAMPLED_ROWS = 4096  # Rows of x hashed per split: the labels and counts are hashed in full.


class ExperimentMismatch(config_lib.ConfigError):
  """The workdir holds another experiment: the message names what differs and the choices."""


def config_fingerprint(config) -> Dict[str, Any]:
  """The resolved config's fields that change results, flattened (JSON values)."""
  flat = dict(config_lib.flatten(json.loads(config.to_json())))
  return {k: v for k, v in flat.items() if k not in NOT_RESULT_CHANGING}


def _digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def data_fingerprint(data) -> Dict[str, Any]:
  """Clients, counts, shapes, dtypes, the input transform (its repr; None: absent, as in
  workdirs from before transforms) and a hash of each split (labels in full, x sampled)."""
  transform = data.input_transform
  found = {
    "name": data.name,
    "clients": data.num_clients,
    "classes": data.num_classes,
    "example_shape": list(data.example_shape),
    "client_ids": _digest(np.asarray(data.client_ids, dtype=str)),
    "input_transform": None if transform is None else repr(transform),
  }
  for split in ("train", "test", "val"):
    arrays = getattr(data, split)
    if arrays is None:
      found[split] = None
      continue
    rows = np.unique(
      np.linspace(0, len(arrays.y) - 1, min(len(arrays.y), SAMPLED_ROWS), dtype=np.int64)
    )
    found[split] = {
      "examples": int(len(arrays.y)),
      "x_dtype": str(arrays.x.dtype),
      "counts": _digest(arrays.offsets),
      "labels": _digest(arrays.y),
      "x": _digest(arrays.x[rows]),
    }
  return found


def model_fingerprint(model, example_shape) -> Dict[str, str]:
  """'path' -> 'dtype[shape]' of every variable of the model (one model, not K)."""
  x = jnp.zeros((1, *example_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  flat, _ = jax.tree_util.tree_flatten_with_path(variables)
  return {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}" for path, leaf in flat}


def fingerprint(config, data, model) -> Dict[str, Any]:
  return {
    "config": config_fingerprint(config),
    "data": data_fingerprint(data),
    "model": model_fingerprint(model, data.example_shape),
  }


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flat(value, f"{prefix}{key}.")
  else:
    yield prefix[:-1], tree


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """'data.train.examples: 160 -> 300' for every differing leaf (parts the old lacks skipped)."""
  found = []
  for part in ("config", "data", "model"):
    if part not in old:
      continue  # A workdir from before this part was recorded.
    a, b = dict(_flat(old[part])), dict(_flat(new[part]))
    # A config field added or removed since (a newer version's schema) is not a difference.
    keys = [k for k in a if k in b] if part == "config" else list(dict.fromkeys([*a, *b]))
    for key in keys:
      if a.get(key) != b.get(key):
        shown = key if part == "config" else f"{part}: {key}"
        found.append(f"{shown}: {a.get(key)!r} -> {b.get(key)!r}")
  return found


def recorded(workdir: str) -> Optional[Dict[str, Any]]:
  """The experiment the workdir holds: experiment.json, else (older runs) config.json's
  result-changing fields, else None (nothing there)."""
  path = os.path.join(workdir, FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      flat = dict(config_lib.flatten(json.load(f)))
    return {"config": {k: v for k, v in flat.items() if k not in NOT_RESULT_CHANGING}}
  return None


def mismatch_message(workdir: str, found: List[str]) -> str:
  shown = "; ".join(found[:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else "")
  return (
    f"--workdir={workdir} holds a different experiment ({shown}). Use a new --workdir, "
    "or start over there (deleting its results): --start_over on the command line, "
    "start_over=True in train_and_evaluate."
  )


def check(workdir: str, current: Dict[str, Any]) -> None:
  """ExperimentMismatch unless `workdir` is empty of runs or holds `current`'s experiment.
  `current` may hold only a "config" part (the early check, before data is loaded)."""
  old = recorded(workdir)
  if old is None:
    return
  found = differences({k: v for k, v in old.items() if k in current}, current)
  if found:
    raise ExperimentMismatch(mismatch_message(workdir, found))


def start_over(workdir: str) -> None:
  """Removes a previous run's files and checkpoints from `workdir` (TensorBoard events too)."""
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
    if name in RUN_FILES or name.startswith("events.out.tfevents."):
      os.remove(os.path.join(workdir, name))
