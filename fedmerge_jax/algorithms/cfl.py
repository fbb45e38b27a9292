"""CFL (Sattler et al. 2020): one model per cluster; a cluster splits in two when its members'
updates point apart (by cosine similarity) once their average has nearly vanished.

Follows the authors' code (felisat/clustered-federated-learning, the notebook's round loop and
`Server.cluster_clients`): every client trains its cluster's model and sends its update
dW_i; then, for each cluster c, if
  ||mean_{i in c} dW_i|| < eps1  and  max_{i in c} ||dW_i|| > eps2  and  |c| > 2
and more than `cfl_warmup_rounds` rounds are done (the reference's `c_round > 20`), the
members are bipartitioned by complete-linkage agglomerative clustering of -cos(dW_i, dW_j)
(the reference's sklearn call); then each cluster, split or not, averages its members'
updates into its model. `config.cfl_eps1`, `cfl_eps2` are eps1, eps2 (the reference's
0.4 and 1.6). A client predicts with its cluster's model.

In FedMerge's machinery a cluster assignment is a one-hot merging-weight row (logits 0 on the
client's cluster, -1e9 elsewhere, never stepped), the models are stacked, and the per-model
normalised average is the per-cluster average (as IFCA): so a round stays one jitted
function with static shapes. The number of clusters grows up to `cfl_max_clusters` slots
(`State.num_clusters` of them in use); a split copies the parent's model into the next free
slot, and once all slots are used no cluster splits again.

Where this differs from the reference, and why:
- Averages are n-weighted (the paper's Algorithm 1, sum |D_i| / |D_c| dW_i), for the mean
  update norm too; the notebook averages unweighted.
- Partial participation: the reference runs every client every round (frac = 1.0); with
  fewer, its similarities would use the stale updates of absent clients. Here the criterion
  and the bipartition use the sampled members' updates only, and an unsampled member of a
  split cluster stays with the part that keeps the parent's id (the part holding the
  sampled member listed first).
- Similarities and norms are over the trainable parameters (the reference's
  `named_parameters`); BatchNorm statistics are averaged per cluster like parameters.
"""

import flax
import jax
import jax.numpy as jnp

from fedmerge_jax.algorithms import base, fedmerge
from fedmerge_jax.algorithms.ifca import one_hot_logits, per_cluster_server

MIN_SPLIT_SIZE = 3  # The reference splits only clusters with more than 2 (sampled) members.


@flax.struct.dataclass
class State:
  clusters: (
    fedmerge.State
  )  # Cluster models [K_max, ...]; logit rows one-hot on each client's cluster.
  num_clusters: jax.Array  # [] int32: slots 0 .. num_clusters - 1 are in use.
  rounds_done: jax.Array  # [] int32.


def update_gram(deltas):
  """[C, C] inner products <dW_i, dW_j> over the trainable parameters."""
  return sum(jnp.einsum("c...,d...->cd", d, d) for d in jax.tree.leaves(deltas["params"]))


def complete_linkage_bipartition(distance, members):
  """[C] bool: one of the two clusters that complete linkage leaves among `members`.

  Agglomerative: start from singletons, repeatedly merge the two clusters whose farthest
  pair is closest, until two remain. The returned part holds the first member.
  """
  size = distance.shape[0]
  pair = members[:, None] & members[None, :] & ~jnp.eye(size, dtype=bool)
  linkage = jnp.where(pair, distance, jnp.inf)  # Between the clusters led by rows i and j.
  label = jnp.arange(size)

  def merge(_, carry):
    linkage, active, label = carry
    flat = jnp.argmin(linkage)
    i, j = flat // size, flat % size
    a, b = jnp.minimum(i, j), jnp.maximum(i, j)
    row = jnp.maximum(linkage[a], linkage[b]).at[a].set(jnp.inf).at[b].set(jnp.inf)
    merged = linkage.at[a].set(row).at[:, a].set(row).at[b].set(jnp.inf).at[:, b].set(jnp.inf)
    go = jnp.sum(active) > 2
    return (
      jnp.where(go, merged, linkage),
      jnp.where(go, active.at[b].set(False), active),
      jnp.where(go & (label == b), a, label),
    )

  _, _, label = jax.lax.fori_loop(0, size, merge, (linkage, members, label))
  first = jnp.argmax(members)
  return members & (label == label[first])


