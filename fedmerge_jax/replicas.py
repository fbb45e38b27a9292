"""R runs that share every shape as one jitted program: a leading replica axis on the state.

`train_and_evaluate_many(configs, workdirs, data)` runs configs that differ only in
`hyperparams.VALUE_FIELDS` (seed, learning rates, prox_mu, ...) as one group: their states
stacked on a leading replica axis, one round the algorithm's round mapped over it
(`hyperparams.valued`: the values are arguments, so it compiles once): vmapped, or one
replica after another inside the program for a model with convolutions on CPU
(`resolve_replica_parallelism`). Each replica samples
its own clients, shuffles and drops out with its own seed's keys, exactly as its separate
run (`train.train_and_evaluate`) does. All replicas are evaluated at once (test and val
splits, the gap metric, merging weights: `train.round_evaluator(replicas=True)`, the
separate run's programs vmapped over the replica axis), and each writes its own workdir
through the separate run's `restore.Checkpointing` and `reporting.Reporter`: config.json,
experiment.json, metrics.jsonl, TensorBoard events, clients.npz, checkpoints, plots and
summary.json. So a replica can be resumed alone by `train_and_evaluate` and vice versa.

Resume: every replica restores its own latest checkpoint. The group runs from the earliest
replica's round to the last; a replica already past a round (it stopped later, or finished
in a separate command) keeps its state frozen in that round and writes nothing for it.
`wall_time_s` of each replica runs from the group's start to its own summary.

Devices: a group of R replicas spreads over d devices, d the largest divisor of R up to the
device count (`group_mesh`): each device runs R/d whole replicas, all their clients, and the
devices never communicate; one replica's clients stay on its device. That beats splitting
each run's clients over the devices (a separate run's layout) wherever a replica fits on one
device: no all-gathers, one compile. Several processes (hosts) run a group on one device.
`compare` runs further groups one after another, cut so that none loads a device more than a
full group does (`spread_sizes`).
"""

import contextlib
import functools
import os
from typing import Dict, List, Optional, Sequence

from absl import logging
import jax
import numpy as np

from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedmerge_jax import choices
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import evaluation
from fedmerge_jax import failures
from fedmerge_jax import gap
from fedmerge_jax import hyperparams
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax import plot
from fedmerge_jax import preemption
from fedmerge_jax import reporting
from fedmerge_jax import restore
from fedmerge_jax import sampling
from fedmerge_jax import train


REPLICAS = "replicas"  # The mesh axis a group's replica axis is split over.


class GroupError(ValueError):
  """Configs that cannot run as one replica group, with what differs."""


def check_group(configs, workdirs) -> None:
  """Raises GroupError unless the resolved `configs` differ only in their value fields."""
  if not configs or len(configs) != len(workdirs):
    raise GroupError(
      f"train_and_evaluate_many: {len(configs)} configs for {len(workdirs)} "
      "workdirs; give one workdir per config."
    )
  if len({os.path.abspath(w) for w in workdirs}) != len(workdirs):
    raise GroupError("train_and_evaluate_many: two configs share a workdir; give each its own.")
  first = dict(config_lib.flatten(configs[0]))
  for i, config in enumerate(configs[1:], 1):
    if hyperparams.program_key(config) != hyperparams.program_key(configs[0]):
      changed = sorted(
        k
        for k, v in config_lib.flatten(config)
        if k not in hyperparams.VALUE_FIELDS and first.get(k) != v
      )
      raise GroupError(
        f"train_and_evaluate_many: config {i} differs from config 0 in "
        f"{', '.join(changed)}; replicas may differ only in "
        f"{', '.join(hyperparams.VALUE_FIELDS)} (run the others as another group)."
      )


def stack(trees, sharding):
  """`trees` stacked on a new leading axis, laid out as `sharding`: on the host, since a
  device stack compiles a program per leaf shape (seconds for a model's worth of leaves)."""
  return jax.device_put(parallel.stacked(jax.device_get(trees)), sharding)


