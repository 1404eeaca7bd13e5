"""Loss, optimizer, train state and the jitted training and evaluation steps.

- `train_step(state, batch, rng) -> (state, metrics)` is pure and jitted once;
  the state is donated so parameters are updated in place. `train_steps` runs
  K of them in one dispatch (`lax.scan`) and returns every step's metrics.
- The dropout key is `fold_in(rng, step)`: a fresh mask every step, and a run
  that resumes at step k draws the same masks as one that never stopped.
- AdamW with PyTorch's defaults (optax's own weight decay default is 1e-4).
- The steps never build the (B, L, 50257) float32 logits, which are almost all
  of the work: `lm_head_ce_sum` runs the LM head and its cross entropy over
  chunks of rows, computing the gradients in the same pass (three matmuls, no
  recomputation), on labelled rows only (PAD labels cost nothing). Its values
  equal `masked_lm_loss` on the full logits to float32 rounding.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import sys

import jax
import jax.numpy as jnp
import optax
from jax import lax
from flax.training import train_state

from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.model import MiniGPT, init_params


def tune_host_allocator() -> bool:
    """Keep freed host memory in the process instead of returning it to the OS.

    XLA:CPU (and PyTorch) allocate each step's large buffers anew; by default
    glibc maps every block over 32 MB fresh from the kernel and unmaps it on
    free, so each step touches ~700 MB of new pages and page faults took more
    time than the matmuls (BENCHMARKS.md). Here every block comes from one
    heap that is never trimmed below 2 GB. Call it once, before the first
    computation, in a process that trains; it changes no number. Returns
    whether it applied (glibc on Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
                    and libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False


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


HEAD_CHUNK = 256  # LM-head rows per loop iteration; smaller wastes less on a partly-PAD last chunk (BENCHMARKS.md)


def _head_chunk(h_CD, hT_DC, kernel_DV, kernel_VD, labels_C, weights_C, with_grads: bool):
    """Weighted cross-entropy sum of one chunk of rows, and its gradients if asked.

    h and the kernel come in both layouts (transposed once, outside the loop) so
    that every matmul has the layout the CPU kernels are fastest on (-15% step time).
    """
    logits_CV = jnp.dot(h_CD, kernel_DV, preferred_element_type=jnp.float32)
    max_C = logits_CV.max(-1)
    exp_CV = jnp.exp(logits_CV - max_C[:, None])
    sum_C = exp_CV.sum(-1)
    label_logit_C = jnp.take_along_axis(logits_CV, labels_C[:, None], -1)[:, 0]
    ce_sum = ((max_C + jnp.log(sum_C) - label_logit_C) * weights_C).sum()
    if not with_grads:
        return ce_sum, None, None
    is_label_CV = labels_C[:, None] == lax.broadcasted_iota(jnp.int32, logits_CV.shape, 1)
    # d(ce_sum)/d(logits) = weight * (softmax - onehot)
    g_CV = exp_CV * (weights_C / sum_C)[:, None] - jnp.where(is_label_CV, weights_C[:, None], 0.0)
    g_CV = g_CV.astype(h_CD.dtype)
    dh_CD = jnp.dot(g_CV, kernel_VD, preferred_element_type=jnp.float32)
    dkernel_DV = jnp.dot(hT_DC, g_CV, preferred_element_type=jnp.float32)
    return ce_sum, dh_CD.astype(h_CD.dtype), dkernel_DV


def _fused_head(h_ND, kernel_DV, labels_N, weights_N, with_grads: bool):
    """sum_n weights_n * CE(h_n @ kernel, labels_n), over chunks of labelled rows."""
    N, D = h_ND.shape
    n_chunks = max(1, -(-N // HEAD_CHUNK))
    C = -(-N // n_chunks)
    R = n_chunks * C
    # Labelled rows first, so the loop stops after ceil(n_labelled / C) chunks.
    order_N = jnp.argsort(weights_N == 0, stable=True)
    h_RD = jnp.pad(h_ND[order_N], ((0, R - N), (0, 0)))
    labels_R = jnp.pad(labels_N[order_N], (0, R - N))
    weights_R = jnp.pad(weights_N[order_N], (0, R - N))
    trip = (jnp.sum(weights_N != 0) + C - 1) // C
    kernel_DV = kernel_DV.astype(h_ND.dtype)
    # the barrier keeps XLA from folding the transposes back into the matmuls
    hT_nDC, kernel_VD = lax.optimization_barrier((h_RD.reshape(n_chunks, C, D).transpose(0, 2, 1), kernel_DV.T))

    def body(i, carry):
        ce_sum, dh_RD, dkernel_DV = carry
        rows = lambda x: lax.dynamic_slice_in_dim(x, i * C, C)  # noqa: E731
        s, dh_CD, dk_DV = _head_chunk(rows(h_RD), lax.dynamic_index_in_dim(hT_nDC, i, keepdims=False), kernel_DV,
                                      kernel_VD, rows(labels_R), rows(weights_R), with_grads)
        if with_grads:
            dh_RD = lax.dynamic_update_slice_in_dim(dh_RD, dh_CD, i * C, 0)
            dkernel_DV = dkernel_DV + dk_DV
        return ce_sum + s, dh_RD, dkernel_DV

    init = (jnp.zeros((), jnp.float32),
            jnp.zeros((R, D) if with_grads else (0, D), h_ND.dtype),
            jnp.zeros(kernel_DV.shape if with_grads else (D, 0), jnp.float32))
    ce_sum, dh_RD, dkernel_DV = lax.fori_loop(0, trip, body, init)
    if not with_grads:
        return ce_sum, None, None
    dh_ND = jnp.zeros_like(h_ND).at[order_N].set(dh_RD[:N], unique_indices=True)
    return ce_sum, dh_ND, dkernel_DV


@jax.custom_vjp
def lm_head_ce_sum(h_ND, kernel_DV, labels_N, weights_N) -> jax.Array:
    """sum_n weights_n * cross_entropy(h_n @ kernel, labels_n), without the (N, V) logits.

    h_ND is in the compute dtype, kernel_DV the float32 `head` kernel (cast
    to h's dtype for the matmuls, which accumulate in float32); softmax and the
    sum are float32. Differentiable in h and kernel.
    """
    return _fused_head(h_ND, kernel_DV, labels_N, weights_N, with_grads=False)[0]


def _lm_head_ce_sum_fwd(h_ND, kernel_DV, labels_N, weights_N):
    ce_sum, dh_ND, dkernel_DV = _fused_head(h_ND, kernel_DV, labels_N, weights_N, with_grads=True)
    return ce_sum, (dh_ND, dkernel_DV)


def _lm_head_ce_sum_bwd(residuals, ct):
    dh_ND, dkernel_DV = residuals
    return (ct * dh_ND).astype(dh_ND.dtype), ct * dkernel_DV, None, None


lm_head_ce_sum.defvjp(_lm_head_ce_sum_fwd, _lm_head_ce_sum_bwd)


def head_loss(h_BLD: jax.Array, kernel_DV: jax.Array, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`masked_lm_loss(h @ kernel, tokens)` through the fused head -> (loss, n_labels)."""
    D = h_BLD.shape[-1]
    labels_N = tokens_BL[:, 1:].reshape(-1)
    weights_N = (labels_N != PAD_TOKEN_ID).astype(jnp.float32)
    n_labels = weights_N.sum()
    # position L-1 has no label: it never goes through the head
    ce_sum = lm_head_ce_sum(h_BLD[:, :-1].reshape(-1, D), kernel_DV, labels_N, weights_N)
    return ce_sum / jnp.maximum(n_labels, 1.0), n_labels


def _loss_fn(params, apply_fn, tokens_BL, dropout_rng):
    h_BLD = apply_fn({"params": params}, tokens_BL, train=True, hidden=True, rngs={"dropout": dropout_rng})
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
def train_steps(state: TrainState, batches_KBL: jax.Array, rng: jax.Array) -> tuple[TrainState, dict]:
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
