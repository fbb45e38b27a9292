"""pFedMe, FedFomo, FedAMP and CFL against plain per-client loops written from their papers and
reference code (not from the modules), plus the identities each one has.

Most references use clients whose examples are copies of one (x, y) each: any batch has the
same mean gradient, so a plain gradient loop of the right number of steps is exact. The
sizes are unequal and not multiples of the batch size (4): partial last batches, unequal
step counts.
"""

import functools
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.cluster import hierarchy

from conftest import TinyBN, TinyDropout, one_example_federation, tiny_base_config
from fedmerge_jax import config as config_lib
from fedmerge_jax import train
from fedmerge_jax.algorithms import cfl, fedfomo
from fedmerge_jax.client import ClientData

SIZES = (5, 7, 12, 3, 9)
IDS = np.array([0, 2, 3])
RNG = jax.random.key(11)


@pytest.fixture(scope="module")
def one_example():
  return one_example_federation(SIZES)


def _build(data, algorithm, **overrides):
  config = tiny_base_config()
  config.algorithm = algorithm
  for key, value in overrides.items():
    setattr(config, key, value)
  config = config_lib.resolve(config)
  model, alg = train.build(config, data)
  return config, model, alg


def _steps(n, config):
  return config.local_epochs * -(-n // config.batch_size)  # E ceil(n / B): a partial last batch.


@functools.partial(jax.jit, static_argnums=0)
def _mean_ce(model, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": params}, x), y
  ).mean()


# One compile per model for every client and test: the example is an argument, not a constant.
_ce_grad = jax.jit(jax.grad(_mean_ce.__wrapped__, argnums=1), static_argnums=0)


def _grad_fn(model, data, c):
  """Gradient of the mean CE on client c's (single, repeated) example."""
  x, y = (a[:1] for a in data.train.client(c))
  return lambda p: _ce_grad(model, p, x, y)


def _one(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _close(a, b, rtol=2e-4, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _distinct(personal, scale, seed=0):
  """Every client's model moved by its own noise, so that mixing clients up shows."""
  leaves, treedef = jax.tree.flatten(personal)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef, [x + scale * rng.normal(size=x.shape).astype(np.float32) for x in leaves]
  )


def _flat(params):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])


def _sgd(grad, start, steps, lr, pull=None, strength=0.0):
  """Plain gradient steps w <- w - lr (grad(w) + strength (w - pull))."""
  w = start
  for _ in range(steps):
    g = grad(w)
    w = jax.tree.map(
      lambda wi, gi, a: wi - lr * (gi + strength * (wi - a)), w, g, pull if pull is not None else w
    )
  return w


# pFedMe ---------------------------------------------------------------------------------------


def test_pfedme_round_follows_the_authors_updates(one_example):
  """CharlieDinh/pFedMe: per batch, K steps theta <- theta - plr (g + lam (theta - w_i) + mu theta),
  then w_i <- w_i - eta lam (w_i - theta); server w <- (1 - beta) w + beta sum n_i / n w_i."""
  lam, plr, k, beta, l2 = 3.0, 0.05, 3, 0.7, 0.01
  config, model, alg = _build(
    one_example,
    "pfedme",
    pfedme_lambda=lam,
    pfedme_personal_lr=plr,
    pfedme_inner_steps=k,
    pfedme_beta=beta,
    pfedme_l2=l2,
  )
  state = alg.init(jax.random.key(0))
  state = state.replace(personal=_distinct(state.personal, 0.1))
  new, _ = jax.jit(alg.round)(state, IDS, one_example.train.gather(IDS), RNG)
  w = state.global_model["params"]
  eta = config.client_lr
  local_models = []
  for c in IDS:
    grad = _grad_fn(model, one_example, c)
    w_i = theta = w
    for _ in range(_steps(SIZES[c], config)):
      for _ in range(k):
        theta = jax.tree.map(
          lambda th, g, wi: th - plr * (g + lam * (th - wi) + l2 * th), theta, grad(theta), w_i
        )
      w_i = jax.tree.map(lambda wi, th: wi - eta * lam * (wi - th), w_i, theta)
    _close(_one(new.personal, c)["params"], theta)
    local_models.append(w_i)
  n = np.array([SIZES[c] for c in IDS], np.float64)
  average = jax.tree.map(lambda *ws: sum(ni / n.sum() * wi for ni, wi in zip(n, ws)), *local_models)
  _close(
    new.global_model["params"], jax.tree.map(lambda a, b: (1 - beta) * a + beta * b, w, average)
  )
  for c in set(range(5)) - set(IDS):  # Unsampled clients keep their personal models.
    _close(_one(new.personal, c), _one(state.personal, c), rtol=0, atol=0)
  # The server sends w (the gap metric's model); clients predict with theta.
  _close(_one(alg.received(new, IDS, None), 1), new.global_model, rtol=0, atol=0)
  _close(_one(alg.personalized(new, IDS, None), 1), _one(new.personal, 2), rtol=0, atol=0)


