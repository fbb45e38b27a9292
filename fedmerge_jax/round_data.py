"""The data a round's clients get on evaluation rounds: training data with the test split
attached (the local-global gap, gap.py, scores the just-trained model on it).

Its own module below `parallel` (which gathers it) and `gap` (which reads it), so neither
imports the other for it.
"""

import flax

from fedmerge_jax.client import ClientData


@flax.struct.dataclass
class WithTest:
  """A round's client data (`train`, read through as its attributes) with each client's test
  split."""

  train: ClientData
  test: ClientData

  def __getattr__(self, name):
    if name in ("train", "test") or name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.train, name)
