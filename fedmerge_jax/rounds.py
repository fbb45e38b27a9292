"""The round loop's device side: rounds dispatched with the host working one round ahead.

`Rounds.run(r)` dispatches round r on data gathered and sent to the devices while round
r - 1 ran (`jax.device_put` is asynchronous), then gathers round r + 1's, then reads round
r - 1's finite flag (round r is queued by then, so the devices stay busy). The clients come
from `sampling.ClientSchedule`, drawn ahead. `confirm()` reads every unread flag: the loop
calls it where the host needs the state anyway (evaluations, checkpoints, stops).

A round dispatched before its predecessor's flag was read is told that flag (the round's
`rng` argument is `(key, healthy)`): after a non-finite round it changes nothing, so the
state stays the last good round's until the failure is read, as the NaN guard keeps it.
"""

from typing import Callable, List, NamedTuple, Optional

import jax
import numpy as np

from fedmerge_jax import parallel


class Failure(NamedTuple):
  """A round whose loss or state was not finite."""

  round: int
  ids: np.ndarray  # Its real client ids, in the round's order.
  metrics: dict  # Its round metrics ('clients/train_loss' names the clients).


def on_devices(tree, sharding):
  """`tree`'s host arrays sent to `sharding` now (asynchronously); device arrays stay put."""
  return jax.tree.map(
    lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, sharding), tree
  )


class Rounds:
  """The state and the rounds run on it, flags read late (see the module docstring).

  `round_fn(state, sharded_ids, data, (key, healthy))`: the jitted, NaN-guarded round.
  `gather(ids, test_arrays)`: parallel.RoundGatherer. `clients(r)`: round r's sampled ids.
  `with_test(r)`: whether round r's data carries the test split (evaluation rounds).
  """

  def __init__(
    self,
    round_fn,
    gather,
    clients: Callable[[int], np.ndarray],
    round_rng,
    state,
    start_round: int,
    last_round: int,
    with_test: Callable[[int], bool],
    test_arrays,
    mesh,
  ):
    self.round_fn, self.gather, self.clients, self.round_rng = round_fn, gather, clients, round_rng
    self.with_test, self.test_arrays, self.last_round = with_test, test_arrays, last_round
    self.sharding = parallel.client_sharding(mesh)
    self.state = state
    self.state_round = start_round  # The round whose output `state` is.
    self.good_round = start_round  # The newest round whose flag was read, finite.
    # The last dispatched round's flag (unread); laid out as the round's outputs are, so that
    # round 2 (given round 1's flag) reuses round 1's program instead of compiling another.
    self._healthy = jax.device_put(np.bool_(True), parallel.replicated(mesh))
    self._pending: List[tuple] = []  # (round, ids, metrics) dispatched, flag unread.
    self._ahead = None  # (round, ids, sharded ids, data) gathered and sent, not yet run.
    self.latest = None  # (ids, metrics) of the last dispatched round.

  def _prepare(self, r: int):
    ids, sharded_ids, data = self.gather(
      self.clients(r), self.test_arrays if self.with_test(r) else None
    )
    return r, ids, on_devices(sharded_ids, self.sharding), on_devices(data, self.sharding)

  def run(self, r: int) -> Optional[Failure]:
    """Dispatches round r; returns the failure of a round before it, found now, or None."""
    ahead, self._ahead = self._ahead, None
    _, ids, sharded_ids, data = ahead if ahead and ahead[0] == r else self._prepare(r)
    key = jax.random.fold_in(self.round_rng, r)
    self.state, metrics = self.round_fn(self.state, sharded_ids, data, (key, self._healthy))
    self.state_round, self._healthy = r, metrics["finite"]
    self._pending.append((r, ids, metrics))
    self.latest = ids, metrics
    if r < self.last_round:
      self._ahead = self._prepare(r + 1)  # While round r runs.
    return self.confirm(before=r)

  def confirm(self, before: Optional[int] = None) -> Optional[Failure]:
    """Reads the unread flags (of rounds before `before` only, where given), oldest first.

    None if they were all finite. Else the first non-finite round's Failure; the state is
    then the one after the round before it (`state_round` says so), and no flag is pending.
    """
    while self._pending and (before is None or self._pending[0][0] < before):
      r, ids, metrics = self._pending[0]
      finite = bool(metrics["finite"])  # Raises where the round itself failed: kept pending.
      self._pending.pop(0)
      if not finite:
        self._pending.clear()
        self._ahead, self.state_round = None, self.good_round
        return Failure(r, ids, metrics)
      self.good_round = r
    return None

  def known_good(self) -> Optional[int]:
    """The round whose output `state` is, where every flag up to it was read (else None)."""
    return None if self._pending else self.state_round