def row(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def host_rows(tree):
  """`tree`'s replica rows as host arrays: [row(tree, 0), ...], fetched in one transfer (an
  index of a device array is a dispatched program per leaf)."""
  host = jax.device_get(tree)
  return [row(host, i) for i in range(len(jax.tree.leaves(host)[0]))]


class Member:
  """One replica's run: its checkpoints and reports, a separate run's (restore.Checkpointing,
  reporting.Reporter); `done`: rounds whose outputs are written, `state_round`: the round
  of its row of the group's state."""

  def __init__(self, config, workdir: str, layout, data):
    self.config, self.workdir, self.data = config, workdir, data
    self.checkpointing = restore.Checkpointing(config, workdir, layout)
    self.done = self.state_round = 0
    self.reporter = None

  def restore_or_initialise(self, init, mesh, values):
    """Its state to start from: the latest checkpoint's, or `init`'s of (its key, `values`)."""
    start = self.checkpointing.restore_or_initialise(init, mesh, train.all_finite, values)
    self.done = self.state_round = start.round
    self.rng_data = start.rng_data  # Its (sample key, round key) data.
    self.reporter = reporting.Reporter(
      self.workdir,
      self.config,
      self.data,
      start.round,
      start.best,
      start.metrics,
      label=self.workdir,
    )
    return start.state

  def save(self, round_index: int, inner) -> None:
    """Checkpoints `inner` as its state after `round_index` where it is (Checkpointing.save)."""
    if inner is not None:
      self.checkpointing.save(round_index, self.state_round, inner, self.reporter.progress)


class RoundData:
  """`round_data(client_ids, evaluating)` -> (ordered ids, padded ids [R, C], data [R, C, ...]):
  every replica's round data for `make_group_round`, each replica's clients largest first
  (as `parallel.RoundGatherer` orders them; padding further changes no result), the training
  splits padded to the longest replica's bucket.

  Every round carries a test part (`gap.WithTest`) padded to the longest test split of all
  clients: evaluation rounds the clients' own, for the local-global gap's probe; the other
  rounds an empty one kept on the devices, which the probe skips (`gap.unless_empty`). So
  training and evaluation rounds share one compiled round (a separate run compiles one of
  each; a group would compile both and run them R times fewer)."""

  def __init__(self, data: data_lib.FederatedData, layout, batch_size: int, sharding=None):
    self.data, self.layout, self.batch_size, self.sharding = data, layout, batch_size, sharding
    self.test_length = data.test.padded_length(np.arange(data.num_clients), 8)
    self._empty = None  # The empty test part, made at the first training round.

  def __call__(self, client_ids: Sequence[np.ndarray], evaluating: bool):
    data = self.data
    ordered = [parallel.largest_first(ids, data.train.counts) for ids in client_ids]
    padded = [self.layout.pad_ids(ids) for ids in ordered]
    length = max(data.train.padded_length(ids, self.batch_size) for ids in ordered)
    train_part = parallel.stacked([data.train.gather(ids, length) for ids in padded])
    if evaluating:
      test = self._placed([data.test.gather(ids, self.test_length) for ids in padded])
    else:
      if self._empty is None:
        phantoms = np.full(len(padded[0]), data.num_clients)  # Past the last client: empty.
        self._empty = self._placed([data.test.gather(phantoms, self.test_length)] * len(padded))
      test = self._empty
    return ordered, np.stack(padded), gap.WithTest(train_part, test, skips_empty=True)

  def _placed(self, parts):
    """The replicas' test parts stacked, on the devices as `sharding` lays them out: both
    kinds of round hand the program the same kind of array (a host array's abstract value
    differs from a placed one's, and would compile the round again)."""
    test = parallel.stacked(parts)
    return test if self.sharding is None else jax.device_put(test, self.sharding)


def group_devices(num_devices: int = 0) -> int:
  """The devices a replica group may spread over: those a separate run of the config would
  use (`num_devices`, 0: all; refused as it refuses them), one with several processes."""
  return parallel.make_mesh(num_devices).size if jax.process_count() == 1 else 1


def devices_used(num_replicas: int, available: int) -> int:
  """d, the devices a group of `num_replicas` takes of `available`: the largest divisor of R
  up to them, so that each device holds R/d whole replicas."""
  limit = min(available, num_replicas)
  return max(k for k in range(1, limit + 1) if num_replicas % k == 0)


def spread_sizes(count: int, size: int, devices: int) -> List[int]:
  """The group sizes `count` runs go in, at most `size` a group, none loading a device with
  more replicas than a full group does (ceil(size / devices)): a group that would (13 on 8
  devices, whose only divisor up to 8 is 1) is cut into a multiple of the devices and the
  rest (8 + 5), each spread evenly (`devices_used`)."""
  share = -(-size // devices)  # Replicas a device holds in a full group.
  sizes = []
  for start in range(0, count, size):
    s = min(size, count - start)
    if s // devices_used(s, devices) > share:
      sizes += [s - s % devices, s % devices]
    else:
      sizes.append(s)
  return sizes


def uneven_spread(num_replicas: int, available: int) -> Optional[str]:
  """The warning for a group of `num_replicas` that `spread_sizes` would cut (it loads some
  of the `available` devices past an even share, ceil(R / devices), while others idle), naming
  the cut; else None."""
  cut = spread_sizes(num_replicas, num_replicas, available)
  if len(cut) == 1:
    return None
  d = devices_used(num_replicas, available)
  return (
    f"{num_replicas} replicas run on {d} of {available} devices, {num_replicas // d} a device "
    f"({num_replicas} has no larger divisor up to {available}); if they do not fit, run "
    f"them as groups of {' + '.join(map(str, cut))} (compare cuts them so)."
  )


def group_mesh(num_replicas: int, num_devices: int = 0) -> Mesh:
  """The (replicas, clients) mesh of shape (d, 1) a group of `num_replicas` runs on: d of the
  `group_devices(num_devices)` (`devices_used`)."""
  d = devices_used(num_replicas, group_devices(num_devices))
  return jax.make_mesh(
    (d, 1), (REPLICAS, parallel.CLIENTS), (AxisType.Auto,) * 2, devices=jax.devices()[:d]
  )


REPLICA_PARALLELISMS = choices.REPLICA_PARALLELISMS


def resolve_replica_parallelism(
  parallelism: str, model, example_input, backend: Optional[str] = None
) -> str:
  """'auto' -> 'sequential' for a model with convolutions on CPU, else 'vmap'.

  Under `vmap` each replica's convolution kernels are its own, so XLA:CPU runs one library
  convolution per replica (`layers`' batching rule) and copies every activation in and out
  of the replica-stacked arrays around it: measured 7-11% (ResNet-9) and 4-21% (EMNIST CNN)
  slower per run than one run at a time, while one after another inside the program they
  run as fast as separate runs (docs' Algorithms, replica groups). Dense layers batch into
  matmuls with no copies, and accelerators batch both, so the rest vmap. `backend` defaults
  to JAX's (pass 'gpu' to see an accelerator's choice)."""
  if parallelism not in REPLICA_PARALLELISMS:
    raise ValueError(
      f"replica_parallelism={parallelism!r}; expected one of {REPLICA_PARALLELISMS}."
    )
  if parallelism != "auto":
    return parallelism
  if (backend or jax.default_backend()) != "cpu":
    return "vmap"
  return "sequential" if models.has_convolution(model, example_input) else "vmap"


def _one_after_another(fn):
  """`fn(state, *inputs) -> (state, outputs)` over the leading replica axis of every
  argument, one replica at a time: a loop that writes each replica's new state into the
  stacked states in place, so beyond the group's states it holds one replica's, not R."""

  def run(states, *inputs):
    at = lambda tree, i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), tree)
    put = lambda tree, row, i: jax.tree.map(
      lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y, i, 0), tree, row
    )
    count = jax.tree.leaves(states)[0].shape[0]
    outputs = jax.eval_shape(fn, at(states, 0), *at(inputs, 0))[1]
    stacked = jax.tree.map(lambda s: jax.numpy.zeros((count, *s.shape), s.dtype), outputs)

    def one(i, carry):
      states, stacked = carry
      state, output = fn(at(states, i), *at(inputs, i))
      return put(states, state, i), put(stacked, output, i)

    return jax.lax.fori_loop(0, count, one, (states, stacked))

  return run


