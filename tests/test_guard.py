"""The NaN guard keeps only the round's rows: memory flat in the population, state restored."""

import jax
import numpy as np
import pytest

from conftest import make_federation, tiny_base_config
from fedmerge_jax import algorithms, guard, parallel, train
from fedmerge_jax.config import resolve

SAMPLED = np.array([1, 5, 9, 13])


def _guarded_round(algorithm, num_clients, **overrides):
  """(algorithm, its NaN-guarded jitted round as train.py compiles it, data, config)."""
  config = tiny_base_config()
  config.algorithm, config.clients_per_round = algorithm, len(SAMPLED)
  config.update_from_flattened_dict(overrides)
  config = resolve(config)
  data = make_federation(
    num_clients, sizes=[3 + i % 5 for i in range(num_clients)], test_size=1, val_size=0
  )
  _, alg = train.build(config, data)
  return alg, train.compile_round(alg, config), data, config


def _temporaries_and_state_bytes(lowered, state):
  """(temporary bytes of the compiled `lowered` round, bytes of `state`); skips the test
  where the backend gives no memory analysis."""
  analysis = lowered.compile().memory_analysis()
  if analysis is None:
    pytest.skip("No memory analysis on this backend.")
  nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
  return analysis.temp_size_in_bytes, nbytes


@pytest.mark.parametrize("algorithm", ["ditto", "local"])
def test_guarded_round_temporaries_grow_with_the_round_not_the_population(algorithm):
  """A whole-state guard keeps old and new population alive together (N x P temporaries)."""
  temp, state_bytes = {}, {}
  for n in (64, 1024):
    alg, round_fn, data, _ = _guarded_round(algorithm, n, **{"model.hidden_sizes": (128,)})
    state = jax.eval_shape(alg.init, jax.random.key(0))
    lowered = round_fn.lower(state, SAMPLED, data.train.gather(SAMPLED), jax.random.key(1))
    temp[n], state_bytes[n] = _temporaries_and_state_bytes(lowered, state)
  growth = state_bytes[1024] - state_bytes[64]  # ~10 MB of personal models.
  assert abs(temp[1024] - temp[64]) < 0.02 * growth, (temp, state_bytes)


def test_a_non_finite_round_of_per_client_state_stops_with_the_message(tmp_path):
  config = tiny_base_config()
  config.algorithm, config.clients_per_round, config.client_lr = "ditto", 2, 1e30
  with pytest.raises(
    FloatingPointError, match=r"Non-finite training loss at round 1 for clients \["
  ):
    train.train_and_evaluate(config, str(tmp_path), data=make_federation(6))


@pytest.mark.parametrize(
  "algorithm", [a for a in algorithms.ALGORITHM_NAMES if a not in ("fedavg_ft", "fedprox", "ifca")]
)
def test_client_rows_change_only_at_the_rounds_clients_and_a_non_finite_round_keeps_all(algorithm):
  """What `Algorithm.client_rows` promises the guard: rows of unsampled clients stay as they
  were (fedavg_ft, fedprox and ifca share FedAvg's and FedMerge's declaration); and a round
  that goes non-finite (a NaN in a sampled client's data) gives back every leaf as it was."""
  alg, round_fn, data, _ = _guarded_round(algorithm, 16, update_mode="gradient")
  state = alg.init(jax.random.key(0))
  rows = jax.tree.leaves(alg.client_rows(state)) if alg.client_rows is not None else []
  if not any(rows):
    pytest.skip(f"{algorithm}'s guard keeps its whole state (it has no row-wise leaves).")
  leaves, treedef = jax.tree.flatten(state)
  leaves = [
    x + jax.random.uniform(jax.random.key(i), x.shape, x.dtype, 0, 0.1)  # Rows differ.
    if flag and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
    else x
    for i, (flag, x) in enumerate(zip(rows, leaves))
  ]
  before = [np.array(leaf) for leaf in leaves]
  batch = data.train.gather(SAMPLED)
  new, metrics = round_fn(jax.tree.unflatten(treedef, leaves), SAMPLED, batch, jax.random.key(1))
  assert bool(metrics["finite"])
  others = np.setdiff1d(np.arange(16), SAMPLED)
  for flag, got, want in zip(rows, jax.tree.leaves(new), before, strict=True):
    if flag:
      assert parallel.is_per_client(got, 16)
      np.testing.assert_array_equal(np.asarray(got)[others], want[others])

  x = np.array(batch.x)
  x[0, 0] = np.nan  # A NaN pixel: that client's loss, then its models, go non-finite.
  kept, metrics = round_fn(
    jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in before]),
    SAMPLED,
    batch._replace(x=x),
    jax.random.key(1),
  )
  assert not bool(metrics["finite"])
  for got, want in zip(jax.tree.leaves(kept), before, strict=True):
    np.testing.assert_array_equal(got, want)


