"""FedBN, FedPer, FedRep, APFL and Per-FedAvg: one round against plain per-client references
written here from the papers and the authors' code, and their identities with FedAvg.

Clients are unequal with partial last batches (batch 4) and only some are sampled. Where
local training is the method (FedRep's phases, APFL's three steps, Per-FedAvg's inner and
outer steps) the reference writes the gradient loop out, on clients whose examples are
copies of one (x, y): any batching then gives the same batch gradient, so the loop is
exact. Where local training is FedAvg's (FedBN, FedPer) the reference trains each client
with `client.local_train` and applies the method's rule itself.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from conftest import TinyBN, make_federation, one_example_federation, tiny_base_config
from fedmerge_jax import algorithms, client, parallel, train
from fedmerge_jax import models as models_lib
from fedmerge_jax.config import ConfigError, resolve

IDS = np.array([0, 1, 3])  # Clients 2 and 4 are not sampled.
RNG = jax.random.key(11)
SIZES = (6, 10, 7, 5, 9)  # Batch 4: last batches of 2, 2, 3, 1, 1.


@pytest.fixture(scope="module")
def copies():
  """Clients whose examples are copies of one (x, y) each (module docstring)."""
  return one_example_federation(SIZES)


@pytest.fixture(scope="module")
def random_data():
  return make_federation(sizes=list(SIZES))


def _build(data, algorithm, model=None, **overrides):
  config = tiny_base_config()
  config.algorithm = algorithm
  config.local_epochs = 1
  for key, value in overrides.items():
    config[key] = value
  config = resolve(config)
  model, alg = train.build(config, data, model=model)
  return config, model, alg


def _one(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _round(alg, data, state=None, ids=IDS, rng=RNG):
  state = alg.init(jax.random.key(0)) if state is None else state
  new, _ = jax.jit(alg.round)(state, ids, data.train.gather(ids), rng)
  return state, new


def _models(alg, state, data, ids=np.arange(5)):
  return jax.jit(alg.personalized)(state, ids, data.train.gather(ids))


def _sent(alg, state):
  return jax.jit(alg.received)(state, np.arange(5), None)


def _fedavg_init(data, model=None):
  """Every method starts from FedAvg's initial model (same seed, same init)."""
  _, _, avg = _build(data, "fedavg", model)
  return _one(jax.jit(avg.init)(jax.random.key(0)).globals, 0)


_local_train = jax.jit(client.local_train, static_argnums=(0, 4), static_argnames=("takes_mask",))


def _p(data, ids=IDS):
  n = data.train.counts[ids].astype(np.float64)
  return n / n.sum()


def _split_by(tree, is_personal):
  """{path: leaf} of the personal and of the shared leaves, by a rule on the path string."""
  flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}
  return (
    {k: v for k, v in flat.items() if is_personal(k)},
    {k: v for k, v in flat.items() if not is_personal(k)},
  )


def _shared_part_rule(data, alg, model, init, is_personal):
  """The rule FedBN and FedPer share, checked against `local_train` per client: the sampled
  clients' shared leaves averaged (n-weighted), each sampled client's personal leaves its own
  trained ones, an unsampled client's personal leaves unchanged."""
  local = client.LocalConfig(1, 4, 0.1, 0.0)  # tiny_base_config's, one epoch, no prox term.
  trained = {}
  batch = data.train.gather(IDS)  # One padded length: one compile of local_train for all.
  for row, c in enumerate(IDS):
    d = jax.tree.map(lambda a: jnp.asarray(a[row]), batch)
    start = init  # Round 1: every client starts from the initial model.
    delta, _ = _local_train(
      model.apply,
      start,
      d,
      jax.random.fold_in(RNG, c),
      local,
      takes_mask=models_lib.takes_mask(model),
    )
    trained[c] = _split_by(jax.tree.map(jnp.subtract, start, delta), is_personal)
  _, new = _round(alg, data)
  models = _models(alg, new, data)
  p = _p(data)
  average = {k: sum(pc * trained[c][1][k] for pc, c in zip(p, IDS)) for k in trained[IDS[0]][1]}
  init_personal = _split_by(init, is_personal)[0]
  for i in range(5):
    personal, shared = _split_by(_one(models, i), is_personal)
    _close(shared, average)
    _close(personal, trained[i][0] if i in IDS else init_personal, rtol=1e-5)


