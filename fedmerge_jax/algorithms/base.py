"""The shape every algorithm has: init(rng) -> state; round(...) -> (state, metrics)."""

from typing import Any, Callable, NamedTuple


class Algorithm(NamedTuple):
  """Pure functions over an algorithm's state; `train.py` jits and drives them.

  init(rng) -> state.
  round(state, client_ids [C], data: ClientData with leading axis C, rng) -> (state, metrics);
    metrics are scalars named 'train/...', plus per-client arrays named 'clients/...'.
  personalized(state, client_ids [C]) -> the C clients' model variables, leading axis C.
  """
  init: Callable[..., Any]
  round: Callable[..., Any]
  personalized: Callable[..., Any]