def test_pfedme_with_one_inner_step_and_eta_lambda_one_is_fedavg(tiny_data):
  """K = 1, eta lam = 1, no l2, beta = 1: w_i tracks theta, which takes plain SGD steps of
  size personal_lr, and the server averages: FedAvg with client_lr = personal_lr, on real
  (random) batches with partial last ones."""
  _, _, pfedme = _build(
    tiny_data,
    "pfedme",
    pfedme_inner_steps=1,
    pfedme_lambda=2.0,
    client_lr=0.5,
    pfedme_personal_lr=0.1,
    pfedme_l2=0.0,
    pfedme_beta=1.0,
  )
  _, _, fedavg = _build(tiny_data, "fedavg", client_lr=0.1)
  state = pfedme.init(jax.random.key(0))
  avg_state = fedavg.init(jax.random.key(1))
  avg_state = avg_state.replace(globals=jax.tree.map(lambda x: x[None], state.global_model))
  batch = tiny_data.train.gather(IDS)
  new, _ = jax.jit(pfedme.round)(state, IDS, batch, RNG)
  expected, _ = jax.jit(fedavg.round)(avg_state, IDS, batch, RNG)
  _close(new.global_model, _one(expected.globals, 0), rtol=1e-4, atol=1e-6)


# FedAMP ---------------------------------------------------------------------------------------


def test_fedamp_round_follows_pfllib(one_example):
  """PFLlib: u_i = sum_{j != i uploaded} xi_ij w_j + (1 - sum xi_ij) w_i with
  xi_ij = alpha exp(-||w_i - w_j||^2 / sigma) / sigma over last round's uploaders; client i
  trains its own w_i on F_i + lambda / (2 alpha) ||w - u_i||^2."""
  alpha, lam, sigma = 0.3, 0.6, 1.0
  config, model, alg = _build(
    one_example, "fedamp", fedamp_alpha=alpha, fedamp_lambda=lam, fedamp_sigma=sigma
  )
  state = alg.init(jax.random.key(0))
  state = state.replace(
    personal=_distinct(state.personal, 0.05), uploaded=jnp.array([1.0, 1.0, 0.0, 0.0, 1.0])
  )
  new, _ = jax.jit(alg.round)(state, IDS, one_example.train.gather(IDS), RNG)
  flat = np.stack([_flat(_one(state.personal, j)["params"]) for j in range(5)])
  mixed = 0
  for c in IDS:
    xi = np.zeros(5)
    for j in (0, 1, 4):  # Last round's uploaders.
      if j != c:
        xi[j] = alpha * np.exp(-np.sum((flat[c] - flat[j]) ** 2) / sigma) / sigma
    xi[c] = 1 - xi.sum()
    mixed += np.sum(xi[np.arange(5) != c] > 1e-3)
    cloud = jax.tree.map(
      lambda x: np.einsum("n,n...->...", xi, np.asarray(x, np.float64)), state.personal["params"]
    )
    expected = _sgd(
      _grad_fn(model, one_example, c),
      _one(state.personal, c)["params"],
      _steps(SIZES[c], config),
      config.client_lr,
      pull=cloud,
      strength=lam / alpha,
    )
    _close(_one(new.personal, c)["params"], expected)
  assert mixed >= 4  # The attention really mixes several models.
  for c in (1, 4):
    _close(_one(new.personal, c), _one(state.personal, c), rtol=0, atol=0)
  np.testing.assert_array_equal(new.uploaded, [1.0, 0.0, 1.0, 1.0, 0.0])


