"""FEMNIST as LEAF's preprocessing writes it: `train/*.json` and `test/*.json` in `data.data_dir`.

LEAF (github.com/TalwalkarLab/leaf, `data/femnist/preprocess.sh`) writes files
`{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y":
[ints]}}}`. Its pixels are gray / 255, so the background (white paper) is ~1; we use
`1 - x` (background 0), as the FedJAX loader does, stored like it (uint8 on the way,
float16 in [0, 1] in memory). Labels are LEAF's 0-9 digits, 10-35 upper, 36-61 lower case,
the same as FedJAX's. Personalised FL evaluates each writer on its own test examples, so
split the data by sample (`-t sample`), not by user.
"""

import glob
import json
import os
from typing import Dict

import numpy as np

from fedmerge_jax.data.federated import FederatedData
from fedmerge_jax.data.femnist import DataError, IMAGE_SHAPE, Writers, to_federated, to_uint8

NUM_CLASSES = 62
HOW_TO_GET = (
  "Get it with LEAF: git clone https://github.com/TalwalkarLab/leaf && cd "
  "leaf/data/femnist && ./preprocess.sh -s niid --sf 1.0 -k 0 -t sample, then pass "
  "--config.data.data_dir=leaf/data/femnist/data (the folder holding train/ and "
  "test/)."
)


def read_json_dir(directory: str) -> Writers:
  """All writers in `directory/*.json` -> {writer: (uint8 images [N, 28, 28], labels [N])}."""
  files = sorted(glob.glob(os.path.join(directory, "*.json")))
  if not files:
    raise DataError(f"No LEAF JSON files in {directory}. {HOW_TO_GET}")
  writers: Writers = {}
  seen: Dict[str, str] = {}
  for path in files:
    try:
      with open(path) as f:
        blob = json.load(f)
      user_data = blob["user_data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(
        f"{path} is not a LEAF JSON file ({type(e).__name__}: {e}); delete it "
        f"and re-run LEAF's preprocess.sh. {HOW_TO_GET}"
      ) from e
    for user, examples in user_data.items():
      if user in seen:
        raise DataError(
          f"Writer {user!r} is in both {seen[user]} and {path}: {directory} "
          "mixes outputs of several preprocess.sh runs; keep one run's files."
        )
      seen[user] = path
      try:
        x = np.asarray(examples["x"], np.float32).reshape(-1, *IMAGE_SHAPE)
        y = np.asarray(examples["y"], np.int64)
        if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES)):
          raise ValueError(f"{len(x)} images, {len(y)} labels in [0, {NUM_CLASSES})?")
      except (KeyError, TypeError, ValueError) as e:
        raise DataError(
          f"{path}: writer {user!r} has malformed data ({e}); delete the file "
          f"and re-run LEAF's preprocess.sh."
        ) from e
      writers[user] = (to_uint8(x), y.astype(np.int32))
  return writers


def _digits_only(writers: Writers) -> Writers:
  keep = {cid: (x[y < 10], y[y < 10]) for cid, (x, y) in writers.items()}
  return {cid: xy for cid, xy in keep.items() if len(xy[1])}


def load(data_config) -> FederatedData:
  """LEAF FEMNIST from `data_config.data_dir` (train/ and test/ of JSON files)."""
  root = os.path.expanduser(data_config.data_dir)
  if not root:
    raise DataError(
      f"data.name='leaf_femnist' reads local files: set --config.data.data_dir. {HOW_TO_GET}"
    )
  splits = {}
  for split in ("train", "test"):
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
      raise DataError(f"{directory} does not exist. {HOW_TO_GET}")
    splits[split] = read_json_dir(directory)
  train, test = splits["train"], splits["test"]
  if data_config.only_digits:
    train = _digits_only(train)
    test = {cid: xy for cid, xy in _digits_only(test).items() if cid in train}
  if test and not set(test) & set(train):
    raise DataError(
      f"No writer of {root}/test is in {root}/train: the data was split by user "
      "(-t user). Each client needs its own test examples: re-run preprocess.sh "
      "with -t sample."
    )
  return to_federated(
    train,
    test,
    10 if data_config.only_digits else NUM_CLASSES,
    data_config,
    "leaf_femnist_digits" if data_config.only_digits else "leaf_femnist",
  )
