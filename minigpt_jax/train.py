"""Optimizer, train state and the jitted training and evaluation steps.

- `train_step(state, batch, rng) -> (state, metrics)` is pure and jitted once;
  the state is donated so parameters are updated in place. `train_steps` runs
  K of them in one dispatch (`lax.scan`) and returns every step's metrics.
- The dropout key is `fold_in(rng, step)`: a fresh mask every step, and a run
  that resumes at step k draws the same masks as one that never stopped.
- AdamW with PyTorch's defaults (optax's own weight decay default is 1e-4).
- The steps never build the (B, L, 50257) float32 logits: the model returns
  its final hidden states and `losses.head_loss` runs the LM head and its cross
  entropy in chunks (losses.py), equal to `masked_lm_loss` on the full logits.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax import lax

from minigpt_jax import host
from minigpt_jax.config import Config
from minigpt_jax.losses import head_loss, masked_lm_loss  # noqa: F401  (masked_lm_loss: re-exported)
from minigpt_jax.model import MiniGPT, init_params


def tune_host_allocator() -> bool:
    """Transitional: `host.tune_host_allocator(platform)`, until scripts/run.py calls it there."""
    return host.tune_host_allocator(jax.default_backend())


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


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.adamw(config.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)


def create_state(config: Config, params=None) -> TrainState:
    """A train state at step 0, from `params` or a fresh init seeded by config.seed."""
    if params is None:
        params = init_params(config, jax.random.key(config.seed))
    return TrainState.create(
        apply_fn=MiniGPT(config).apply, params=params, tx=make_optimizer(config)
    )


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(rng, step)


def _loss_fn(params, apply_fn, tokens_BL, dropout_rng):
    h_BLD = apply_fn(
        {"params": params}, tokens_BL, train=True, hidden=True, rngs={"dropout": dropout_rng}
    )
    return head_loss(h_BLD, params["head"]["kernel"], tokens_BL)


def _step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
    (loss, n_labels), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
        state.params, state.apply_fn, batch, dropout_key(rng, state.step)
    )
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss, "perplexity": jnp.exp(loss), "tokens": n_labels}


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
    """One AdamW step on a (B, L) batch of token ids."""
    return _step(state, batch, rng)


@functools.partial(jax.jit, donate_argnums=0)
def train_steps(
    state: TrainState, batches_KBL: jax.Array, rng: jax.Array
) -> tuple[TrainState, dict]:
    """K AdamW steps on (K, B, L) batches in one dispatch -> metrics of shape (K,).

    Exactly K successive `train_step` calls: same dropout keys, same metrics.
    """
    return lax.scan(lambda s, batch: _step(s, batch, rng), state, batches_KBL)


@jax.jit
def eval_step(state: TrainState, batch: jax.Array) -> dict:
    """Summed loss and label count of a batch, without dropout."""
    h_BLD = state.apply_fn({"params": state.params}, batch, train=False, hidden=True)
    loss, n_labels = head_loss(h_BLD, state.params["head"]["kernel"], batch)
    return {"loss_sum": loss * n_labels, "tokens": n_labels}