def split_clusters(cluster, gram, p, num_clusters, max_clusters: int, split_allowed, config):
  """(new cluster ids [C], parent slot of every slot [K_max], clusters in use) after the splits."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  cosine = gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-12)
  real = p > 0

  def one(c, carry):
    cluster, parent, used = carry
    members = (cluster == c) & real
    w = jnp.where(members, p, 0.0)
    w = w / jnp.maximum(jnp.sum(w), 1e-30)
    mean_norm = jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))
    max_norm = jnp.max(jnp.where(members, norms, 0.0))
    split = (
      split_allowed
      & (c < num_clusters)
      & (used < max_clusters)
      & (jnp.sum(members) >= MIN_SPLIT_SIZE)
      & (mean_norm < config.cfl_eps1)
      & (max_norm > config.cfl_eps2)
    )
    stays = complete_linkage_bipartition(-cosine, members)
    moves = split & members & ~stays
    return (
      jnp.where(moves, used, cluster),
      jnp.where(split, parent.at[used].set(c), parent),
      used + split.astype(used.dtype),
    )

  init = (cluster, jnp.arange(max_clusters), num_clusters)
  return jax.lax.fori_loop(0, max_clusters, one, init)


def make(model, config, num_clients, example_input):
  max_clusters = config.cfl_max_clusters
  inner = fedmerge.make(
    model,
    config,
    num_clients,
    example_input,
    num_global_models=max_clusters,
    server_update=per_cluster_server(config),
    prox_mu=0.0,
  )

  def init(rng) -> State:
    clusters = inner.init(rng)
    everyone_in_0 = one_hot_logits(jnp.zeros((num_clients,), jnp.int32), max_clusters)
    return State(
      clusters.replace(logits=everyone_in_0), jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32)
    )

  def round_fn(state: State, client_ids, data, rng):
    deltas, metrics = inner.stages.train(state.clusters, client_ids, data, rng)
    p = data.count.astype(jnp.float32)
    gram = update_gram(deltas)
    cluster = jnp.argmax(state.clusters.logits[client_ids], axis=1)
    cluster, parent, used = split_clusters(
      cluster,
      gram,
      p,
      state.num_clusters,
      max_clusters,
      state.rounds_done + 1 > config.cfl_warmup_rounds,
      config,
    )
    clusters = state.clusters.replace(
      globals=jax.tree.map(lambda g: g[parent], state.clusters.globals),  # Splits copy the parent.
      logits=state.clusters.logits.at[client_ids].set(one_hot_logits(cluster, max_clusters)),
    )
    clusters = inner.stages.server(clusters, client_ids, data, deltas)
    share = p / jnp.maximum(
      jnp.sum(p), 1.0
    )  # The norms eps1, eps2 are compared with (to tune them).
    metrics = dict(
      base.training_metrics(data, metrics),
      **{
        "train/num_clusters": used.astype(jnp.float32),
        "train/max_update_norm": jnp.sqrt(jnp.max(jnp.diagonal(gram))),
        "train/mean_update_norm": jnp.sqrt(jnp.maximum(share @ gram @ share, 0.0)),
      },
    )
    return State(clusters, used, state.rounds_done + 1), metrics

  return inner._replace(
    init=init,
    round=round_fn,
    stages=None,
    client_rows=lambda state: State(inner.client_rows(state.clusters), False, False),
    personalized=lambda state, ids, train: inner.personalized(state.clusters, ids, train),
    merging_weights=None
    if inner.merging_weights is None
    else (lambda state, ids, train: inner.merging_weights(state.clusters, ids, train)),
  )
