"""Hyper-parameters as values, and replica groups: R runs as one vmapped program.

The reference is always the separate run (`train.build` with plain constants, or
`train_and_evaluate`). Float tolerance: vmapping replicas changes only the summation order of
batched matmuls, so metrics agree to 1e-5 absolute (observed: bit-equal up to ~1e-7).
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import TinyBN, TinyDropout, make_federation, tiny_base_config
from fedmerge_jax import compare
from fedmerge_jax import config as config_lib
from fedmerge_jax import hyperparams
from fedmerge_jax import metric_writers
from fedmerge_jax import models
from fedmerge_jax import parallel
from fedmerge_jax import preemption
from fedmerge_jax import replicas
from fedmerge_jax import train

TOL = 1e-5


@pytest.fixture(scope="module")
def data():
  return make_federation(num_clients=5, sizes=[3, 9, 5, 12, 7])


def test_one_compiled_round_serves_two_learning_rates_and_seeds(data):
  """The program compiled once for the values gives the second value's separately built
  round (and the first value's differs from it)."""
  config = config_lib.resolve(tiny_base_config())
  build = lambda c: train.build(c, data)[1]
  valued = hyperparams.valued(build, config)
  round_fn, init = jax.jit(valued.round), jax.jit(valued.init)
  ids = np.arange(data.num_clients)
  batch = data.train.gather(ids)
  losses = []
  for client_lr, seed in [(0.1, 0), (0.4, 3)]:
    own = config.copy_and_resolve_references()
    own.client_lr, own.seed = client_lr, seed
    state, metrics = round_fn(
      init((jax.random.key(seed), hyperparams.values_of(own))), ids, batch, jax.random.key(7)
    )
    losses.append(float(metrics["train/loss"]))
  separate = build(own)
  expected_state, expected = jax.jit(separate.round)(
    separate.init(jax.random.key(seed)), ids, batch, jax.random.key(7)
  )
  np.testing.assert_allclose(losses[1], expected["train/loss"], atol=TOL)
  assert abs(losses[0] - losses[1]) > 1e-3
  for got, want in zip(jax.tree.leaves(state.inner), jax.tree.leaves(expected_state)):
    np.testing.assert_allclose(got, want, atol=TOL)
  assert round_fn._cache_size() == 1  # pylint: disable=protected-access


def test_program_key_ignores_only_the_value_fields():
  config = config_lib.resolve(tiny_base_config())
  other = config.copy_and_resolve_references()
  other.client_lr, other.seed, other.ditto_lambda, other.pfedme_lambda = 0.3, 5, 0.7, 2.0
  assert hyperparams.program_key(other) == hyperparams.program_key(config)
  other.local_epochs = 3
  assert hyperparams.program_key(other) != hyperparams.program_key(config)
  other.local_epochs = config.local_epochs
  other.fedfomo_val_fraction = 0.3  # Sets the length of FedFomo's validation part: a shape.
  assert hyperparams.program_key(other) != hyperparams.program_key(config)


# Algorithms reading value fields other than the seed and the ones the group tests vary.
OTHER_VALUED = ["apfl", "perfedavg", "fedfomo", "fedamp", "cfl"]


@pytest.mark.parametrize("algorithm", OTHER_VALUED)
def test_every_float_an_algorithm_reads_traces_as_a_value(algorithm, data):
  """The vmapped round of 2 replicas traces with every VALUE_FIELD an array (a Python `if`
  on one, or a shape from one, would fail here; pfedme_lambda's results: the group test)."""
  config = config_lib.resolve(run_config(algorithm, "official"))
  valued = hyperparams.valued(lambda c: train.build(c, data)[1], config)
  values = hyperparams.stacked_values([config, config])
  keys = jax.random.split(jax.random.key(0), 2)
  states = jax.eval_shape(jax.vmap(valued.init), (keys, values))
  ids = np.stack([np.arange(3)] * 2)
  batch = jax.tree.map(lambda *x: np.stack(x), *[data.train.gather(np.arange(3))] * 2)
  _, metrics = jax.eval_shape(jax.vmap(valued.round), states, ids, batch, keys)
  assert metrics["train/loss"].shape == (2,)


# --- Replica groups against separate runs -------------------------------------------------

MODELS = {"bn": TinyBN(), "dropout": TinyDropout()}
REPLICAS = [{"seed": 0, "client_lr": 0.1}, {"seed": 1, "client_lr": 0.3}]  # Each replica's.
# (algorithm, update_mode, model, replicas): BatchNorm and dropout models across the
# algorithms (FedAvg: the sweep test's). pFedMe's replicas differ only in pfedme_lambda.
CASES = [
  ("fedmerge", "official", "bn", REPLICAS),
  ("fedmerge", "gradient", "dropout", REPLICAS),
  ("ditto", "official", "dropout", REPLICAS),
  ("ifca", "official", "bn", REPLICAS),
  ("fedem", "official", "dropout", REPLICAS),
  ("pfedme", "official", "bn", [{"pfedme_lambda": 15.0}, {"pfedme_lambda": 3.0}]),
]


def run_config(algorithm, update_mode, seed=0, client_lr=0.1, **overrides):
  """Two rounds (three: `num_rounds`) of 3 of 5 unequal clients (partial last batches),
  evaluated every round."""
  config = tiny_base_config()
  config.algorithm, config.update_mode, config.seed, config.client_lr = (
    algorithm,
    update_mode,
    seed,
    client_lr,
  )
  config.num_global_models = 2
  config.num_rounds, config.clients_per_round = 2, 3
  config.checkpoint_every, config.tensorboard = 0, False
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


_SEPARATE = {}


def separate_history(config, model_name, data, root):
  """metrics.jsonl of `config`'s separate run (train_and_evaluate), once per config."""
  key = (config_lib.resolve(config).to_json(), model_name)
  if key not in _SEPARATE:
    workdir = str(root / f"separate_{len(_SEPARATE)}")
    train.train_and_evaluate(config, workdir, data=data, model=MODELS[model_name])
    _SEPARATE[key] = metric_writers.read_jsonl(f"{workdir}/metrics.jsonl")
    _SEPARATE[key, "workdir"] = workdir
  return _SEPARATE[key]


def assert_same_clients_npz(got_workdir, config, model_name):
  """The last evaluation's per-client arrays and merging weights equal the separate run's."""
  key = (config_lib.resolve(config).to_json(), model_name)
  got, want = (np.load(f"{w}/clients.npz") for w in (got_workdir, _SEPARATE[key, "workdir"]))
  assert sorted(got.files) == sorted(want.files)
  for name in want.files:
    if want[name].dtype.kind == "f":
      np.testing.assert_allclose(got[name], want[name], atol=TOL, err_msg=name)


def assert_same_history(got, want):
  assert [m["round"] for m in got] == [m["round"] for m in want]
  for g, w in zip(got, want):
    keys = [k for k, v in w.items() if isinstance(v, float) and k != "rounds_per_s"]
    assert keys and set(keys) <= set(g)
    np.testing.assert_allclose(
      [g[k] for k in keys], [w[k] for k in keys], atol=TOL, err_msg=f"round {w['round']}"
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("replicas")


@pytest.mark.parametrize("algorithm,update_mode,model_name,values", CASES)
def test_replica_metrics_equal_the_separate_runs(
  algorithm, update_mode, model_name, values, data, root
):
  """Replica 1 (other values than replica 0's) equals its own separate run: metrics round
  by round, and the last round's per-client arrays and merging weights (clients.npz)."""
  configs = [run_config(algorithm, update_mode, **v) for v in values]
  workdirs = [str(root / f"{algorithm}_{update_mode}" / f"replica_{i}") for i in range(2)]
  summaries = replicas.train_and_evaluate_many(configs, workdirs, data, model=MODELS[model_name])
  history = metric_writers.read_jsonl(f"{workdirs[1]}/metrics.jsonl")
  assert_same_history(history, separate_history(configs[1], model_name, data, root))
  assert_same_clients_npz(workdirs[1], configs[1], model_name)
  assert summaries[1]["test/acc_mean"] == history[-1]["test/acc_mean"]


def test_a_groups_training_and_evaluation_rounds_run_one_compiled_round(data, root, monkeypatch):
  """Round 1 trains only, rounds 2 and 3 also probe the gap: one program for all three (a
  training round carries an empty test part, replicas.RoundData), and the replica still
  equals its separate run (which compiles one round of each kind)."""
  configs = [run_config("fedmerge", "official", num_rounds=3, eval_every=2, **v) for v in REPLICAS]
  workdirs = [str(root / "eval_every_2" / f"replica_{i}") for i in range(2)]
  make, programs = replicas.make_group_round, []
  monkeypatch.setattr(
    replicas, "make_group_round", lambda *a: programs.append(make(*a)) or programs[-1]
  )
  replicas.train_and_evaluate_many(configs, workdirs, data, model=MODELS["bn"])
  assert [p._cache_size() for p in programs] == [1]  # pylint: disable=protected-access
  history = metric_writers.read_jsonl(f"{workdirs[1]}/metrics.jsonl")
  assert [m["round"] for m in history] == [2, 3] and "gap/acc_mean" in history[0]
  assert_same_history(history, separate_history(configs[1], "bn", data, root))
  layout = parallel.client_layout(1, data.num_clients, 3, 0)
  _, _, training = replicas.RoundData(data, layout, 4)([np.arange(3)] * 2, evaluating=False)
  assert training.skips_empty and not training.test.count.any()  # The probe's loop skips it.


# One after another inside the program (config.replica_parallelism, what `auto` picks for a
# model with convolutions on CPU): the same runs as the vmapped cases above.
@pytest.mark.parametrize("algorithm,update_mode,model_name,values", [CASES[0], CASES[4]])
def test_replicas_run_one_after_another_equal_the_separate_runs(
  algorithm, update_mode, model_name, values, data, root, caplog, monkeypatch
):
  configs = [
    run_config(algorithm, update_mode, replica_parallelism="sequential", **v) for v in values
  ]
  workdirs = [str(root / f"{algorithm}_{update_mode}_seq" / f"replica_{i}") for i in range(2)]
  over, built = replicas.over_replicas, []
  monkeypatch.setattr(
    replicas, "over_replicas", lambda fn, how, mesh: built.append(how) or over(fn, how, mesh)
  )
  with caplog.at_level("INFO"):
    replicas.train_and_evaluate_many(configs, workdirs, data, model=MODELS[model_name])
  assert "2 replicas as one program (one after another)" in caplog.text
  assert built == ["sequential"]  # The group's round program (over_replicas: a loop).
  for i, v in enumerate(values):
    history = metric_writers.read_jsonl(f"{workdirs[i]}/metrics.jsonl")
    separate = run_config(algorithm, update_mode, **v)
    assert_same_history(history, separate_history(separate, model_name, data, root))
  assert_same_clients_npz(workdirs[1], separate, model_name)


def test_replicas_one_after_another_are_a_loop_in_the_program_vmapped_ones_are_not():
  """over_replicas: 'sequential' traces one replica's function inside a loop over the
  replica axis (with each replica's own arguments), 'vmap' batches it with no loop."""
  mesh = replicas.group_mesh(1)
  fn = lambda x, y: (x * y, x.sum())
  x, y = np.arange(6.0).reshape(3, 2), np.array([1.0, 2.0, 3.0])
  for how, loops in (("sequential", True), ("vmap", False)):
    mapped = replicas.over_replicas(fn, how, mesh)
    primitives = {e.primitive.name for e in jax.make_jaxpr(mapped)(x, y).jaxpr.eqns}
    assert ("scan" in primitives) == loops, (how, primitives)
    out = mapped(x, y)
    np.testing.assert_allclose(out[0], x * y[:, None])
    np.testing.assert_allclose(out[1], x.sum(1))


class TinyConv(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(2, (3, 3))(x)
    return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def test_auto_replica_parallelism_runs_convolutions_one_after_another_on_cpu_only():
  """CPU: a model with a convolution (even one nested in a submodule's custom derivative, as
  models.layers writes them) runs replicas one after another, a dense one vmapped;
  accelerators vmap both; a named choice stands; a bad one is refused."""
  example = np.zeros((4, 4, 1), np.float32)
  resolve = replicas.resolve_replica_parallelism
  cnn = models.EmnistCNN(num_classes=3)
  assert resolve("auto", TinyConv(), example, "cpu") == "sequential"
  assert resolve("auto", cnn, np.zeros((28, 28, 1), np.float32), "cpu") == "sequential"
  assert resolve("auto", MODELS["bn"], example, "cpu") == "vmap"
  assert resolve("auto", models.MLP(num_classes=3), example, "cpu") == "vmap"
  assert resolve("auto", TinyConv(), example, "gpu") == "vmap"
  assert resolve("vmap", TinyConv(), example, "cpu") == "vmap"
  assert resolve("sequential", MODELS["bn"], example, "gpu") == "sequential"
  with pytest.raises(ValueError, match=r"replica_parallelism='map'; expected one of"):
    resolve("map", TinyConv(), example)


SWEEP_ROUNDS = 3  # The resume test's rounds: it stops before round 2, then before round 3.


@pytest.fixture(scope="module")
def sweep(data, root):
  """compare's grid of 2 client_lr x 2 seeds of FedAvg (BatchNorm model), 3 rounds, with the
  sizes of the groups it ran; the resume test's uninterrupted runs too."""
  groups, programs = [], []
  many, make = replicas.train_and_evaluate_many, replicas.make_group_round
  with pytest.MonkeyPatch.context() as patched:
    patched.setattr(
      replicas,
      "train_and_evaluate_many",
      lambda configs, *a, **k: groups.append(len(configs)) or many(configs, *a, **k),
    )
    patched.setattr(
      replicas, "make_group_round", lambda *a: programs.append(make(*a)) or programs[-1]
    )
    results = compare.run_comparison(
      run_config("fedavg", "official", num_rounds=SWEEP_ROUNDS),
      ["fedavg"],
      str(root / "sweep"),
      data=data,
      seeds=[0, 1],
      sweeps=[("client_lr", [0.1, 0.3])],
      model=MODELS["bn"],
      replicas=4,
    )
  return groups, results, programs


def test_a_client_lr_by_seed_sweep_runs_as_one_group_equal_to_separate_runs(sweep, data, root):
  """compare's grid of 2 client_lr x 2 seeds: one program of 4 replicas; the last replica
  (neither the first lr nor the first seed) equals its separate run."""
  groups, results, programs = sweep
  assert groups == [4]
  # Every round evaluates: one program for all three (round 1's inputs laid out as round 2's).
  assert [p._cache_size() for p in programs] == [1]  # pylint: disable=protected-access
  assert [(r.setting, r.seed) for r in results] == [
    ((("client_lr", lr),), s) for lr in (0.1, 0.3) for s in (0, 1)
  ]
  assert len({r.summary["test/loss"] for r in results}) == 4
  assert_same_history(
    results[-1].history,
    separate_history(
      run_config("fedavg", "official", 1, 0.3, num_rounds=SWEEP_ROUNDS), "bn", data, root
    ),
  )


def test_a_mixed_grid_groups_by_everything_but_the_value_fields():
  configs = [
    config_lib.resolve(run_config(alg, "official", seed, lr, **extra))
    for alg, seed, lr, extra in [
      ("fedmerge", 0, 0.1, {}),
      ("fedmerge", 1, 0.3, {"prox_mu": 0.1}),
      ("fedmerge", 2, 0.1, {"local_epochs": 3}),
      ("fedavg", 0, 0.1, {}),
      ("fedmerge", 3, 0.2, {"server_lr_logits": 0.2}),
      ("fedavg", 1, 0.5, {}),
      ("fedmerge", 4, 0.1, {"num_global_models": 3}),
      ("fedmerge", 5, 0.1, {"clients_per_round": 2}),
    ]
  ]
  pending = list(enumerate(configs))
  indices = lambda groups: [[i for i, _ in g] for g in groups]
  assert indices(compare.replica_groups(pending, 8)) == [[0, 1, 4], [2], [3, 5], [6], [7]]
  assert indices(compare.replica_groups(pending, 2)) == [[0, 1], [4], [2], [3, 5], [6], [7]]
  assert indices(compare.replica_groups(pending, 1)) == [[i] for i in [0, 1, 4, 2, 3, 5, 6, 7]]
  assert compare.parse_replicas("auto") == "auto" and compare.parse_replicas("3") == 3
  with pytest.raises(compare.SweepError, match="positive integer"):
    compare.parse_replicas("0")


def test_groups_on_several_devices_never_load_a_device_more_than_a_full_group():
  """13 of 29 seeds left over on 8 GPUs would all go on one device (13's only divisor up to 8
  is 1): they are cut into 8 (one a device) and 5 instead."""
  configs = [config_lib.resolve(run_config("fedmerge", "official", seed)) for seed in range(29)]
  sizes = lambda groups: [len(g) for g in groups]
  eight = lambda config: 8
  assert sizes(compare.replica_groups(list(enumerate(configs)), 16, eight)) == [16, 8, 5]
  assert sizes(compare.replica_groups(list(enumerate(configs[:13])), 16, eight)) == [8, 5]
  assert sizes(compare.replica_groups(list(enumerate(configs[:6])), 6, lambda c: 4)) == [6]
  assert sizes(compare.replica_groups(list(enumerate(configs[:13])), 16)) == [13]  # 1 device.
  flat = [i for g in compare.replica_groups(list(enumerate(configs)), 16, eight) for i, _ in g]
  assert flat == list(range(29))  # Every run once, in the grid's order.
  for count in range(1, 40):  # Against the layout itself: replicas a device holds.
    for size in (1, 3, 6, 8, 12, 16):
      for devices in (1, 2, 3, 4, 8):
        got = replicas.spread_sizes(count, size, devices)
        assert sum(got) == count and 0 < min(got) and max(got) <= size
        loads = [s // max(d for d in range(1, devices + 1) if s % d == 0) for s in got]
        assert max(loads) <= -(-size // devices), (count, size, devices, got)


def test_a_group_called_directly_with_an_uneven_size_is_warned_with_the_cut():
  assert replicas.uneven_spread(13, 8) == (
    "13 replicas run on 1 of 8 devices, 13 a device (13 has no larger divisor up to 8); "
    "if they do not fit, run them as groups of 8 + 5 (compare cuts them so)."
  )
  assert replicas.uneven_spread(10, 4) == (
    "10 replicas run on 2 of 4 devices, 5 a device (10 has no larger divisor up to 4); "
    "if they do not fit, run them as groups of 8 + 2 (compare cuts them so)."
  )
  # As even as R allows: 6 on 4 devices is 2 on 3 of them (ceil(6 / 4) = 2 anyway).
  for even in [(16, 8), (5, 8), (8, 8), (13, 1), (6, 3), (6, 4), (12, 8), (9, 4)]:
    assert replicas.uneven_spread(*even) is None, even


def test_a_group_on_more_devices_than_exist_is_refused_as_a_separate_run_is():
  with pytest.raises(ValueError, match=r"num_devices=3 but only 1 devices exist; use 0"):
    replicas.group_mesh(4, num_devices=3)
  assert replicas.group_mesh(4, num_devices=1).size == 1


def test_auto_replicas_follow_the_free_memory(data):
  config = config_lib.resolve(run_config("fedmerge", "official", 0, 0.1))
  one = replicas.replica_bytes(config, data)
  assert replicas.auto_replicas(config, data, free_bytes=int(one * 3 / replicas.MEMORY_SHARE)) == 3
  assert replicas.auto_replicas(config, data, free_bytes=0) == 1
  assert replicas.auto_replicas(config, data, free_bytes=10**15) == replicas.MAX_AUTO_REPLICAS
  # Each GPU holds its own replicas; CPU devices share the host's memory.
  three = int(one * 3 / replicas.MEMORY_SHARE)
  assert replicas.auto_replicas(config, data, free_bytes=three, devices=4, backend="gpu") == 12
  assert replicas.auto_replicas(config, data, free_bytes=three, devices=4, backend="cpu") == 3


def test_an_interrupted_group_with_members_at_different_rounds_resumes_to_the_same_metrics(
  sweep, data, root, monkeypatch
):
  """The group stops before round 2; replica 1 alone (train_and_evaluate, from the group's
  checkpoint) runs round 2 and stops; rerun, the group runs round 2 for replica 0 only
  (replica 1 frozen), then round 3 for both. Both end as the uninterrupted runs (the sweep's)
  did; a finished group is not rerun."""
  configs = [
    run_config("fedavg", "official", **v, checkpoint_every=1, num_rounds=SWEEP_ROUNDS)
    for v in REPLICAS
  ]
  workdirs = [str(root / "resumed" / f"replica_{i}") for i in range(2)]
  stop_before = lambda at: lambda self, round_index: "SIGTERM" if round_index == at else None
  rounds = lambda i: [m["round"] for m in metric_writers.read_jsonl(f"{workdirs[i]}/metrics.jsonl")]
  with monkeypatch.context() as patched:
    patched.setattr(preemption.StopRequests, "stop_before", stop_before(2))
    with pytest.raises(preemption.Stopped):
      replicas.train_and_evaluate_many(configs, workdirs, data, model=MODELS["bn"])
    assert rounds(0) == rounds(1) == [1]
    patched.setattr(preemption.StopRequests, "stop_before", stop_before(3))
    with pytest.raises(preemption.Stopped):
      train.train_and_evaluate(configs[1], workdirs[1], data=data, model=MODELS["bn"])
    assert rounds(1) == [1, 2]
  replicas.train_and_evaluate_many(configs, workdirs, data, model=MODELS["bn"])
  histories = [metric_writers.read_jsonl(f"{w}/metrics.jsonl") for w in workdirs]
  uninterrupted = {(r.seed, dict(r.setting)["client_lr"]): r.history for r in sweep[1]}
  assert_same_history(histories[0], uninterrupted[(0, 0.1)])
  assert_same_history(histories[1], uninterrupted[(1, 0.3)])
  replicas.train_and_evaluate_many(configs, workdirs, data, model=MODELS["bn"])  # All done.
  assert [metric_writers.read_jsonl(f"{w}/metrics.jsonl") for w in workdirs] == histories