def test_guard_checks_the_new_rows_even_when_the_loss_is_finite():
  """A round with a finite loss whose new rows hold a NaN: the guard still gives back the state
  (a toy round over {'rows': [N, 2], 'whole': [3]}; N x 2 is declared row-wise)."""

  def toy_round(state, client_ids, data, rng):
    del rng
    rows = state["rows"].at[client_ids].set(state["rows"][client_ids] + data)
    return {"rows": rows, "whole": state["whole"] + 1.0}, {"train/loss": jax.numpy.float32(0.5)}

  guarded = jax.jit(guard.keep_finite(toy_round, lambda state: {"rows": True, "whole": False}))
  state = {"rows": np.arange(12.0).reshape(6, 2), "whole": np.zeros(3)}
  ids = np.array([4, 1])
  new, metrics = guarded(state, ids, np.ones((2, 2)), jax.random.key(0))
  assert bool(metrics["finite"])
  np.testing.assert_array_equal(new["rows"], state["rows"] + np.isin(np.arange(6), ids)[:, None])
  np.testing.assert_array_equal(new["whole"], np.ones(3))
  kept, metrics = guarded(state, ids, np.array([[1.0, 1.0], [np.nan, 1.0]]), jax.random.key(0))
  assert not bool(metrics["finite"])
  jax.tree.map(np.testing.assert_array_equal, kept, state)


@pytest.mark.parametrize("parallelism", ["vmap", "sequential"])
def test_a_replica_groups_guard_also_keeps_only_the_rounds_rows(parallelism):
  """A replica group's round (replicas.make_group_round, values as arguments) guards as a
  separate run's does: vmapped, its temporaries do not grow with the population; one
  replica after another, by one replica's state (the one in the loop), not by all R."""
  from jax.sharding import NamedSharding, PartitionSpec

  from fedmerge_jax import hyperparams, replicas

  temp, state_bytes = {}, {}
  for n in (64, 1024):
    alg, _, data, config = _guarded_round("ditto", n, **{"model.hidden_sizes": (128,)})
    valued = hyperparams.valued(lambda c: train.build(c, data)[1], config)
    values = hyperparams.stacked_values([config, config])
    one = jax.eval_shape(valued.init, (jax.random.key(0), replicas.row(values, 0)))
    states = jax.tree.map(lambda s: jax.ShapeDtypeStruct((2, *s.shape), s.dtype), one)
    spread = NamedSharding(replicas.group_mesh(2), PartitionSpec(replicas.REPLICAS))
    group_round = replicas.make_group_round(valued, config, spread, parallelism)
    layout = parallel.client_layout(1, data.num_clients, len(SAMPLED), 0)
    round_data = replicas.RoundData(data, layout, config.batch_size, spread)  # As groups run.
    _, ids, batch = round_data([SAMPLED, SAMPLED], evaluating=False)
    lowered = group_round.lower(
      states,
      np.ones(2, bool),
      ids,
      batch,
      jax.random.split(jax.random.key(1), 2),
      np.uint32(1),
    )
    temp[n], state_bytes[n] = _temporaries_and_state_bytes(lowered, states)
  growth = state_bytes[1024] - state_bytes[64]  # ~20 MB of two replicas' personal models.
  in_the_loop = 0.5 if parallelism == "sequential" else 0.0  # One of the 2 replicas' states.
  assert abs(temp[1024] - temp[64]) < (in_the_loop + 0.02) * growth, (temp, state_bytes)