def test_fedbn_keeps_batch_norm_local_and_averages_the_rest(random_data):
  _, model, alg = _build(random_data, "fedbn", TinyBN())
  init = _fedavg_init(random_data, TinyBN())
  # The authors' rule: every key of a BatchNorm layer ('bn' in their names) stays local.
  _shared_part_rule(random_data, alg, model, init, lambda path: "BatchNorm" in path)
  # It uploads everything but the BatchNorm layer's scale, bias, mean and variance.
  size = sum(x.size for x in jax.tree.leaves(init))
  assert alg.communication == (size - 4 * 5, size - 4 * 5)


def test_fedper_keeps_the_head_local_and_averages_the_body(random_data):
  _, model, alg = _build(random_data, "fedper")
  init = _fedavg_init(random_data)
  _shared_part_rule(random_data, alg, model, init, lambda path: path.startswith("params/head/"))
  body = sum(x.size for k, x in _split_by(init, lambda p: "head" in p)[1].items())
  assert alg.communication == (body, body)


@pytest.mark.parametrize(
  "algorithm,overrides", [("fedbn", {}), ("fedper", {"personal_layers": ()})]
)
def test_without_personal_layers_fedbn_and_fedper_are_fedavg(random_data, algorithm, overrides):
  """FedBN on a model without BatchNorm, FedPer with no local layer: FedAvg, two rounds."""
  _, _, avg = _build(random_data, "fedavg")
  _, _, alg = _build(random_data, algorithm, **overrides)
  state_avg, state = avg.init(jax.random.key(0)), alg.init(jax.random.key(0))
  for r, ids in enumerate((IDS, np.array([1, 4, 2]))):
    _, state_avg = _round(avg, random_data, state_avg, ids, jax.random.fold_in(RNG, r))
    _, state = _round(alg, random_data, state, ids, jax.random.fold_in(RNG, r))
  _close(_models(alg, state, random_data), _models(avg, state_avg, random_data), rtol=1e-6)
  assert alg.communication == avg.communication


def test_personal_layers_must_exist(random_data):
  with pytest.raises(ConfigError, match="no top-level layer 'classifier'.*'head'"):
    _build(random_data, "fedper", personal_layers=("classifier",))


def _loss(model, x, y):
  return lambda params: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": params}, x), y
  ).mean()


def _gradient(model):
  """Jitted (params, x, y) -> grad of the mean CE: one compile for every client's loop."""
  return jax.jit(lambda params, x, y: jax.grad(_loss(model, x, y))(params))


def _example(data, c):
  return tuple(jnp.asarray(a[:1]) for a in data.train.client(c))