def over_replicas(fn, parallelism: str, mesh: Mesh):
  """`fn(state, *inputs) -> (state, outputs)` of one replica applied over the leading
  replica axis of its arguments: all at once ('vmap'), or one after another ('sequential':
  `_one_after_another`, each device looping over its own replicas where the replica axis is
  spread over several, so no replica's data moves)."""
  if parallelism == "vmap":
    return jax.vmap(fn)
  one_after_another = _one_after_another(fn)
  if mesh.shape[REPLICAS] == 1:
    return one_after_another
  spec = PartitionSpec(REPLICAS)
  # check_vma off: a round's loops start device-invariant zeros that become per-replica.
  return jax.shard_map(
    one_after_another,
    mesh=mesh,
    in_specs=spec,
    out_specs=spec,
    axis_names={REPLICAS},
    check_vma=False,
  )


def make_group_round(algorithm, config, spread, parallelism: str = "vmap"):
  """(states [R], active [R], ids [R, C], data [R, ...], round keys [R], r) -> (states,
  metrics [R]).

  The NaN-guarded round r of every replica at once (`parallelism`: `over_replicas`), each
  with its run's key for round r (`fold_in(round key, r)`, as `rounds.Rounds` folds it); a
  replica not `active` keeps its state."""
  # A replica not `active` runs as a round after a failed one does (train.after_a_finite_round):
  # its loss reads NaN, so the guard's one select keeps its state (no second select). The
  # guard saves only the round's clients' rows of per-client leaves, as a separate run's.
  guarded = over_replicas(
    train.keep_finite(train.after_a_finite_round(algorithm.round), algorithm.client_rows),
    parallelism,
    spread.mesh,
  )

  def group_round(states, active, client_ids, data, round_keys, round_index):
    rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(round_keys, round_index)
    return guarded(states, client_ids, data, (rngs, active))

  return jax.jit(
    group_round,
    donate_argnums=0,
    in_shardings=(spread,) * 5 + (parallel.replicated(spread.mesh),),
    out_shardings=(spread, spread),
    compiler_options=train.compiler_options(config),
  )


