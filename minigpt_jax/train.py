"""Train state and the jitted training and evaluation steps.

- `train_step(state, batch, rng) -> (state, metrics)` is pure and jitted once;
  the state is donated so parameters are updated in place. `train_steps` runs
  K of them in one dispatch (`lax.scan`), the steps past `n` masked, so a
  short block is the same compiled program. Metrics: loss, perplexity, label
  tokens, the learning rate of the step and the gradients' global norm.
- The dropout key is `fold_in(rng, step)`: a fresh mask every step, and a run
  that resumes at step k draws the same masks as one that never stopped.
- The optimizer is optim.make_optimizer (AdamW with PyTorch's defaults); its
  lr and weight decay are values in the state, and `apply_fn` is built from
  the model fields only, so experiments that differ in training values (lr,
  batch size, seed...) but not in shapes share one compiled step.
- The steps never build the (B, L, 50257) float32 logits: the model returns
  its final hidden states and `losses.head_loss` runs the LM head and its cross
  entropy in chunks (losses.py), equal to `masked_lm_loss` on the full logits.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import jax
import jax.numpy as jnp
from flax.training import train_state
from jax import lax

from minigpt_jax import optim
from minigpt_jax.config import Config
from minigpt_jax.losses import head_loss, masked_lm_loss, row_losses  # noqa: F401  (masked_lm_loss: re-exported)
from minigpt_jax.model import MiniGPT, init_params, model_config


def device_prefetch(batches, put=jax.device_put, size: int = 2):
    """Yield put(batch) for each batch, keeping `size` transfers in flight ahead of the step."""
    queue = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


class TrainState(train_state.TrainState):
    """Params, AdamW state and step; apply_fn and tx are static."""


@functools.cache
def _model(model_cfg: Config) -> MiniGPT:
    # one instance per shape: jit compares the static apply_fn, a bound method, by its module's identity
    return MiniGPT(model_cfg)


def create_state(config: Config, params=None, total_steps: int | None = None) -> TrainState:
    """A train state at step 0, from `params` or a fresh init seeded by config.seed.
    total_steps: the run's length, which a cosine schedule needs."""
    if params is None:
        params = init_params(config, jax.random.key(config.seed))
    return TrainState.create(apply_fn=_model(model_config(config)).apply, params=params,
                             tx=optim.make_optimizer(config, total_steps))


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(rng, step)


def _loss_fn(params, apply_fn, tokens_BL, dropout_rng):
    h_BLD = apply_fn(
        {"params": params}, tokens_BL, train=True, hidden=True, rngs={"dropout": dropout_rng}
    )
    return head_loss(h_BLD, params["head"]["kernel"], tokens_BL)


def matmul_precision(state: TrainState):
    """The config's float32 matmul precision, applied while the step is traced (the static
    apply_fn carries it, so another precision is another compiled program)."""
    precision = state.apply_fn.__self__.config.matmul_precision
    return contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision)


def _step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
    with matmul_precision(state):
        (loss, n_labels), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
            state.params, state.apply_fn, batch, dropout_key(rng, state.step)
        )
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss, "perplexity": jnp.exp(loss), "tokens": n_labels,
                   "lr": optim.current_lr(state.opt_state), "grad_norm": optim.global_norm(grads)}


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
    """One AdamW step on a (B, L) batch of token ids."""
    return _step(state, batch, rng)


@functools.partial(jax.jit, donate_argnums=0)
def train_steps(
    state: TrainState, batches_KBL: jax.Array, rng: jax.Array, n: jax.Array | None = None
) -> tuple[TrainState, dict]:
    """The first n (default K) of K AdamW steps on (K, B, L) batches, in one dispatch ->
    metrics of shape (K,), those past n meaningless.

    The first n are exactly n successive `train_step` calls: same dropout keys,
    same metrics. Steps past n are computed and discarded (a select, not a
    branch: a conditional would read its predicate back to the host on GPUs);
    only a run's last, short block has any.
    """
    K = batches_KBL.shape[0]
    n = K if n is None else n

    def body(s, i_batch):
        i, batch = i_batch
        new, m = _step(s, batch, rng)
        keep = i < n
        return jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, s), m

    return lax.scan(body, state, (jnp.arange(K), batches_KBL))


def _eval(state: TrainState, batch: jax.Array) -> dict:
    with matmul_precision(state):
        h_BLD = state.apply_fn({"params": state.params}, batch, train=False, hidden=True)
        loss_B, labels_B = row_losses(h_BLD, state.params["head"]["kernel"], batch)
    return {"loss_sum": loss_B, "tokens": labels_B}


@jax.jit
def eval_step(state: TrainState, batch: jax.Array) -> dict:
    """Per row of a (B, L) batch, without dropout: summed loss and label count, each (B,)."""
    return _eval(state, batch)


def _evals(state: TrainState, batches_KBL: jax.Array) -> dict:
    _, m = lax.scan(lambda c, b: (c, _eval(state, b)), None, batches_KBL)
    return m


@jax.jit
def eval_steps(state: TrainState, batches_KBL: jax.Array) -> dict:
    """eval_step over (K, B, L) batches in one dispatch -> arrays of (K, B)."""
    return _evals(state, batches_KBL)


@jax.jit
def stacked_eval_steps(state_V: TrainState, batches_VKBL: jax.Array) -> dict:
    """eval_steps of V stacked states (stack.py), each over its own (K, B, L) batches, in one
    dispatch -> arrays of (V, K, B)."""
    return jax.vmap(_evals)(state_V, batches_VKBL)
