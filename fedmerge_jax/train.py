"""train_and_evaluate: config -> data -> algorithm state -> jitted rounds -> metrics.

Python only samples clients, gathers their padded data, logs, checkpoints and writes
files; each round is one jitted call of the algorithm's pure `round` function. Rerunning
with the same workdir resumes from the last checkpoint and reproduces the same metrics.
The pieces: restore.py (workdir, checkpoints), rounds.py and sampling.py (the rounds, the
host working ahead), reporting.py (files, progress, best round), failures.py (stops).
"""

from typing import NamedTuple, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from fedmerge_jax import algorithms
from fedmerge_jax import client as client_lib
from fedmerge_jax import config as config_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import evaluation
from fedmerge_jax import failures
from fedmerge_jax import gap
from fedmerge_jax.guard import all_finite, keep_finite  # noqa: F401 (all_finite: re-exported)
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax import plot
from fedmerge_jax import preemption  # noqa: F401  (tests patch train.preemption.StopRequests)
from fedmerge_jax import reporting
from fedmerge_jax import restore
from fedmerge_jax import rounds as rounds_lib
from fedmerge_jax import sampling

OutOfMemoryError = failures.OutOfMemoryError  # Where users and the mains have caught it.
sample_clients = sampling.sample_clients


def run_model(config, data: data_lib.FederatedData, model=None):
  """The module a run applies: `model`, or the one `config.model` names, seeing the data's
  `input_transform` (`models.with_input_transform`)."""
  model = model if model is not None else models.get_model(config.model, data.num_classes)
  return models.with_input_transform(model, data.input_transform)


def build(
  config, data: data_lib.FederatedData, layout: Optional[parallel.ClientLayout] = None, model=None
):
  """The (model, algorithm) that a resolved `config` names, for `data`'s clients and inputs.

  With a `layout`, for its padded population and device-aligned chunks (and, on several
  devices, clients vmapped: `auto` parallelism would otherwise pick one at a time on CPU).
  A given `model` (any flax.linen module) replaces the one `config.model` names. Where the
  data carries an `input_transform`, the model sees its inputs through it
  (`models.with_input_transform`): every path that applies the model transforms each batch.
  """
  num_clients = data.num_clients
  if layout is not None:
    config = config.copy_and_resolve_references()
    config.client_chunk_size, num_clients = layout.chunk_size, layout.population
    if layout.num_devices > 1 and config.client_parallelism == "auto":
      config.client_parallelism = "vmap"  # One client at a time would idle all devices but one.
  model = run_model(config, data, model)
  algorithm = algorithms.get_algorithm(
    model,
    config,
    num_clients,
    jnp.zeros(data.example_shape, jnp.float32),
    total_train_examples=int(data.train.counts.sum()),
  )
  return model, algorithm


def compiler_options(config, backend: str = ""):
  """XLA options for a run's jitted rounds and evaluations on this backend (or None): the
  model's (CPU convolutions, models.compiler_options) and the GPU's command buffers."""
  options = dict(models.compiler_options(config.model) or {})
  options.update(parallel.command_buffer_options(config.command_buffers, backend))
  return options or None


CHUNK_PROBE_MEMBERS = 8  # Clients in the program whose memory analysis sizes a chunk.
CHUNK_MEMORY_SHARE = 0.8  # Of the free device memory, what chunks may take.


