"""Loss, optimizer, train state and the jitted training and evaluation steps.

- `train_step(state, batch, rng) -> (state, metrics)` is pure and jitted once;
  the state is donated so parameters are updated in place.
- The dropout key is `fold_in(rng, step)`: a fresh mask every step, and a run
  that resumes at step k draws the same masks as one that never stopped.
- AdamW with PyTorch's defaults (optax's own weight decay default is 1e-4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.model import MiniGPT, init_params


class TrainState(train_state.TrainState):
    """Params, AdamW state and step; apply_fn and tx are static."""


def masked_lm_loss(logits_BLV: jax.Array, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token cross entropy averaged over non-PAD labels -> (loss, n_labels).

    Logits at 0..L-2 predict tokens 1..L-1. No label at all gives loss 0.
    """
    logits = logits_BLV[:, :-1].astype(jnp.float32)
    labels = tokens_BL[:, 1:]
    weights = (labels != PAD_TOKEN_ID).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    n_labels = weights.sum()
    loss = (ce * weights).sum() / jnp.maximum(n_labels, 1.0)
    return loss, n_labels


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.adamw(config.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)


def create_state(config: Config, params=None) -> TrainState:
    """A train state at step 0, from `params` or a fresh init seeded by config.seed."""
    if params is None:
        params = init_params(config, jax.random.key(config.seed))
    return TrainState.create(apply_fn=MiniGPT(config).apply, params=params, tx=make_optimizer(config))


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(rng, step)


def _loss_fn(params, state: TrainState, tokens_BL, rng):
    logits = state.apply_fn(
        {"params": params}, tokens_BL, train=True, rngs={"dropout": dropout_key(rng, state.step)}
    )
    return masked_lm_loss(logits, tokens_BL)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
    """One AdamW step on a (B, L) batch of token ids."""
    (loss, n_labels), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
        state.params, state, batch, rng
    )
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss, "perplexity": jnp.exp(loss), "tokens": n_labels}


@jax.jit
def eval_step(state: TrainState, batch: jax.Array) -> dict:
    """Summed loss and label count of a batch, without dropout."""
    logits = state.apply_fn({"params": state.params}, batch, train=False)
    loss, n_labels = masked_lm_loss(logits, batch)
    return {"loss_sum": loss * n_labels, "tokens": n_labels}
