"""Name -> builder tables that users extend (models, algorithms), with one checked `add`."""

from typing import Callable, Dict, Sequence


def add(table: Dict[str, Callable], builtins: Sequence[str], name: str, builder: Callable,
        what: str, signature: str) -> None:
  """Puts `builder` under `name` in `table` (replacing a user's earlier one).

  ValueError, naming the fix, for a non-string or empty name, a built-in name, or a
  builder that is not callable. `what` ('model', 'algorithm') and `signature` word it.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_{what}: the name must be a non-empty string, not {name!r}.")
  if name in builtins:
    raise ValueError(f"register_{what}: {name!r} is a built-in {what}; pick another name.")
  if not callable(builder):
    raise ValueError(f"register_{what}({name!r}, ...): the second argument must be callable "
                     f"{signature}.")
  table[name] = builder