def chosen_chunk_size(
  config, data: data_lib.FederatedData, mesh, backend: str = "", free_bytes: Optional[int] = None
) -> int:
  """`config.client_chunk_size`; where it is 0 and a GPU/TPU vmaps clients, the chosen chunk
  (0 where that is the whole round), logged: `parallel.choose_chunk_size` over a round's
  step counts (the population's, largest first, at the round's size), bytes per client from
  the memory analysis of the compiled local training of `CHUNK_PROBE_MEMBERS` clients padded
  to the largest client, and the devices' free memory (`free_bytes` where given) less the
  round's data. One client at a time (CPU) keeps 0."""
  backend = backend or jax.default_backend()
  parallelism = config.client_parallelism
  if parallelism == "auto":  # As parallel.resolve_parallelism and build() decide it.
    parallelism = "vmap" if mesh.size > 1 or backend != "cpu" else "sequential"
  if config.client_chunk_size or backend == "cpu" or parallelism != "vmap":
    return config.client_chunk_size
  n = data.num_clients
  sampled = config.clients_per_round if 0 < config.clients_per_round < n else n
  local = client_lib.LocalConfig(
    config.local_epochs,
    config.batch_size,
    config.client_lr,
    config.prox_mu,
    config.local_batching,
    compute_dtype=config.compute_dtype,
  )
  by_size = np.sort(data.train.counts)[::-1]
  picked = by_size[np.linspace(0, n - 1, sampled).round().astype(np.int64)]
  steps = [client_lib.num_local_steps(int(c), local) for c in picked]
  length = data.train.padded_length(np.arange(n), config.batch_size)
  model = run_model(config, data)
  m = CHUNK_PROBE_MEMBERS
  example = jnp.zeros((1, *data.example_shape), jnp.float32)
  one = jax.eval_shape(lambda: flax.core.unfreeze(model.init(jax.random.key(0), example)))
  stack = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct((m, *s.shape), s.dtype), tree)
  batch = client_lib.ClientData(
    jax.ShapeDtypeStruct((m, length, *data.example_shape), data.train.x.dtype),
    jax.ShapeDtypeStruct((m, length), data.train.y.dtype),
    jax.ShapeDtypeStruct((m,), jnp.int32),
  )
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), m))
  train_chunk = jax.vmap(lambda v, d, k: client_lib.local_train(model.apply, v, d, k, local))
  compiled = (
    jax.jit(train_chunk, compiler_options=compiler_options(config, backend))
    .lower(stack(one), batch, keys)
    .compile()
  )
  memory = compiled.memory_analysis()
  per_member = (
    memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
  ) / m
  if free_bytes is None:
    stats = jax.local_devices()[0].memory_stats() or {}
    free_bytes = (stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)) * mesh.size
  example_bytes = data.train.x.itemsize * int(np.prod(data.example_shape)) + data.train.y.itemsize
  budget = CHUNK_MEMORY_SHARE * free_bytes - sampled * length * example_bytes
  chunk = parallel.choose_chunk_size(steps, per_member, budget)
  real = sum(steps) / parallel.computed_steps(steps, chunk)
  logging.info(
    "client_chunk_size=0: chose %d of %d clients a chunk (%.1f MB each, %.1f GB free;"
    " real fraction %.2f).",
    chunk,
    sampled,
    per_member / 1e6,
    free_bytes / 1e9,
    real,
  )
  return 0 if chunk >= sampled else chunk


def after_a_finite_round(round_fn):
  """`round_fn` whose `rng` may be `(key, healthy)`, `healthy` the previous round's finite
  flag: False makes this round's loss NaN, so `keep_finite` keeps the state it was given.
  A round dispatched before the previous one's flag was read thus changes nothing after a
  failure (rounds.py). A plain key runs the round as it is."""

  def round_after(state, client_ids, data, rng):
    key, healthy = rng if isinstance(rng, tuple) else (rng, True)
    new_state, metrics = round_fn(state, client_ids, data, key)
    loss = jnp.where(healthy, metrics["train/loss"], jnp.nan)
    return new_state, dict(metrics, **{"train/loss": loss})

  return round_after


def compile_round(algorithm, config, mesh=None, shardings=None):
  """The jitted round every run uses: NaN-guarded (`after_a_finite_round` too), its state
  donated (and laid out as `shardings` over `mesh`), compiled with this backend's XLA
  options for the model."""
  options = compiler_options(config)
  guarded = keep_finite(after_a_finite_round(algorithm.round), algorithm.client_rows)
  if mesh is None:
    return jax.jit(guarded, donate_argnums=0, compiler_options=options)
  return parallel.jit_round(guarded, mesh, shardings, options)