def train_and_evaluate_many(
  configs,
  workdirs: Sequence[str],
  data: Optional[data_lib.FederatedData] = None,
  model=None,
  start_over: bool = False,
) -> List[Dict]:
  """Runs `configs` as one replica group; returns their summaries, as `train_and_evaluate`'s.

  The configs may differ only in `hyperparams.VALUE_FIELDS` (GroupError names the field
  otherwise); each writes `workdirs[i]` as `train_and_evaluate(configs[i], workdirs[i])`
  would, and its metrics equal that run's to float tolerance. `data` (loaded from the first
  config if None) and `model` are shared; `start_over` as in `train_and_evaluate`.
  """
  configs = [config_lib.resolve(c) for c in configs]
  check_group(configs, workdirs)
  logging.info("%s", train.accelerator_line())
  for config, workdir in zip(configs, workdirs):
    restore.claim_workdir(config, workdir, start_over, True)
  first = configs[0]
  data = data if data is not None else data_lib.load(first.data)
  for warning in config_lib.data_warnings(first, data.num_clients, data.name):
    logging.warning(warning)
  one = parallel.make_mesh(1)  # A replica's own world: one device holds all its clients.
  mesh = group_mesh(len(configs), first.num_devices)  # The replicas' (module docstring).
  warning = uneven_spread(len(configs), group_devices(first.num_devices))
  if warning:
    logging.warning("%s", warning)
  spread = NamedSharding(mesh, PartitionSpec(REPLICAS))  # Leading replica axis over devices.
  eval_clients, eval_examples = evaluation.chunk_sizes(first, data)  # Before training's choice.
  chunk = train.chosen_chunk_size(first, data, one)
  for config in configs:
    config.client_chunk_size = chunk
  layout = parallel.client_layout(1, data.num_clients, first.clients_per_round, chunk)
  ran = plot.what_ran(first, data, model)  # Before build: whether `model` is the user's.
  model, _ = train.build(first, data, layout, model)
  algorithm = hyperparams.valued(lambda c: train.build(c, data, layout, model)[1], first)
  for config, workdir in zip(configs, workdirs):
    restore.record_experiment(config, workdir, data, model, start_over, True, ran)
  parallelism = resolve_replica_parallelism(
    first.replica_parallelism, model, np.zeros(data.example_shape, np.float32)
  )
  logging.info(
    "%s on %s: %d replicas as one program (%s) on %d device%s (%s).",
    first.algorithm,
    data.name,
    len(configs),
    "vmapped" if parallelism == "vmap" else "one after another",
    mesh.size,
    "s" if mesh.size > 1 else "",
    ", ".join(workdirs),
  )

  members = [Member(c, w, layout, data) for c, w in zip(configs, workdirs)]
  values = hyperparams.stacked_values(configs)
  # One replica's init, compiled once and called R times: XLA compiles the vmapped init's
  # random bits far slower (measured 2m14s for the offline default's 8 replicas on 2 cores).
  init = lambda key_and_values: algorithm.init(key_and_values).inner
  # Laid out as the round's outputs are, so that round 2 reuses round 1's program.
  states = hyperparams.ValuedState(
    stack(
      [m.restore_or_initialise(init, one, row(values, i)) for i, m in enumerate(members)],
      spread,
    ),
    jax.device_put(values, spread),
  )

  group_round = make_group_round(algorithm, first, spread, parallelism)
  round_data = RoundData(data, layout, first.batch_size, spread)
  rng_data = np.stack([m.rng_data for m in members])  # [R, 2 (sample, round), key data]
  schedule = sampling.ClientSchedule(
    jax.random.wrap_key_data(rng_data[:, 0]), data.num_clients, first.clients_per_round
  )
  round_keys = jax.random.wrap_key_data(rng_data[:, 1])
  evaluate = train.round_evaluator(
    algorithm, data, first, mesh, (eval_clients, eval_examples), replicas=True
  )
  num_rounds = first.num_rounds
  stops = preemption.StopRequests().install()
  r = min(m.done for m in members)

  def save_all():
    rows = host_rows(states.inner) if restore.alive(states) else [None] * len(members)
    for m, inner in zip(members, rows):
      m.save(m.done, inner)

  try:
    with contextlib.ExitStack() as reporters:
      for m in members:
        reporters.enter_context(m.reporter)
      for r in range(min(m.done for m in members) + 1, num_rounds + 1):
        signal_name = stops.stop_before(r)
        if signal_name:
          save_all()
          for m in members:
            m.checkpointing.wait()
          raise preemption.Stopped(
            signal_name, stops.signal_number, members[0].checkpointing.stopped_saying()
          )
        active = np.array([m.done < r for m in members])
        sampled = schedule(r)  # [R, C]: each replica's own clients.
        evaluating = r % first.eval_every == 0 or r == num_rounds
        ordered, ids, batch = round_data(sampled, evaluating)
        states, round_metrics = group_round(states, active, ids, batch, round_keys, np.uint32(r))
        round_metrics = jax.device_get(round_metrics)
        for i, m in enumerate(members):
          if active[i] and not round_metrics["finite"][i]:
            m.save(r - 1, row(states.inner, i))  # The guarded round kept its last good state.
            raise FloatingPointError(
              f"{m.workdir}: "
              + failures.non_finite_message(
                row(round_metrics, i), r, ordered[i], "Other replicas are checkpointed."
              )
            )
        evaluated = []  # Every replica's, evaluated at once when the first reports.

        def evaluation_of(i):
          if not evaluated:  # Inactive replicas too: their results are dropped.
            evaluated.extend(evaluate(states, r, np.stack(ordered), round_metrics))
          return evaluated[i]

        rows = []  # Every replica's state on the host, fetched when the first one saves.
        for i, m in enumerate(members):
          if not active[i]:
            continue
          m.state_round = r
          m.reporter.advance()
          if evaluating:
            m.reporter.report(r, functools.partial(evaluation_of, i))
          m.done = r
          if m.checkpointing.due(r):
            rows = rows or host_rows(states.inner)
            m.save(r, rows[i])
    return [m.reporter.summary() for m in members]  # summary.json and the plots.
  except BaseException as e:
    save_all()
    if failures.is_out_of_memory(e):
      raise failures.OutOfMemoryError(
        f"Out of memory at round {r} with {len(members)} replicas at once: run fewer "
        "(compare --replicas) or "
        + failures.out_of_memory_message(first, r, first.clients_per_round or data.num_clients, "")
      ) from e
    raise
  finally:
    stops.uninstall()
    for m in members:
      m.checkpointing.close()


