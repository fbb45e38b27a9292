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
  # Static: some rounds attach empty test parts (a replica group's training rounds, which so
  # run the evaluation rounds' program); the gap's probe then skips clients without examples
  # (gap.unless_empty). Elsewhere it runs inline: the loop around it moves XLA's fusion of
  # the round enough to change results in the last bit (uint8 inputs, tests/test_memory.py).
  skips_empty: bool = flax.struct.field(pytree_node=False, default=False)

  def __getattr__(self, name):
    if name in ("train", "test") or name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.train, name)
