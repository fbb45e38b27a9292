"""APFL (Deng et al. 2020): each client mixes a personal model v_i with the global model w.

Follows the paper's Algorithm 1 (local descent APFL). A sampled client holds w_i (from the
server's w), its v_i and its alpha_i in [0, 1], and on every local batch xi takes, at once,
  w_i <- w_i - eta grad f_i(w_i; xi)
  v_i <- v_i - eta grad_v f_i(vbar_i; xi),        vbar_i = alpha_i v_i + (1 - alpha_i) w_i
  alpha_i <- P_[0,1](alpha_i - eta <v_i - w_i, grad f_i(vbar_i; xi)>)   (if adaptive)
(w held fixed inside vbar: its step is FedAvg's). The server averages the sampled w_i
(n_i-weighted, FedAvg's rule); v_i and alpha_i stay on the client, unsampled clients keep
theirs; a client predicts with vbar_i. So w is trained exactly as FedAvg trains it, and
with alpha = 0 (not adaptive) every client predicts with FedAvg's model.
`config.apfl_alpha` is the initial alpha (0.5: FedTorch's `--fed_personal_alpha` default)
and `config.apfl_adaptive_alpha` the paper's adaptive alpha; eta is `client_lr`.

Where this differs from the authors' FedTorch (`comms/trainings/federated/apfl.py`), and why:
- FedTorch mixes the two models' outputs (alpha * v(x) + (1 - alpha) * w(x)); the paper,
  and this module, mix their parameters.
- FedTorch updates alpha once per round (first step), adds 0.02 alpha to its gradient and
  averages alpha over the online clients; the paper, and this module, update each
  client's own alpha at every step, with no regulariser.
- Both train only the round's online (sampled) clients, as here.
- Weights: the paper's Algorithm 1 writes a plain mean of the sampled w_i; here n_i / sum n,
  FedAvg's rule (the same on equal clients), so that w is exactly FedAvg's model.
- BatchNorm (not in the paper): vbar's statistics are its own, personal (v's
  'batch_stats' are vbar's running statistics); w keeps its own, shared ones.
Training metrics: train/loss is f_i(w_i) + f_i(vbar_i), the sum both steps descend.
"""

import jax
import jax.numpy as jnp
import optax

from fedmerge_jax.algorithms import partial_sharing
from fedmerge_jax.algorithms.fedmerge import init_stacked

GLOBAL, PERSONAL, ALPHA = "global", "personal", "alpha"  # Keys in each collection (alpha: params).


def part(variables, name):
  """The flax variables of model `name` (GLOBAL or PERSONAL) in a joint variable dict."""
  return {collection: tree[name] for collection, tree in variables.items()}


def mixture(variables):
  """vbar's flax variables: params alpha v + (1 - alpha) w (no gradient to w), v's statistics."""
  alpha = variables["params"][ALPHA]
  mixed = jax.tree.map(
    lambda v, w: alpha * v + (1 - alpha) * jax.lax.stop_gradient(w),
    variables["params"][PERSONAL],
    variables["params"][GLOBAL],
  )
  return dict(part(variables, PERSONAL), params=mixed)


def joint_apply(model):
  """Training apply of the joint variables: outputs [2, B, classes] (w's, vbar's)."""

  def apply(variables, x, train=True, rngs=None, mutable=False, **kwargs):
    personal_rngs = {k: jax.random.fold_in(r, 1) for k, r in (rngs or {}).items()}
    out_w = model.apply(
      part(variables, GLOBAL), x, train=train, rngs=rngs, mutable=mutable, **kwargs
    )
    out_v = model.apply(
      mixture(variables), x, train=train, rngs=personal_rngs, mutable=mutable, **kwargs
    )
    if not mutable:
      return jnp.stack([out_w, out_v])
    (y_w, new_w), (y_v, new_v) = out_w, out_v
    return jnp.stack([y_w, y_v]), {c: {GLOBAL: new_w[c], PERSONAL: new_v[c]} for c in new_w}

  return apply


def both_losses(outputs, labels, idx):
  """Per example f(w) + f(vbar): its gradient is each model's own step (w fixed in vbar)."""
  del idx
  ce = optax.softmax_cross_entropy_with_integer_labels
  return ce(outputs[0], labels) + ce(outputs[1], labels)


def alpha_step(adaptive: bool) -> optax.GradientTransformation:
  """After the SGD step: alpha's step projected onto [0, 1], or no step if not adaptive."""

  def update_fn(updates, state, params):
    alpha = params[ALPHA]
    step = jnp.clip(alpha + updates[ALPHA], 0.0, 1.0) - alpha if adaptive else jnp.zeros_like(alpha)
    return dict(updates, **{ALPHA: step}), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make(model, config, num_clients, example_input):
  def init_variables(rng):
    w = jax.tree.map(lambda x: x[0], init_stacked(model, rng, 1, example_input))
    joint = {c: {GLOBAL: tree, PERSONAL: tree} for c, tree in w.items()}
    joint["params"][ALPHA] = jnp.asarray(config.apfl_alpha, jnp.float32)
    return joint

  def personal_mask(variables):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[1].key != GLOBAL, variables)

  def sent(models):
    """What the server sends, w, as joint variables that predict with w (v set to w)."""
    return {c: dict(tree, **{PERSONAL: tree[GLOBAL]}) for c, tree in models.items()}

  return partial_sharing.make(
    model,
    config,
    num_clients,
    example_input,
    personal_mask=personal_mask,
    init_variables=init_variables,
    apply_fn=joint_apply(model),
    predict=lambda variables, x: model.apply(mixture(variables), x, train=False),
    sent=sent,
    example_loss=both_losses,
    optimizer=optax.chain(optax.sgd(config.client_lr), alpha_step(config.apfl_adaptive_alpha)),
  )
