"""A progress bar over rounds (round, rounds/s, ETA, latest accuracy), silent off a terminal.

tqdm draws it on stderr only when stderr is a terminal (or a notebook); logs and CI
output get the per-evaluation lines alone. `TQDM_DISABLE=1` turns it off everywhere.
"""

import sys
from typing import Dict

from tqdm.auto import tqdm


class Progress:
  """Rounds done so far out of `num_rounds`, starting at `start_round` when resumed.

  `enabled=False` (the other processes of a multi-host run) prints nothing at all.
  """

  def __init__(self, num_rounds: int, start_round: int = 0, enabled: bool = True):
    self._enabled = enabled
    self._bar = tqdm(
      total=num_rounds,
      initial=start_round,
      unit="round",
      dynamic_ncols=True,
      disable=None if enabled else True,
      file=sys.stderr,
    )

  def advance(self) -> None:
    self._bar.update(1)

  def show(self, metrics: Dict[str, float]) -> None:
    """Puts the latest evaluation's accuracy in the bar."""
    if "test/acc_mean" in metrics:
      self._bar.set_postfix(acc=f"{metrics['test/acc_mean']:.4f}", refresh=False)

  def print(self, line: str) -> None:
    """Prints a line to stdout without breaking the bar."""
    if not self._enabled:
      return
    if self._bar.disable:
      print(line, flush=True)
    else:
      self._bar.write(line, file=sys.stdout)

  def close(self) -> None:
    self._bar.close()