def test_fedamp_with_uniform_attention_sends_everyone_the_plain_average(one_example):
  """sigma -> inf, alpha = sigma / N, everyone uploaded: xi_ij = 1/N for all j, so every
  client's cloud model is the unweighted average of all models (FedAvg-like)."""
  sigma = 1e9
  _, _, alg = _build(one_example, "fedamp", fedamp_sigma=sigma, fedamp_alpha=sigma / 5)
  state = alg.init(jax.random.key(0))
  state = state.replace(personal=_distinct(state.personal, 0.3), uploaded=jnp.ones(5))
  cloud = alg.received(state, np.arange(5), None)
  mean = jax.tree.map(lambda x: np.mean(np.asarray(x, np.float64), axis=0), state.personal)
  for c in range(5):
    _close(_one(cloud, c), mean, rtol=1e-4, atol=1e-5)


# CFL ------------------------------------------------------------------------------------------


def test_cfl_before_any_split_is_fedavg(one_example):
  """Within the warm-up no cluster splits (though the thresholds would split it): cluster 0
  takes FedAvg's n-weighted average."""
  config, model, alg = _build(
    one_example, "cfl", cfl_max_clusters=3, cfl_warmup_rounds=1, cfl_eps1=1e3, cfl_eps2=0.0
  )
  state = alg.init(jax.random.key(0))
  new, metrics = jax.jit(alg.round)(state, IDS, one_example.train.gather(IDS), RNG)
  start = _one(state.clusters.globals, 0)["params"]
  n = np.array([SIZES[c] for c in IDS], np.float64)
  trained = [
    _sgd(_grad_fn(model, one_example, c), start, _steps(SIZES[c], config), config.client_lr)
    for c in IDS
  ]
  expected = jax.tree.map(lambda *ws: sum(ni / n.sum() * wi for ni, wi in zip(n, ws)), *trained)
  _close(_one(new.clusters.globals, 0)["params"], expected)
  for k in (1, 2):  # Unused slots stay as they were.
    _close(_one(new.clusters.globals, k), _one(state.clusters.globals, k), rtol=0, atol=0)
  assert int(new.num_clusters) == 1 and float(metrics["train/num_clusters"]) == 1
  updates = np.stack([_flat(start) - _flat(t) for t in trained])
  np.testing.assert_allclose(
    metrics["train/max_update_norm"], np.linalg.norm(updates, axis=1).max(), rtol=1e-4
  )
  np.testing.assert_allclose(
    metrics["train/mean_update_norm"], np.linalg.norm(n @ updates / n.sum()), rtol=1e-4
  )
  np.testing.assert_array_equal(np.argmax(new.clusters.logits, 1), 0)


def test_cfl_split_follows_the_reference(one_example):
  """felisat/clustered-federated-learning: a cluster whose mean update is small and largest
  update large is bipartitioned by complete linkage on -cos(dW_i, dW_j) (here scipy's);
  each part then averages its own members' updates into a copy of the parent model."""
  config, model, alg = _build(
    one_example, "cfl", cfl_max_clusters=3, cfl_warmup_rounds=0, cfl_eps1=1e3, cfl_eps2=0.0
  )
  state = alg.init(jax.random.key(0))
  ids = np.arange(5)
  new, metrics = jax.jit(alg.round)(state, ids, one_example.train.gather(ids), RNG)
  start = _one(state.clusters.globals, 0)["params"]
  trained = [
    _sgd(_grad_fn(model, one_example, c), start, _steps(SIZES[c], config), config.client_lr)
    for c in ids
  ]
  updates = np.stack([_flat(start) - _flat(t) for t in trained])
  unit = updates / np.linalg.norm(updates, axis=1, keepdims=True)
  distance = 1 - unit @ unit.T  # Same order as -cos: the same complete-linkage merges.
  labels = hierarchy.fcluster(
    hierarchy.linkage(distance[np.triu_indices(5, 1)], "complete"), 2, criterion="maxclust"
  )
  expected_cluster = np.where(labels == labels[0], 0, 1)
  assert 0 < expected_cluster.sum() < 5
  np.testing.assert_array_equal(np.argmax(new.clusters.logits, 1), expected_cluster)
  assert int(new.num_clusters) == 2 and float(metrics["train/num_clusters"]) == 2
  n = np.array(SIZES, np.float64)
  for k in (0, 1):
    part = np.flatnonzero(expected_cluster == k)
    expected = jax.tree.map(
      lambda *ws: sum(n[i] / n[part].sum() * w for i, w in zip(part, ws)),
      *[trained[i] for i in part],
    )
    _close(_one(new.clusters.globals, k)["params"], expected)
  # Each client predicts with its cluster's model.
  models = alg.personalized(new, ids, None)
  for c in ids:
    _close(_one(models, c), _one(new.clusters.globals, expected_cluster[c]), rtol=0, atol=0)