def _steps(data, c, epochs, batch=4):
  return epochs * -(-int(data.train.counts[c]) // batch)


@pytest.mark.parametrize("head_epochs", [2, 0])
def test_fedrep_trains_the_head_then_the_body(copies, head_epochs):
  """lgcollins/FedRep: head epochs with the body frozen, then body epochs with the head
  frozen; the server averages the bodies; heads stay (unsampled: the initial head)."""
  _, model, alg = _build(copies, "fedrep", fedrep_head_epochs=head_epochs, local_epochs=2)
  init = _fedavg_init(copies)["params"]
  is_head = lambda path: path[0].key == "head"
  heads, bodies = {}, {}
  gradient = _gradient(model)
  for c in IDS:
    w = init
    for epochs, train_head in ((head_epochs, True), (2, False)):
      for _ in range(_steps(copies, c, epochs)):
        grad = gradient(w, *_example(copies, c))
        w = jax.tree_util.tree_map_with_path(
          lambda path, v, g: v - 0.1 * g if is_head(path) == train_head else v, w, grad
        )
    heads[c], bodies[c] = w["head"], {k: v for k, v in w.items() if k != "head"}
  _, new = _round(alg, copies)
  models = _models(alg, new, copies)["params"]
  p = _p(copies)
  body = jax.tree.map(lambda *b: sum(pc * bc for pc, bc in zip(p, b)), *[bodies[c] for c in IDS])
  for i in range(5):
    mine = _one(models, i)
    _close({k: v for k, v in mine.items() if k != "head"}, body, rtol=1e-4)
    expected_head = heads[i] if i in IDS else init["head"]
    _close(mine["head"], expected_head, rtol=1e-4)
    if head_epochs == 0:  # No head epochs: every head is still the initial one, exactly.
      _close(mine["head"], init["head"], rtol=0, atol=0)


def test_apfl_follows_algorithm_1(copies):
  """Deng et al. 2020, Alg. 1: per step w -= eta grad f(w); v -= eta alpha grad f(vbar);
  alpha -= eta <v - w, grad f(vbar)>, projected on [0, 1]; the server averages w."""
  eta, alpha0 = 0.5, 0.1  # alpha leaves [0, 1] for clients 1 and 3: the projection binds.
  _, model, alg = _build(copies, "apfl", client_lr=eta, apfl_alpha=alpha0)
  init = _fedavg_init(copies)["params"]
  trained, projected = {}, False
  gradient = _gradient(model)
  for c in IDS:
    example = _example(copies, c)
    w, v, alpha = init, init, alpha0
    for _ in range(_steps(copies, c, 1)):
      vbar = jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v, w)
      g_w, g_bar = gradient(w, *example), gradient(vbar, *example)
      dot = sum(
        jnp.vdot(a - b, g)
        for a, b, g in zip(jax.tree.leaves(v), jax.tree.leaves(w), jax.tree.leaves(g_bar))
      )
      projected |= not 0 <= alpha - eta * dot <= 1
      w, v, alpha = (
        jax.tree.map(lambda a, g: a - eta * g, w, g_w),
        jax.tree.map(lambda a, g: a - eta * alpha * g, v, g_bar),
        float(np.clip(alpha - eta * dot, 0.0, 1.0)),
      )
    trained[c] = (w, v, alpha)
  assert min(abs(trained[c][2] - alpha0) for c in IDS) > 1e-4 and projected
  _, new = _round(alg, copies)
  alphas = np.asarray(new.personal["params"]["alpha"])
  np.testing.assert_allclose(
    alphas, [trained[i][2] if i in IDS else alpha0 for i in range(5)], atol=1e-6
  )
  p = _p(copies)
  w = jax.tree.map(lambda *ws: sum(pc * wc for pc, wc in zip(p, ws)), *[trained[c][0] for c in IDS])
  x = jnp.asarray(copies.test.client(0)[0])
  predict = jax.jit(jax.vmap(alg.predict, in_axes=(0, None)))
  ours, sent = predict(_models(alg, new, copies), x), predict(_sent(alg, new), x)
  for i in range(5):
    _, v, alpha = trained[i] if i in IDS else (None, init, alpha0)
    vbar = jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v, w)
    _close(ours[i], model.apply({"params": vbar}, x), rtol=1e-4, atol=1e-5)
    _close(sent[i], model.apply({"params": w}, x), rtol=1e-4, atol=1e-5)


def test_apfl_with_alpha_zero_predicts_with_fedavgs_model(random_data):
  _, _, avg = _build(random_data, "fedavg")
  _, _, alg = _build(random_data, "apfl", apfl_alpha=0.0, apfl_adaptive_alpha=False)
  _, state_avg = _round(avg, random_data)
  _, state = _round(alg, random_data)
  x = jnp.asarray(random_data.test.gather(np.arange(5)).x)
  ours = jax.jit(jax.vmap(alg.predict))(_models(alg, state, random_data), x)
  _close(ours, jax.jit(jax.vmap(avg.predict))(_models(avg, state_avg, random_data), x), rtol=1e-5)