def accelerator_line() -> str:
  """What this run computes on, e.g. 'JAX backend gpu: 1 device (NVIDIA H200), 1 process'."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (
    f"JAX backend {jax.default_backend()}: {len(devices)} device"
    f"{'s' if len(devices) != 1 else ''} ({', '.join(kinds)}), "
    f"{jax.process_count()} process{'es' if jax.process_count() != 1 else ''}"
  )


def all_merging_weights(
  algorithm, data: data_lib.FederatedData, chunk_size: int, mesh, replicas: bool = False
):
  """state -> [N, K] every real client's merging weights, chunk by chunk as evaluation goes
  (`replicas`: states with a leading replica axis -> [R, N, K], one program for all).

  They come from the clients' training data where the algorithm looks at it (IFCA's
  assignment), so plots and the ARI show the weights that evaluation used.
  """
  n = data.num_clients
  chunk = parallel.client_layout(mesh.size, n, 0, chunk_size).eval_chunk
  weights_fn = jax.jit(
    evaluation.over_replicas(algorithm.merging_weights, replicas, (0, None, None)),
    out_shardings=parallel.replicated(mesh),
  )

  def weights(state) -> np.ndarray:
    rows = []
    for ids, real in parallel.padded_chunks(np.arange(n), chunk):
      train = data.train.gather(ids, data.train.padded_length(ids, 8))  # Bucketed: few shapes.
      rows.append(np.asarray(weights_fn(state, ids, train))[..., :real, :])
    return np.concatenate(rows, axis=-2)

  return weights


class Run(NamedTuple):
  """A run's resolved config, its data, devices and client layout, model and algorithm."""

  config: object
  workdir: str
  data: data_lib.FederatedData
  mesh: jax.sharding.Mesh
  layout: parallel.ClientLayout
  model: object
  algorithm: object
  main_process: bool  # In a multi-host run only process 0 writes.
  eval_chunks: tuple = (0, 0)  # Evaluation's (clients, examples) at once: evaluation.chunk_sizes.


def set_up(config, workdir: str, data=None, model=None, start_over: bool = False) -> Run:
  """Resolves `config`, claims `workdir`, loads the data, lays clients out on the devices
  and builds the algorithm; records the experiment in `workdir`."""
  config = config_lib.resolve(config)
  logging.info("%s", accelerator_line())  # The first line: is the accelerator seen?
  main_process = jax.process_index() == 0
  restore.claim_workdir(config, workdir, start_over, main_process)
  data = data if data is not None else data_lib.load(config.data)
  for warning in config_lib.data_warnings(config, data.num_clients, data.name):
    logging.warning(warning)
  mesh = parallel.make_mesh(config.num_devices)
  eval_chunks = evaluation.chunk_sizes(config, data)  # Before training's choice.
  config.client_chunk_size = chosen_chunk_size(config, data, mesh)  # 0 on CPU: as given.
  layout = parallel.client_layout(
    mesh.size, data.num_clients, config.clients_per_round, config.client_chunk_size
  )
  ran = plot.what_ran(config, data, model)  # Before build: whether `model` is the user's.
  model, algorithm = build(config, data, layout, model)
  logging.info(
    "%s on %s: %d clients, %d classes, model %s, %d devices used",
    config.algorithm,
    data.name,
    data.num_clients,
    data.num_classes,
    type(models.transformed.unwrapped(model)).__name__,
    mesh.size,
  )
  restore.record_experiment(config, workdir, data, model, start_over, main_process, ran)
  return Run(config, workdir, data, mesh, layout, model, algorithm, main_process, eval_chunks)


def make_round_evaluator(run: Run):
  """`round_evaluator` of a set-up run."""
  return round_evaluator(run.algorithm, run.data, run.config, run.mesh, run.eval_chunks)


