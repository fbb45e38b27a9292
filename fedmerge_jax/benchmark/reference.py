"""The loop reference: FedJAX's way of running a round, a jitted SGD step per batch called
from a Python loop over clients and batches, on the same data and clients as the rounds."""

import statistics
import time
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmerge_jax import client as client_lib
from fedmerge_jax import data as data_lib
from fedmerge_jax import models
from fedmerge_jax.benchmark.workloads import setting
from fedmerge_jax.models.layers import resolve_conv_impl


def local_config(config) -> client_lib.LocalConfig:
  """The local training settings of a resolved config."""
  return client_lib.LocalConfig(
    config.local_epochs, config.batch_size, config.client_lr, config.prox_mu, config.local_batching
  )


def useful_examples(counts, local_epochs: int) -> int:
  """Real examples x epochs: what a round of clients with `counts` must train on."""
  return int(np.sum(counts)) * local_epochs


def median_time(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn()` (which blocks until done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def sgd_step_fn(model, learning_rate: float):
  """One SGD step on one batch, mean CE (FedJAX's per-batch step): (params, x, y, rng) -> params."""

  def loss_fn(params, other, x, y, rng):
    mutable = list(other)  # BatchNorm statistics follow the model's train-mode updates.
    logits, new_other = model.apply(
      {"params": params, **other}, x, train=True, rngs={"dropout": rng}, mutable=mutable
    )
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new_other

  def step(variables, x, y, rng):
    other = {k: v for k, v in variables.items() if k != "params"}
    grads, new_other = jax.grad(loss_fn, has_aux=True)(variables["params"], other, x, y, rng)
    new = jax.tree.map(lambda p, g: p - learning_rate * g, variables["params"], grads)
    return {**new_other, "params": new}

  return step


def client_batches(rng, n: int, local: client_lib.LocalConfig) -> List[np.ndarray]:
  """One client's batches of example indices, in FedJAX's / PyTorch's way on the host:
  'epoch': per epoch a permutation cut into ceil(n/B) batches, the last partial; 'stream':
  the epochs' permutations concatenated, then cut into ceil(nE/B) batches."""
  orders = [rng.permutation(n) for _ in range(local.local_epochs)]
  b = local.batch_size
  if local.batching == "stream":
    order = np.concatenate(orders)
    return [order[i : i + b] for i in range(0, len(order), b)]
  return [order[i : i + b] for order in orders for i in range(0, n, b)]


def loop_reference(
  config, data: data_lib.FederatedData, rounds: Sequence[np.ndarray], warmup_rounds: int = 1
) -> Dict[str, Any]:
  """FedJAX's default backend: a jitted SGD step per batch from a Python loop; FedAvg server.

  Same model (with `config.model.conv_impl`), data, clients, batch size, epochs and
  batching as the rounds; each client runs its own batches of its own examples (shuffled
  with NumPy on the host, as FedJAX does; a partial last batch is a smaller shape, compiled
  once per size during the warm-up) from the global model; the server averages the trained
  models by examples. `rounds`: each timed round's client ids.
  """
  model = models.get_model(config.model, data.num_classes)
  variables = model.init(jax.random.key(config.seed), jnp.zeros((1, *data.example_shape)))
  step = jax.jit(sgd_step_fn(model, config.client_lr))
  average = jax.jit(
    lambda trained, p: jax.tree.map(lambda *xs: sum(w * x for w, x in zip(p, xs)), *trained)
  )
  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  local = local_config(config)
  counts = data.train.counts

  def one_round(global_vars, ids):
    trained = []
    for c in ids:
      params = global_vars
      x, y = data.train.client(int(c))
      for t, idx in enumerate(client_batches(rng, int(counts[c]), local)):
        params = step(params, x[idx], y[idx], jax.random.fold_in(key, int(c) * 100_000 + t))
      trained.append(params)
    p = counts[ids] / counts[ids].sum()
    return jax.block_until_ready(average(trained, list(p)))

  # Warm-up: every batch size (and every number of averaged clients) the timed rounds use.
  holder = {"vars": variables}
  sizes = {
    b
    for ids in rounds
    for c in ids
    for b in map(len, client_batches(np.random.default_rng(0), int(counts[c]), local))
  }
  start = time.perf_counter()
  for _ in range(warmup_rounds):
    holder["vars"] = one_round(holder["vars"], rounds[0])
  x, y = data.train.client(0)
  for b in sizes:
    idx = np.arange(b) % len(y)
    jax.block_until_ready(step(holder["vars"], x[idx], y[idx], key))
  compile_s = time.perf_counter() - start
  seconds, useful = [], []
  for ids in rounds:
    start = time.perf_counter()
    holder["vars"] = one_round(holder["vars"], ids)
    seconds.append(time.perf_counter() - start)
    useful.append(useful_examples(counts[ids], config.local_epochs))
  rate = statistics.median(u / s for u, s in zip(useful, seconds))
  return {
    "kind": "reference",
    "execution": "python loop of jitted SGD steps (FedJAX)",
    **setting(config, data),
    "conv_impl": resolve_conv_impl(config.model.conv_impl),
    "round_s": statistics.median(seconds),
    "compile_s": compile_s,
    "examples_per_s": rate,
    "useful_examples_per_s": rate,
    "real_fraction": 1.0,
  }
