"""Shared fixtures: tiny federations and configs that run in seconds on CPU."""

import os
import shutil
import tempfile

# Compile each computation once per test run: tests (and the runs they start in subprocesses,
# which inherit the environment) build the same rounds again and again, and XLA's persistent
# cache serves an identical program from disk in milliseconds. A cache of one's own
# (JAX_COMPILATION_CACHE_DIR) is kept; otherwise each run gets a fresh one, removed at the end,
# so a run times what a fresh machine does. Set before JAX is imported: it reads these then.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedmerge_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Tests run tiny programs a few times each: LLVM's optimisations cost more compile time than
# they save (XLA's own graph optimisations still run; no fast-math either way), and XLA:CPU's
# older elemental emitters compile a fusion ~2.5x faster than its MLIR fusion emitters, with
# the same results (a ResNet-9 FedMerge round: 6.6 -> 2.8 CPU-s, equal loss, run time alike).
# A flag of one's own in XLA_FLAGS is kept; xdist workers and subprocesses inherit these.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
for _flag in TEST_XLA_FLAGS.split():
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# Runs end without plots (reporting.PLOTS_ENV; ~1 CPU-s a run, most tests check metrics), in
# subprocesses too; a test or module marked `plots` draws them (the `_plots_if_marked` fixtures).
os.environ.setdefault("FEDMERGE_JAX_PLOTS", "0")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import pytest

from fedmerge_jax.config import base_config
from fedmerge_jax import reporting
from fedmerge_jax.data import FederatedData
from fedmerge_jax.models.layers import BatchNorm


class TinyBN(nn.Module):
  """Dense -> BatchNorm (PyTorch's running variance, masked) -> relu -> head: a small BatchNorm
  model that compiles in a blink."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    x = nn.Dense(5)(x.reshape(x.shape[0], -1).astype(jnp.float32))
    x = BatchNorm(use_running_average=not train, unbiased_running_var=True)(x, mask)
    return nn.Dense(self.num_classes, name="head")(nn.relu(x))


class TinyDropout(nn.Module):
  """Dense -> dropout 0.5 -> head: a small model whose training draws random masks."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1).astype(jnp.float32)))
    return nn.Dense(self.num_classes, name="head")(nn.Dropout(0.5, deterministic=not train)(x))


def make_federation(
  num_clients=5, sizes=None, example_shape=(4, 4, 1), num_classes=3, seed=0, test_size=6, val_size=4
):
  """Random federation with uneven client sizes (default 3..3+2*(N-1) examples)."""
  rng = np.random.default_rng(seed)
  sizes = sizes or [3 + 2 * i for i in range(num_clients)]

  def split(n):
    return (
      rng.normal(size=(n, *example_shape)).astype(np.float32),
      rng.integers(0, num_classes, n).astype(np.int32),
    )

  train = {f"c{i}": split(n) for i, n in enumerate(sizes)}
  test = {f"c{i}": split(test_size) for i in range(len(sizes))}
  val = {f"c{i}": split(val_size) for i in range(len(sizes))} if val_size else None
  return FederatedData.from_arrays(train, test, val, num_classes=num_classes)


def one_example_federation(sizes):
  """Clients whose examples are copies of one (x, y) each: any batching gives the same
  batch gradient, so the papers' plain gradient loops are exact references."""
  rng = np.random.default_rng(3)
  one = lambda n: (
    np.repeat(rng.normal(size=(1, 4, 4, 1)).astype(np.float32), n, 0),
    np.full(n, rng.integers(0, 3), np.int32),
  )
  train = {f"c{i}": one(n) for i, n in enumerate(sizes)}
  test = {f"c{i}": one(2) for i in range(len(sizes))}
  return FederatedData.from_arrays(train, test, num_classes=3)


@pytest.fixture
def tiny_data():
  return make_federation()


def tiny_base_config():
  """A config for tiny_data-sized federations: a small MLP, K = 3, 2 rounds."""
  config = base_config()
  config.num_global_models = 3
  config.num_rounds = 2
  config.eval_every = 1
  config.local_epochs = 2
  config.batch_size = 4
  config.client_lr = 0.1
  config.prox_mu = 0.01
  config.server_lr_logits = 0.5
  config.model.name = "mlp"
  config.model.hidden_sizes = (8,)
  return config


@pytest.fixture
def tiny_config():
  return tiny_base_config()


def _plots_if_marked(node):
  """Turns end-of-run plots on while `node` (a test or a module) is marked `plots`."""
  if node.get_closest_marker("plots") is None:
    yield
    return
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(reporting.PLOTS_ENV, "1")
    yield


@pytest.fixture(autouse=True, scope="module")
def _module_plots(request):
  """Before the module's own module-scoped fixtures (autouse ones come first in a scope)."""
  yield from _plots_if_marked(request.node)


@pytest.fixture(autouse=True)
def _test_plots(request):
  yield from _plots_if_marked(request.node)


def pytest_sessionfinish(session):
  """Remove this run's compilation cache, in the process that made it (xdist workers inherit
  the folder, so for them it is not their own)."""
  del session
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
