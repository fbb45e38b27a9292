"""Name -> builder tables that users extend (models, algorithms), with one checked `add`.

JAX-free and below everything: `config` checks names against these tables before JAX is
imported; the packages that build (`models`, `algorithms`) fill in their built-ins.
"""

from typing import Callable, Dict, Tuple

BUILTIN_MODELS = ("mlp", "emnist_cnn", "leaf_femnist_cnn", "resnet9")
BUILTIN_ALGORITHMS = (
  "fedmerge",
  "fedavg",
  "fedprox",
  "fedavg_ft",
  "local",
  "ditto",
  "ifca",
  "fedem",
  "fedbn",
  "fedper",
  "fedrep",
  "apfl",
  "perfedavg",
  "pfedme",
  "fedfomo",
  "fedamp",
  "cfl",
)


class Table:
  """The builders `config.<field>` chooses from: the built-ins, then the users' (`add`).

  `what` ('model'), `field` ('model.name'), `package` ('models') and `signature` word the
  messages. The built-in names are known here; their builders arrive with their package.
  """

  def __init__(
    self, what: str, field: str, package: str, builtins: Tuple[str, ...], signature: str
  ):
    self.what, self.field, self.package, self.signature = what, field, package, signature
    self.builtins = builtins
    self.builders: Dict[str, Callable] = {}

  def add_builtins(self, builders: Dict[str, Callable]) -> None:
    """The package's built-in builders, exactly the names this table was given."""
    if tuple(builders) != self.builtins:
      raise AssertionError(
        f"registry.{self.what}s: built-ins {tuple(builders)} are not "
        f"{self.builtins}; keep registry.py's names and the package's in step."
      )
    self.builders.update(builders)

  def names(self) -> Tuple[str, ...]:
    """Every name the field accepts now: the built-ins, then registered ones."""
    return self.builtins + tuple(n for n in self.builders if n not in self.builtins)

  def add(self, name: str, builder: Callable) -> None:
    """Puts `builder` under `name` (replacing a user's earlier one).

    ValueError, naming the fix, for a non-string or empty name, a built-in name, or a
    builder that is not callable.
    """
    what = self.what
    if not isinstance(name, str) or not name:
      raise ValueError(f"register_{what}: the name must be a non-empty string, not {name!r}.")
    if name in self.builtins:
      raise ValueError(f"register_{what}: {name!r} is a built-in {what}; pick another name.")
    if not callable(builder):
      raise ValueError(
        f"register_{what}({name!r}, ...): the second argument must be callable {self.signature}."
      )
    self.builders[name] = builder

  def get(self, name: str) -> Callable:
    """The builder under `name`; ValueError listing the names otherwise."""
    if name not in self.builders:
      raise ValueError(
        f"{self.field}={name!r} is unknown; choose one of {self.names()} (or "
        f"register yours: {self.package}.register_{self.what})."
      )
    return self.builders[name]


MODELS = Table(
  "model",
  "model.name",
  "models",
  BUILTIN_MODELS,
  "(model_config, num_classes) -> flax.linen.Module",
)
ALGORITHMS = Table(
  "algorithm",
  "algorithm",
  "algorithms",
  BUILTIN_ALGORITHMS,
  "(model, config, num_clients, example_input) -> Algorithm",
)
