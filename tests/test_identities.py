"""Identities between algorithms, with a BatchNorm model, partial last batches and partial
participation: each method that reduces to FedAvg in some setting gives FedAvg's round there.

FedAvg's own round is checked against its paper in test_algorithms.py; here every other
method is compared with it. The model has BatchNorm (masked statistics, which the methods
merge and average like parameters) and no dropout: FedEM draws a component's dropout masks
from a key of its own, so with dropout FedEM(K = 1) is FedAvg only in distribution.
"""

import jax
import numpy as np
import pytest

from conftest import TinyBN, make_federation, tiny_base_config
from fedmerge_jax import train
from fedmerge_jax.config import resolve

SIZES = [3, 5, 7, 9, 11]  # Batch 4: every client ends its epochs with a partial batch.
SAMPLED = np.array([0, 2, 3])  # Partial participation: 3 of 5 clients.
EVERYONE = np.arange(5)
RNG = jax.random.key(7)


@pytest.fixture(scope="module")
def data():
  return make_federation(sizes=SIZES)


def build(data, algorithm, **overrides):
  config = tiny_base_config()
  config.algorithm, config.num_global_models, config.prox_mu = algorithm, 1, 0.0
  config.update_from_flattened_dict(overrides)
  return train.build(resolve(config), data, model=TinyBN(data.num_classes))[1]


def one_round(alg, data, ids, globals_):
  """alg's state after one round from the shared initial globals (leaves [1, ...])."""
  state = alg.init(jax.random.key(0))
  if hasattr(state, "components"):  # FedEM.
    state = state.replace(components=globals_)
  elif hasattr(state, "server"):  # Ditto: FedAvg's state inside.
    state = state.replace(server=state.server.replace(globals=globals_))
  else:
    state = state.replace(globals=globals_)
  return jax.jit(alg.round)(state, ids, data.train.gather(ids), RNG)[0]


def shared_models(state):
  """The models the server shares (leaves [1, ...])."""
  if hasattr(state, "components"):
    return state.components
  return state.server.globals if hasattr(state, "server") else state.globals


def assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.fixture(scope="module")
def fedavg(data):
  """FedAvg's initial globals and its round from them, for the sampled clients and for all."""
  alg = build(data, "fedavg")
  start = alg.init(jax.random.key(0)).globals
  after = {len(ids): one_round(alg, data, ids, start).globals for ids in (SAMPLED, EVERYONE)}
  moved = [
    float(np.abs(np.asarray(a) - np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(after[3]["batch_stats"]), jax.tree.leaves(start["batch_stats"]))
  ]
  assert min(moved) > 1e-3, "the test needs BatchNorm statistics that move"
  return start, after


@pytest.mark.parametrize(
  "algorithm,overrides",
  [
    ("fedprox", {}),  # prox_mu = 0.
    ("fedmerge", {"update_mode": "official"}),  # K = 1, prox 0: server lr 1.
    ("fedmerge", {"update_mode": "gradient"}),  # K = 1, prox 0, sgd with server lr 1.
    ("ifca", {}),  # K = 1: every client joins the one cluster.
    ("ditto", {}),  # Its global model is trained exactly as FedAvg's.
  ],
  ids=["fedprox_mu0", "fedmerge_official_k1", "fedmerge_gradient_k1", "ifca_k1", "ditto_global"],
)
def test_reduces_to_fedavg(data, fedavg, algorithm, overrides):
  start, after = fedavg
  state = one_round(build(data, algorithm, **overrides), data, SAMPLED, start)
  assert_close(shared_models(state), after[len(SAMPLED)])


def test_fedem_with_one_component_is_fedavg(data, fedavg):
  """All clients: FedAvg. Sampled: the reference's n_i / n_total weights make the step the
  sampled share of the data times FedAvg's (fedem.py's docstring)."""
  start, after = fedavg
  alg = build(data, "fedem")
  assert_close(one_round(alg, data, EVERYONE, start).components, after[len(EVERYONE)])
  share = sum(SIZES[i] for i in SAMPLED) / sum(SIZES)
  scaled = jax.tree.map(lambda s, a: s + share * (a - s), start, after[len(SAMPLED)])
  assert_close(one_round(alg, data, SAMPLED, start).components, scaled)