# Two pairs of opposite updates in cluster 0 (mean ~ 0, norms ~ 1; complete linkage pairs
# (0, 1) and (2, 3)), and cluster 1's one member. Slots 0 and 1 of 3 in use.
UPDATES = np.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, -0.1], [0.3, 0.3]], np.float32)
SPLIT = [0, 0, 2, 2, 1]
KEPT = [0, 0, 0, 0, 1]


@jax.jit
def _split(cluster, gram, p, in_use, allowed, eps1, eps2):
  """cfl.split_clusters with 3 slots, compiled once for every case (the thresholds traced)."""
  config = types.SimpleNamespace(cfl_eps1=eps1, cfl_eps2=eps2)
  return cfl.split_clusters(cluster, gram, p, in_use, 3, allowed, config)


@pytest.mark.parametrize(
  "case,expected",
  [
    ({}, SPLIT),  # Cluster 0 splits into slot 2; cluster 1 (one member) does not.
    ({"eps1": 0.0}, KEPT),  # The mean update is not small enough.
    ({"eps2": 2.0}, KEPT),  # No update is large enough.
    ({"p": [1, 0, 1, 0, 1]}, KEPT),  # Only two sampled members (opposite updates: it would split).
    ({"allowed": False}, KEPT),  # Still in the warm-up.
    ({"in_use": 3}, KEPT),  # Every slot is in use.
  ],
)
def test_cfl_split_criterion(case, expected):
  p = np.array(case.get("p", [2, 1, 1, 3, 1]), np.float32)
  in_use = case.get("in_use", 2)
  new, parent, used = _split(
    np.array(KEPT),
    UPDATES @ UPDATES.T,
    p,
    np.int32(in_use),
    case.get("allowed", True),
    case.get("eps1", 0.5),
    case.get("eps2", 0.5),
  )
  np.testing.assert_array_equal(new, expected)
  split = expected == SPLIT and not case
  assert int(used) == in_use + split
  np.testing.assert_array_equal(parent, [0, 1, 0] if split else [0, 1, 2])


_bipartition = jax.jit(cfl.complete_linkage_bipartition)


def test_complete_linkage_bipartition_matches_scipy():
  rng = np.random.default_rng(0)
  for trial in range(5):
    points = rng.normal(size=(8, 3))
    members = rng.random(8) < 0.8
    members[:3] = True
    distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
    got = np.asarray(_bipartition(distance, members))
    idx = np.flatnonzero(members)
    sub = distance[np.ix_(idx, idx)]
    labels = hierarchy.fcluster(
      hierarchy.linkage(sub[np.triu_indices(len(idx), 1)], "complete"), 2, criterion="maxclust"
    )
    expected = np.zeros(8, bool)
    expected[idx] = labels == labels[0]
    np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}")


# FedFomo --------------------------------------------------------------------------------------


def _val_loss(model, data, c, params):
  x, y = (a[:1] for a in data.train.client(c))
  return float(_mean_ce(model, params, x, y))


def _l1(a, b):
  return float(np.sum(np.abs(_flat(a) - _flat(b))))


