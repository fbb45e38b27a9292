"""Which clients train in each round: drawn from the run's key, many rounds at a time.

Round r trains `sample_clients(fold_in(sample_rng, r), N, C)`. `ClientSchedule` draws the
same ids for a block of rounds in one device call, and starts the next block's draw while
the current one is used, so the round loop never waits on the device for its clients;
a resumed run draws the same ids (they depend on the key and the round only).
"""

import jax
import numpy as np

AHEAD = 128  # Rounds drawn per device call.


def sample_clients(rng, num_clients: int, clients_per_round: int) -> np.ndarray:
  """`clients_per_round` distinct clients (all if 0), sorted, from a key."""
  if clients_per_round <= 0 or clients_per_round >= num_clients:
    return np.arange(num_clients)
  ids = jax.random.choice(rng, num_clients, (clients_per_round,), replace=False)
  return np.sort(np.asarray(ids))


class ClientSchedule:
  """`schedule(r)`: round r's clients, as `sample_clients(fold_in(sample_rng, r), ...)`.

  Rounds are drawn `ahead` at a time (rounds k*ahead+1 .. (k+1)*ahead in one vmapped call);
  reaching a block dispatches the next one's draw, which runs while this block is used.
  `sample_rng` may be a stack of keys [R] (a replica group's, replicas.py): `schedule(r)` is
  then [R, C], row i the schedule of key i, all drawn in the same calls.
  """

  def __init__(self, sample_rng, num_clients: int, clients_per_round: int, ahead: int = AHEAD):
    self.num_clients, self.clients_per_round, self.ahead = num_clients, clients_per_round, ahead
    self.everyone = not 0 < clients_per_round < num_clients
    self.keys = sample_rng
    draw = lambda key, r: jax.random.choice(
      jax.random.fold_in(key, r), num_clients, (clients_per_round,), replace=False
    )
    draw_rounds = jax.vmap(draw, in_axes=(None, 0))
    if sample_rng.ndim:  # A stack of keys: [R, ahead, C].
      draw_rounds = jax.vmap(draw_rounds, in_axes=(0, None))
    self._draw = jax.jit(draw_rounds)
    self._blocks = {}  # Block index -> its [(R,) ahead, C] ids (a device array until first read).

  def _dispatch(self, block: int):
    if block not in self._blocks:
      first = block * self.ahead + 1
      self._blocks[block] = self._draw(
        self.keys, np.arange(first, first + self.ahead, dtype=np.uint32)
      )

  def __call__(self, round_index: int) -> np.ndarray:
    if self.everyone:
      return np.tile(np.arange(self.num_clients), self.keys.shape + (1,))
    block = (round_index - 1) // self.ahead
    self._dispatch(block)
    self._dispatch(block + 1)  # Drawn on the device while this block is used.
    for old in [b for b in self._blocks if b < block]:
      del self._blocks[old]
    rows = self._blocks[block] = np.asarray(self._blocks[block])
    return np.sort(rows[..., (round_index - 1) % self.ahead, :], axis=-1)
