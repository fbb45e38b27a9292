"""The NaN guard: a round whose loss or new state is not finite gives back the state it got.

It keeps, for the restore, only what a round may change: the round's clients' rows of the
per-client leaves the algorithm names (`Algorithm.client_rows`), every other leaf whole.
So the round's scatter into its donated state stays in place, and the guard's cost is
O(clients a round x model size), not O(population x model size).
"""

import jax
import jax.numpy as jnp


def all_finite(tree) -> jax.Array:
  """Whether every float of every inexact leaf of `tree` is finite (a scalar bool)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return (
    jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)
  )


def keep_finite(round_fn, client_rows=None):
  """The round, except that a non-finite loss or state returns the state it was given.

  So the state after a failed round is the last good one: it can be checkpointed even
  though the round donated its input. metrics['finite'] says which happened.
  `client_rows(state)`: a pytree of bools shaped like the state, True on the leaves whose
  rows are clients and which a round changes only at its `client_ids` rows; those rows
  alone are saved, checked and restored. None: every leaf whole.
  """

  def guarded(state, client_ids, data, rng):
    leaves, treedef = jax.tree.flatten(state)
    by_rows = (
      jax.tree.leaves(client_rows(state)) if client_rows is not None else [False] * len(leaves)
    )
    if len(by_rows) != len(leaves):
      raise ValueError(
        f"client_rows gave {len(by_rows)} flags for a state of {len(leaves)} "
        "leaves; it must return one bool per leaf (a tree shaped like the state)."
      )
    rows = lambda leaf, flag: leaf[client_ids] if flag else leaf
    old = [rows(leaf, flag) for leaf, flag in zip(leaves, by_rows)]
    new_state, metrics = round_fn(state, client_ids, data, rng)
    new_leaves = treedef.flatten_up_to(new_state)
    new = [rows(leaf, flag) for leaf, flag in zip(new_leaves, by_rows)]
    finite = jnp.isfinite(metrics["train/loss"]) & all_finite(new)

    def keep(leaf, flag, new_part, old_part):
      kept = jnp.where(finite, new_part, old_part)
      return leaf.at[client_ids].set(kept) if flag else kept

    kept = map(keep, new_leaves, by_rows, new, old)
    return jax.tree.unflatten(treedef, list(kept)), dict(metrics, finite=finite)

  return guarded