MAX_AUTO_REPLICAS = 16  # `auto` never groups more (the measured gain flattens before).
MEMORY_SHARE = 0.5  # Of the free device (or, on CPU, host) memory, what `auto` lets replicas take.


def free_memory_bytes(backend: str = "") -> int:
  """Free memory of one device (GPU/TPU: the first's), or the host's available memory on CPU
  (which all CPU devices share)."""
  if (backend or jax.default_backend()) == "cpu":
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)


def replica_bytes(config, data: data_lib.FederatedData, model=None) -> int:
  """An estimate of one replica's memory: 4 copies of its state (the state, the round's new
  one, deltas and optimizer sums) and 2 of its round's padded data (train and test splits)."""
  algorithm = train.build(config_lib.resolve(config), data, model=model)[1]
  state = jax.eval_shape(algorithm.init, jax.random.key(0))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  n = data.num_clients
  sampled = config.clients_per_round if 0 < config.clients_per_round < n else n
  example = data.train.x.itemsize * int(np.prod(data.example_shape)) + data.train.y.itemsize
  round_bytes = sampled * int(data.train.counts.max(initial=1)) * example
  return 4 * state_bytes + 2 * round_bytes


def auto_replicas(
  config,
  data: data_lib.FederatedData,
  model=None,
  free_bytes: Optional[int] = None,
  devices: Optional[int] = None,
  backend: str = "",
) -> int:
  """`compare --replicas=auto`: how many replicas of `config` fit in `MEMORY_SHARE` of the free
  memory (`free_bytes` where given), 1 to `MAX_AUTO_REPLICAS`. On several GPUs/TPUs each
  device holds its own share of a group (`group_mesh`), so the fit is per device times the
  devices (`devices`: the group's devices, by default all of one process's); CPU devices
  share the host's memory."""
  backend = backend or jax.default_backend()
  if devices is None:
    devices = (config.num_devices or jax.device_count()) if jax.process_count() == 1 else 1
  free = free_memory_bytes(backend) if free_bytes is None else free_bytes
  fit = int(MEMORY_SHARE * free // max(replica_bytes(config, data, model), 1))
  if backend != "cpu":
    fit *= devices
  return int(np.clip(fit, 1, MAX_AUTO_REPLICAS))