def round_evaluator(algorithm, data, config, mesh, eval_chunks, replicas: bool = False):
  """evaluate(state, r, ids, round_metrics) -> (metrics, per-client arrays, merging weights
  or None) for an evaluation round: the round's training metrics, every client's test and
  validation metrics, the local-global gap of the round's clients (gap.py), the merging
  weights' agreement with known groups, and the communication per round. `eval_chunks`:
  evaluation's (clients, examples) at once (evaluation.chunk_sizes). With `replicas`, the
  state, ids ([R, C]) and round metrics have a leading replica axis R and evaluate returns
  a list of R such triples, every replica evaluated by the same programs at once."""
  eval_clients, eval_examples = eval_chunks
  options = compiler_options(config)
  measure_gap = gap.make_gap_evaluator(
    algorithm, data, eval_clients, options, eval_examples, replicas
  )
  evaluate_clients = evaluation.make_evaluator(
    algorithm, data, eval_clients, mesh, options, eval_examples, replicas
  )
  merging_weights = (
    all_merging_weights(algorithm, data, eval_clients, mesh, replicas)
    if algorithm.merging_weights is not None
    else None
  )
  down, up = algorithm.communication

  def evaluate_one(round_index: int, ids, round_metrics, evaluated, gaps, weights):
    metrics = {"round": round_index}
    metrics.update({k: float(v) for k, v in round_metrics.items() if k.startswith("train/")})
    per_client = {k: evaluated.pop(k) for k in list(evaluated) if k.startswith("clients/")}
    metrics.update(evaluated)
    gap_scalars, gap_clients = gaps
    metrics.update(gap_scalars)
    per_client.update(gap_clients)
    if weights is not None and data.groups is not None:
      metrics["groups/ari"] = plot.dominant_model_ari(weights, data.groups)
    metrics.update(
      {
        "comm/params_down_per_client": down,
        "comm/params_up_per_client": up,
        "comm/params_per_round": len(ids) * (down + up),
      }
    )
    return metrics, per_client, weights

  def evaluate(state, round_index: int, ids, round_metrics):
    evaluated, gaps = evaluate_clients(state), measure_gap(state, ids, round_metrics)
    weights = merging_weights(state) if merging_weights else None
    if not replicas:
      return evaluate_one(round_index, ids, round_metrics, evaluated, gaps, weights)
    return [
      evaluate_one(
        round_index,
        ids[i],
        {k: v[i] for k, v in round_metrics.items()},
        evaluated[i],
        gaps[i],
        None if weights is None else weights[i],
      )
      for i in range(len(ids))
    ]

  return evaluate


def train_and_evaluate(
  config,
  workdir: str,
  data: Optional[data_lib.FederatedData] = None,
  model=None,
  start_over: bool = False,
):
  """Runs `config` and returns the final metrics and the best-by-validation ones.

  `model`: any flax.linen module called as `apply(variables, x, train=...)` (and `mask=`
  where its __call__ takes it) instead of the one `config.model` names; its last layer
  named 'head' feeds the `official` logit gradient (ConfigError if it needs one).

  Writes to <workdir>: config.json (the resolved config), experiment.json (what identifies
  the run: result-changing config, data and model fingerprints), metrics.jsonl (one line per
  evaluation), TensorBoard events, clients.npz (the latest per-client accuracies and
  merging weights), checkpoints/ (every config.checkpoint_every rounds or
  checkpoint_every_minutes), the plots and summary.json (what this returns). With
  checkpoints already in `workdir` it resumes from the newest one, and the metrics come
  out as if the run had never stopped; a workdir holding another experiment raises
  ExperimentMismatch before any work, unless `start_over` (which deletes its results).
  SIGTERM or SIGUSR1 stops after the round in progress, checkpointed: preemption.Stopped.
  """
  run = set_up(config, workdir, data, model, start_over)
  config, data = run.config, run.data
  checkpointing = restore.Checkpointing(config, workdir, run.layout)
  start = checkpointing.restore_or_initialise(run.algorithm.init, run.mesh, all_finite)
  sample_rng, round_rng = jax.random.wrap_key_data(start.rng_data)
  evaluating = lambda r: r % config.eval_every == 0 or r == config.num_rounds
  rounds = rounds_lib.Rounds(
    compile_round(run.algorithm, config, run.mesh, start.shardings),
    parallel.RoundGatherer(data.train, run.layout, run.mesh, config.batch_size),
    sampling.ClientSchedule(sample_rng, data.num_clients, config.clients_per_round),
    round_rng,
    start.state,
    start.round,
    config.num_rounds,
    evaluating,
    data.test,
    run.mesh,
  )
  evaluate = make_round_evaluator(run)  # Evaluation rounds also measure the local-global gap.
  reporter = reporting.Reporter(
    workdir, config, data, start.round, start.best, start.metrics, run.main_process
  )
  with reporter, failures.Guard(config, rounds, checkpointing, reporter.progress) as guard:
    for r in range(start.round + 1, config.num_rounds + 1):
      guard.stop_if_asked(r)
      guard.check(rounds.run(r))  # Dispatched; the round before it is checked now.
      reporter.advance()
      if evaluating(r):
        guard.check(rounds.confirm())
        reporter.report(r, lambda: evaluate(rounds.state, r, *rounds.latest))
      guard.round_done(r)  # Checkpointed when due.
  return reporter.summary()
