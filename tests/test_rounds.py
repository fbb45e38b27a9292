"""The host works ahead of the devices: clients sampled ahead (sampling.ClientSchedule), the
next round gathered while one runs, finite flags read late (rounds.Rounds) with the state
still kept finite."""

import jax
import numpy as np
import pytest

from conftest import make_federation, tiny_base_config
from fedmerge_jax import config as config_lib
from fedmerge_jax import parallel
from fedmerge_jax import rounds as rounds_lib
from fedmerge_jax import sampling
from fedmerge_jax import train


def reference_ids(sample_rng, round_index, num_clients, clients_per_round):
  """Today's draw, one round at a time, with plain jax.random (an independent reference)."""
  ids = jax.random.choice(
    jax.random.fold_in(sample_rng, round_index), num_clients, (clients_per_round,), replace=False
  )
  return np.sort(np.asarray(ids))


def test_clients_sampled_ahead_are_todays_id_for_id_across_blocks_and_a_resume():
  sample_rng = jax.random.wrap_key_data(
    jax.random.key_data(jax.random.split(jax.random.key(3), 2))
  )[0]
  whole = sampling.ClientSchedule(sample_rng, 23, 5, ahead=4)
  got = {r: whole(r) for r in range(1, 15)}
  resumed = sampling.ClientSchedule(sample_rng, 23, 5, ahead=4)  # A run resumed at round 6.
  got_resumed = {r: resumed(r) for r in range(7, 15)}
  for r in range(1, 15):
    np.testing.assert_array_equal(got[r], reference_ids(sample_rng, r, 23, 5), err_msg=str(r))
  for r in range(7, 15):
    np.testing.assert_array_equal(got_resumed[r], got[r])
  everyone = sampling.ClientSchedule(sample_rng, 4, 0)
  np.testing.assert_array_equal(everyone(9), np.arange(4))


def test_a_stack_of_keys_draws_each_keys_own_schedule():
  """A replica group's schedule (one key per replica): row i is key i's run's clients."""
  keys = jax.random.split(jax.random.key(5), 3)
  group = sampling.ClientSchedule(keys, 23, 5, ahead=4)
  for r in (1, 4, 5, 11):
    got = group(r)
    assert got.shape == (3, 5)
    for i in range(3):
      np.testing.assert_array_equal(got[i], reference_ids(keys[i], r, 23, 5), err_msg=f"{r} {i}")
  assert len({tuple(row) for row in group(2)}) == 3  # Not one replica's clients for all.
  np.testing.assert_array_equal(
    sampling.ClientSchedule(keys, 4, 0)(9), np.broadcast_to(np.arange(4), (3, 4))
  )


class Flag:
  """A finite flag that records when the host reads it."""

  def __init__(self, log, round_index, value=True):
    self.log, self.round, self.value = log, round_index, value

  def __bool__(self):
    self.log.append(("flag", self.round))
    return self.value


def scripted_rounds(log, failing=()):
  """Rounds over a fake round and gatherer that log what the host does, in order."""

  def round_fn(state, ids, data, rng):
    r = state + 1
    log.append(("round", r))
    return r, {"finite": Flag(log, r, r not in failing)}

  def gather(ids, test):
    return ids, np.asarray(ids, np.int32), np.zeros((len(ids), 1), np.float32)

  def clients(r):
    log.append(("gather", r))
    return np.arange(3)

  return rounds_lib.Rounds(
    round_fn,
    gather,
    clients,
    jax.random.key(0),
    0,
    0,
    10,
    lambda r: False,
    None,
    parallel.make_mesh(1),
  )


def test_a_round_is_dispatched_before_its_flag_is_read_and_the_next_gathered_meanwhile():
  log = []
  rounds = scripted_rounds(log)
  for r in (1, 2, 3):
    assert rounds.run(r) is None
  assert log == [
    ("gather", 1),
    ("round", 1),
    ("gather", 2),
    ("round", 2),
    ("gather", 3),
    ("flag", 1),
    ("round", 3),
    ("gather", 4),
    ("flag", 2),
  ]
  assert rounds.known_good() is None  # Round 3's flag is unread.
  assert rounds.confirm() is None and log[-1] == ("flag", 3) and rounds.known_good() == 3


def test_a_failed_round_is_reported_once_its_flag_is_read():
  log = []
  rounds = scripted_rounds(log, failing=(2,))
  assert rounds.run(1) is None and rounds.run(2) is None
  failure = rounds.run(3)
  assert failure.round == 2 and list(failure.ids) == [0, 1, 2]
  assert rounds.state_round == 1 and rounds.known_good() == 1  # The guard kept round 1's.
  assert rounds.confirm() is None  # Nothing pending after a failure.


@pytest.fixture(scope="module")
def fedavg_round():
  """A tiny FedAvg run's pieces: config, data, layout, algorithm, compiled round."""
  config = config_lib.resolve(tiny_base_config())
  config.algorithm, config.clients_per_round = "fedavg", 3
  data = make_federation()
  mesh = parallel.make_mesh(1)
  layout = parallel.client_layout(1, data.num_clients, 3, 0)
  _, algorithm = train.build(config, data, layout)
  state, shardings = parallel.sharded_init(
    algorithm.init, mesh, layout.population, jax.random.key(0)
  )
  return (
    config,
    data,
    mesh,
    layout,
    algorithm,
    train.compile_round(algorithm, config, mesh, shardings),
  )


def run_rounds(fedavg_round, num_rounds, poisoned=None):
  """The state and Rounds after dispatching rounds 1..num_rounds (round `poisoned`'s data NaN)."""
  config, data, mesh, layout, algorithm, round_fn = fedavg_round
  gatherer = parallel.RoundGatherer(data.train, layout, mesh, config.batch_size)

  def gather(ids, test):
    ids, sharded_ids, batch = gatherer(ids, test)
    return ids, sharded_ids, batch._replace(x=batch.x * np.nan) if poisoned == len(calls) else batch

  calls = []
  clients = lambda r: (
    calls.append(r)
    or sampling.sample_clients(jax.random.fold_in(jax.random.key(1), r), data.num_clients, 3)
  )
  state, _ = parallel.sharded_init(algorithm.init, mesh, layout.population, jax.random.key(0))
  rounds = rounds_lib.Rounds(
    round_fn, gather, clients, jax.random.key(2), state, 0, 10, lambda r: False, None, mesh
  )
  for r in range(1, num_rounds + 1):
    failure = rounds.run(r)
    if failure:
      return rounds, (r, failure)
  return rounds, (None, rounds.confirm())


def test_every_training_round_runs_one_compiled_program(fedavg_round):
  """Round 1 (given the host's 'healthy' flag) and the rounds after it (given the previous
  round's flag, a device output) share one program: no second compile of the round."""
  round_fn = fedavg_round[-1]
  run_rounds(fedavg_round, 3)
  assert round_fn._cache_size() == 1  # pylint: disable=protected-access


def test_rounds_after_a_non_finite_one_leave_the_last_good_state(fedavg_round):
  reference, (_, none) = run_rounds(fedavg_round, 2)
  assert none is None
  rounds, (found_at, failure) = run_rounds(fedavg_round, 5, poisoned=3)
  assert (found_at, failure.round) == (4, 3)  # Read one round late, round 4 already run.
  assert rounds.state_round == 2
  for got, expected in zip(jax.tree.leaves(rounds.state), jax.tree.leaves(reference.state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