def test_fedfomo_round_follows_the_reference(one_example):
  """NVlabs/FedFomo: client i picks the M best-affinity models uploaded last round, weighs
  them w_n = (L_i(theta_i) - L_i(theta_n)) / ||theta_n - theta_i||_1 on its held-out
  examples, adds w_n / |sum w| to its affinities, moves to theta_i + sum over positive w of
  w_n / sum(w+) (theta_n - theta_i), then trains on the rest of its examples."""
  config, model, alg = _build(
    one_example, "fedfomo", fedfomo_downloads=2, fedfomo_epsilon=0.0, fedfomo_val_fraction=0.25
  )
  state = alg.init(jax.random.key(0))
  affinity = np.random.default_rng(1).random((5, 5)).astype(np.float32)
  uploaded = np.array([1, 1, 0, 1, 1], np.float32)
  state = state.replace(
    personal=_distinct(state.personal, 0.3),
    affinity=jnp.asarray(affinity),
    uploaded=jnp.asarray(uploaded),
    rounds_done=jnp.int32(3),
  )
  new, _ = jax.jit(alg.round)(state, IDS, one_example.train.gather(IDS), RNG)
  expected_affinity = affinity.copy()
  moved = 0
  for c in IDS:
    own = _one(state.personal, c)["params"]
    others = [j for j in range(5) if uploaded[j] and j != c]
    candidates = sorted(others, key=lambda j: -affinity[c, j])[:2]
    models = [_one(state.personal, j)["params"] for j in candidates]
    w = np.array(
      [
        (_val_loss(model, one_example, c, own) - _val_loss(model, one_example, c, m)) / _l1(m, own)
        for m in models
      ]
    )
    expected_affinity[c, candidates] += w / abs(w.sum())
    start = own
    if (w > 0).any():
      moved += 1
      share = np.maximum(w, 0) / np.maximum(w, 0).sum()
      start = jax.tree.map(
        lambda o, *ms: o + sum(s * (m - o) for s, m in zip(share, ms)), own, *models
      )
    n = SIZES[c]
    train_n = n - max(int(0.25 * n), 1)
    expected = _sgd(
      _grad_fn(model, one_example, c), start, _steps(train_n, config), config.client_lr
    )
    _close(_one(new.personal, c)["params"], expected)
  assert moved >= 2  # The combination step really ran.
  np.testing.assert_allclose(new.affinity, expected_affinity, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(new.uploaded, [1.0, 0.0, 1.0, 1.0, 0.0])
  for c in (1, 4):
    _close(_one(new.personal, c), _one(state.personal, c), rtol=0, atol=0)
  assert alg.communication[0] == 2 * alg.communication[1]  # Two models down, one up.


def test_fedfomo_with_one_candidate_takes_it_if_better_else_keeps_its_own(one_example):
  """M = 1: the single positive weight normalises to 1, so the client starts from the
  candidate itself; a candidate no better than its own model leaves it unchanged."""
  _, model, alg = _build(one_example, "fedfomo", fedfomo_downloads=1)
  state = alg.init(jax.random.key(0))
  own = _one(state.personal, 0)["params"]
  candidate = jax.tree.map(lambda p, g: p - 2.0 * g, own, _grad_fn(model, one_example, 0)(own))
  personal = jax.tree.map(lambda x, c: x.at[1].set(c), state.personal["params"], candidate)
  state = state.replace(personal={"params": personal}, uploaded=jnp.array([0.0, 1, 0, 0, 0]))
  ids = np.array([0, 2, 3, 4])
  start = alg.received(state, ids, one_example.train.gather(ids))
  branches = set()
  for row, c in enumerate(ids):
    better = _val_loss(model, one_example, c, candidate) < _val_loss(model, one_example, c, own)
    branches.add(better)
    _close(_one(start, row)["params"], candidate if better else own, rtol=1e-6, atol=1e-6)
  assert branches == {True, False}


def test_fedfomo_validation_split_is_fixed_disjoint_and_padding_free():
  x = np.arange(10, dtype=np.float32)[:, None]
  key = jax.random.key(5)
  splits = [
    jax.jit(fedfomo.validation_split, static_argnums=2)(
      ClientData(np.pad(x, ((0, pad), (0, 0))), np.arange(10 + pad), np.int32(10)), key, 0.2
    )
    for pad in (0, 6)
  ]
  for train_part, val in splits:
    assert int(train_part.count) == 8 and int(val.count) == 2
    rows = sorted(np.asarray(train_part.y[:8]).tolist() + np.asarray(val.y[:2]).tolist())
    assert rows == list(range(10))  # Disjoint, and every real example is in one of them.
  np.testing.assert_array_equal(splits[0][1].y[:2], splits[1][1].y[:2])
  assert [v.y.shape[0] for _, v in splits] == [2, 3]  # Validation rows only, not the padding.


def test_fedfomo_validation_part_is_short_and_holds_every_held_out_example():
  """Every count up to the padded length (37): the short validation part holds all its
  held-out examples, and with the training part they are the client's examples once each."""
  length = 37
  counts = np.arange(1, length + 1, dtype=np.int32)
  data = ClientData(np.zeros((length, 1), np.float32), np.arange(length), counts)
  split = jax.vmap(fedfomo.validation_split, in_axes=(ClientData(None, None, 0), None, None))
  for fraction in (0.1, 0.7):  # 0.7: float32 0.7 x 10 rounds to 7, float64 to 6.99...
    train_part, val = jax.device_get(
      jax.jit(split, static_argnums=2)(data, jax.random.key(3), fraction)
    )
    assert val.y.shape[1] < length
    for n, t_y, t_n, v_y, v_n in zip(counts, train_part.y, train_part.count, val.y, val.count):
      held = int(np.floor(np.float32(fraction) * np.float32(n)))  # float32, as the module.
      assert v_n == (max(held, 1) if n >= 2 else 0)
      assert sorted(t_y[:t_n].tolist() + v_y[:v_n].tolist()) == list(range(n)), (fraction, n)


def test_fedfomo_candidates_are_epsilon_greedy_among_last_uploaders():
  choose = jax.jit(fedfomo.choose_candidates, static_argnums=3)
  affinity = jnp.array([0.0, 5.0, 1.0, 4.0, 3.0, 2.0])
  available = jnp.array([False, True, False, True, True, True])
  chosen, valid = choose(jax.random.key(0), affinity, available, 2, 0.0)
  assert set(np.asarray(chosen).tolist()) == {1, 3} and bool(valid.all())
  seen = set()
  for seed in range(20):
    chosen, valid = choose(jax.random.key(seed), affinity, available, 2, 1.0)
    assert bool(valid.all()) and set(np.asarray(chosen).tolist()) <= {1, 3, 4, 5}
    seen |= set(np.asarray(chosen).tolist())
  assert seen == {1, 3, 4, 5}  # Exploration reaches clients outside the top 2.
  chosen, valid = choose(jax.random.key(0), affinity, jnp.arange(6) == 4, 2, 0.0)
  assert np.asarray(chosen)[np.asarray(valid)].tolist() == [4] and int(valid.sum()) == 1


# All four in the engine -----------------------------------------------------------------------

E2E = {
  "pfedme": (TinyBN, {}),
  "fedamp": (TinyDropout, {}),
  "fedfomo": (TinyDropout, {}),
  "cfl": (
    TinyBN,
    {"cfl_warmup_rounds": 1, "cfl_eps1": 1e3, "cfl_eps2": 0.0, "cfl_max_clusters": 3},
  ),
}


# Resumed too: the states beyond per-client models (FedFomo's [N, N] affinities, upload mask and
# round count; CFL's cluster count and round count). pFedMe's and FedAMP's state (models and
# an [N] mask) checkpoints as Ditto's does; each resume costs a second run's time.
RESUMED = ("fedfomo", "cfl")


@pytest.mark.parametrize("algorithm", list(E2E))
def test_runs_chunked_under_partial_participation_and_resumes_exactly(
  tiny_data, tmp_path, algorithm
):
  """BatchNorm or dropout, 3 of 5 clients a round, vmapped chunks of 2; for RESUMED, round 2
  redone from round 1's checkpoint gives the same metrics (CFL splits in round 2; FedFomo's
  round 2 draws on round 1's uploads). Both rounds evaluate: one round program to compile
  (an evaluating round's batch holds the test split as well)."""
  model_type, overrides = E2E[algorithm]
  config = tiny_base_config()
  config.update(
    algorithm=algorithm,
    clients_per_round=3,
    client_chunk_size=2,
    client_parallelism="vmap",
    checkpoint_every=1,
    eval_every=1,
    tensorboard=False,
    **overrides,
  )
  workdir = str(tmp_path)
  straight = train.train_and_evaluate(config, workdir, data=tiny_data, model=model_type())
  for key in ("test/acc_mean", "test/loss", "train/loss", "gap/acc_mean", "val/loss"):
    assert np.isfinite(straight[key]), key
  if algorithm in RESUMED:
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))
    resumed = train.train_and_evaluate(config, workdir, data=tiny_data, model=model_type())
    for key in ("test/acc_mean", "test/loss", "train/loss", "gap/acc_mean", "val/loss"):
      np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-6, err_msg=key)
  if algorithm == "cfl":
    assert straight["train/num_clusters"] > 1
