"""Where a run's evaluations go: metrics.jsonl, TensorBoard events and clients.npz.

Every writer takes the round a resumed run restarts from, and drops what a previous
session wrote after it, so a resumed run's files read as if it had never stopped.
"""

import json
import os
from typing import Dict, Optional

import numpy as np
from tensorboardX import SummaryWriter


def write_atomically(path: str, write) -> None:
  """Calls `write(file)` on a temporary file, then renames it over `path` (never half-written)."""
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list:
  """The complete lines of a JSON-lines file as dicts; a torn last line (a kill mid-write) is
  left out."""
  found = []
  with open(path) as f:
    for line in f:
      if not line.endswith("\n"):
        break  # Never finished: the line's writer died before its newline.
      if line.strip():
        found.append(json.loads(line))
  return found


class JsonlWriter:
  """Appends one JSON object per evaluation to <workdir>/metrics.jsonl.

  Resuming keeps the complete lines up to the resumed round (written atomically); a line
  whose write fails (a full disk) is cut off again, so the file never holds a partial line.
  """

  def __init__(self, workdir: str, resume_round: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if resume_round and os.path.exists(self.path):
      kept = [m for m in read_jsonl(self.path) if m["round"] <= resume_round]
    write_atomically(
      self.path, lambda f: f.write("".join(json.dumps(m) + "\n" for m in kept).encode())
    )

  def write(self, metrics: Dict[str, float]) -> None:
    line = (json.dumps(metrics) + "\n").encode()
    with open(self.path, "ab", buffering=0) as f:
      size = f.tell()
      try:
        while line:
          line = line[f.write(line) :]
      except OSError:
        f.truncate(size)
        raise


class TensorBoardWriter:
  """Scalars, per-client accuracy histograms and the merging weights as TensorBoard events."""

  def __init__(self, workdir: str, resume_round: int = 0):
    # purge_step hides events a killed session wrote after the checkpoint it resumes from.
    self._writer = SummaryWriter(
      workdir, purge_step=resume_round + 1 if resume_round else None, flush_secs=30
    )

  def write(
    self,
    round_index: int,
    scalars: Dict[str, float],
    per_client: Dict[str, np.ndarray],
    merging_weights: Optional[np.ndarray],
  ) -> None:
    for name, value in scalars.items():
      if name != "round":
        self._writer.add_scalar(name, value, round_index)
    for name, values in per_client.items():
      values = values[np.isfinite(values)]
      if values.size:
        self._writer.add_histogram(name, values, round_index)
    if merging_weights is not None:
      for k in range(merging_weights.shape[1]):
        self._writer.add_histogram(f"merging_weights/model_{k}", merging_weights[:, k], round_index)
      self._writer.add_image(
        "merging_weights/clients_x_models", merging_weights.T, round_index, dataformats="HW"
      )
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def write_clients_npz(
  workdir: str,
  round_index: int,
  client_ids,
  per_client: Dict[str, np.ndarray],
  merging_weights: Optional[np.ndarray],
  groups: Optional[np.ndarray],
) -> None:
  """The latest evaluation's per-client arrays, for `fedmerge_jax.plot`.

  Keys: round, client_ids, <split>_acc (e.g. test_acc), and merging_weights [N, K] and
  groups [N] where known.
  """
  arrays = {"round": np.asarray(round_index), "client_ids": np.asarray(client_ids, dtype=str)}
  arrays.update({name.removeprefix("clients/"): value for name, value in per_client.items()})
  if merging_weights is not None:
    arrays["merging_weights"] = merging_weights
  if groups is not None:
    arrays["groups"] = np.asarray(groups)
  write_atomically(os.path.join(workdir, "clients.npz"), lambda f: np.savez(f, **arrays))