def _hessian_vector(model):
  """Jitted (w, x, y, vector) -> Hess f(w) vector, from the full Hessian matrix."""

  @jax.jit
  def product(w, x, y, vector):
    flat, unravel = ravel_pytree(w)
    hessian = jax.hessian(lambda f: _loss(model, x, y)(unravel(f)))(flat)
    return unravel(hessian @ ravel_pytree(vector)[0])

  return product


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_meta_steps_and_one_step_personalisation(copies, variant):
  """Fallah et al. 2020: w_tmp = w - alpha grad f(w; D); w -= beta grad f(w_tmp; D') (FO) or
  beta (I - alpha Hess f(w)) grad f(w_tmp; D') (HF); D, D' the halves of 2 x 4 examples, no
  step where D' is empty; a client predicts with w - alpha grad f(w) on its training data."""
  alpha, beta = 0.3, 0.2
  _, model, alg = _build(
    copies, "perfedavg", client_lr=beta, perfedavg_alpha=alpha, perfedavg_variant=variant
  )
  init = _fedavg_init(copies)["params"]
  trained = []
  gradient, hessian_vector = _gradient(model), _hessian_vector(model)
  for c in IDS:
    example, w, n = _example(copies, c), init, int(copies.train.counts[c])
    for start in range(0, n, 8):
      if n - start <= 4:  # D' empty: no step.
        continue
      w_tmp = jax.tree.map(lambda a, g: a - alpha * g, w, gradient(w, *example))
      outer = gradient(w_tmp, *example)
      if variant == "hf":
        hv = hessian_vector(w, *example, outer)
        outer = jax.tree.map(lambda g, h: g - alpha * h, outer, hv)
      w = jax.tree.map(lambda a, g: a - beta * g, w, outer)
    trained.append(w)
  _, new = _round(alg, copies)
  w = jax.tree.map(lambda *ws: sum(pc * wc for pc, wc in zip(_p(copies), ws)), *trained)
  _close(
    _sent(alg, new)["params"],
    jax.tree.map(lambda x: jnp.broadcast_to(x, (5,) + x.shape), w),
    rtol=1e-4,
    atol=1e-6,
  )
  models = _models(alg, new, copies)["params"]
  for i in range(5):
    step = gradient(w, *_example(copies, i))
    _close(_one(models, i), jax.tree.map(lambda a, g: a - alpha * g, w, step), rtol=1e-4, atol=1e-6)


def test_batch_norm_rounds_do_not_depend_on_parallelism_or_chunks(random_data):
  """A BatchNorm model, unequal clients, 4 of 5 sampled: vmapped chunks of 2, one at a time.
  APFL: personal and shared BatchNorm statistics, personal parameters and alpha, in the
  round every partial-sharing method runs (its chunked sum and personal rows); two whole
  chunks, a compile cheaper than a chunk and a rest (map_clients' rest: test_parallel)."""
  ids = np.array([0, 1, 3, 4])
  states = []
  for parallelism, chunk in (("vmap", 2), ("sequential", 0)):
    _, _, alg = _build(
      random_data, "apfl", TinyBN(), client_parallelism=parallelism, client_chunk_size=chunk
    )
    states.append(_round(alg, random_data, ids=ids)[1])
  _close(states[1], states[0], rtol=1e-5)
  before = _one(alg.init(jax.random.key(0)).personal, 2)  # The unsampled client's row, exactly.
  _close(_one(states[0].personal, 2), before, rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["fedbn", "fedper", "fedrep", "apfl", "perfedavg"])
def test_only_personal_leaves_look_per_client(random_data, algorithm):
  """train.py shards and cuts phantoms from leaves whose first axis is the (padded) population:
  with 16 rows, the MLP's 16-input kernel must not look like one (the shared part is [1, ...])."""
  config, model, _ = _build(random_data, algorithm)
  alg = algorithms.get_algorithm(model, config, 16, jnp.zeros((4, 4, 1)))
  state = jax.eval_shape(alg.init, jax.random.key(0))
  shared = jax.tree.leaves((state.shared, state.opt_state))
  assert not any(parallel.is_per_client(x, 16) for x in shared)
  assert all(parallel.is_per_client(x, 16) for x in jax.tree.leaves(state.personal))
