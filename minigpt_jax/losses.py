"""Masked next-token cross entropy, and the fused LM head that computes it without the logits.

- `masked_lm_loss(logits, tokens)`: the definition (docs/spec.md, Training): logits at
  0..L-2 against tokens 1..L-1, averaged over non-PAD labels; none gives 0.
- `head_loss(h, kernel, tokens)`: the same value from the final hidden states,
  never building the (B, L, 50257) float32 logits, which are almost all of the
  work: the head and its cross entropy run over chunks of rows with the
  gradients computed in the same pass (three matmuls, no recomputation). Its
  values equal `masked_lm_loss` on the full logits to float32 rounding.
- One switch, `HEAD_PATH`, picks how the chunks are looped:
  "sorted": labelled rows first and a loop that stops after the last labelled
  chunk (PAD labels cost nothing). Its trip count depends on the data, which
  is cheap on the CPU but costs a device-to-host copy of the loop predicate per
  chunk on XLA:GPU. "static": every chunk, PAD rows masked by a zero weight,
  a trip count fixed at trace time. "auto" (the default) lowers "sorted" for
  the CPU and "static" for every other platform (`lax.platform_dependent`:
  decided when the step is lowered, so an export for CUDA made on a CPU
  machine gets the GPU's path).
- Data parallelism: when the tokens are laid out over a mesh axis "data" of
  more than one device (placement.Placement), the head runs on each device's
  own rows (`jax.shard_map`) and only the loss sum and the kernel gradient
  are summed across devices: no device gathers the batch's hidden states.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from minigpt_jax.config import PAD_TOKEN_ID

HEAD_PATH = "auto"  # "auto" | "sorted" | "static": see the module docstring
HEAD_CHUNK = (
    256  # rows per chunk on the CPU; smaller wastes less on a partly-PAD last chunk (BENCHMARKS.md)
)
# Rows per chunk on accelerators: one (2048, 50257) float32 chunk is 412 MB, and larger
# matmuls keep a GPU busy; unmeasured (no GPU was lent when it was chosen).
ACCEL_HEAD_CHUNK = 2048
# Rows of logits at a time in evaluation. CPU: (2, L, V) float32 stays in cache, twice as
# fast as 8 rows at baseline (BENCHMARKS.md); accelerators: about one ACCEL_HEAD_CHUNK of
# positions at seq_len 64, unmeasured.
EVAL_ROWS = 2
ACCEL_EVAL_ROWS = 32
DATA_AXIS = "data"  # the mesh axis that splits batches by rows (placement.Placement)


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


def _head_chunk(h_CD, kernel_DV, labels_C, weights_C, with_grads: bool, hT_DC=None, kernel_VD=None):
    """Weighted cross-entropy sum of one chunk of rows, and its gradients if asked.

    hT_DC and kernel_VD, when given, are h and the kernel already transposed, so
    that every matmul has the layout the CPU kernels are fastest on.
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
    if kernel_VD is None:
        dh_CD = jnp.einsum("cv,dv->cd", g_CV, kernel_DV, preferred_element_type=jnp.float32)
        dkernel_DV = jnp.einsum("cd,cv->dv", h_CD, g_CV, preferred_element_type=jnp.float32)
    else:
        dh_CD = jnp.dot(g_CV, kernel_VD, preferred_element_type=jnp.float32)
        dkernel_DV = jnp.dot(hT_DC, g_CV, preferred_element_type=jnp.float32)
    return ce_sum, dh_CD.astype(h_CD.dtype), dkernel_DV


def _varying_like(x, ref):
    """x marked as varying over the same shard_map axes as ref, as a loop carry must be."""
    aval = jax.typeof(ref)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier: aval.vma
    axes = tuple(sorted(manual.varying if manual is not None else getattr(aval, "vma", ())))
    return lax.pcast(x, axes, to="varying") if axes else x


def _chunks(N: int, rows: int) -> tuple[int, int]:
    """(number of chunks, rows per chunk) for N rows in chunks of at most `rows`, evenly filled."""
    n_chunks = max(1, -(-N // rows))
    return n_chunks, -(-N // n_chunks)


def _sorted_head(h_ND, kernel_DV, labels_N, weights_N, with_grads: bool):
    """The CPU path: labelled rows first, loop over ceil(n_labelled / C) chunks only."""
    N, D = h_ND.shape
    n_chunks, C = _chunks(N, HEAD_CHUNK)
    R = n_chunks * C
    order_N = jnp.argsort(weights_N == 0, stable=True)
    h_RD = jnp.pad(h_ND[order_N], ((0, R - N), (0, 0)))
    labels_R = jnp.pad(labels_N[order_N], (0, R - N))
    weights_R = jnp.pad(weights_N[order_N], (0, R - N))
    trip = (jnp.sum(weights_N != 0) + C - 1) // C
    # the barrier keeps XLA from folding the transposes back into the matmuls (-15% step on CPU)
    hT_nDC, kernel_VD = lax.optimization_barrier(
        (h_RD.reshape(n_chunks, C, D).transpose(0, 2, 1), kernel_DV.T)
    )

    def body(i, carry):
        ce_sum, dh_RD, dkernel_DV = carry
        rows = lambda x: lax.dynamic_slice_in_dim(x, i * C, C)  # noqa: E731
        s, dh_CD, dk_DV = _head_chunk(
            rows(h_RD),
            kernel_DV,
            rows(labels_R),
            rows(weights_R),
            with_grads,
            lax.dynamic_index_in_dim(hT_nDC, i, keepdims=False),
            kernel_VD,
        )
        if with_grads:
            dh_RD = lax.dynamic_update_slice_in_dim(dh_RD, dh_CD, i * C, 0)
            dkernel_DV = dkernel_DV + dk_DV
        return ce_sum + s, dh_RD, dkernel_DV

    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros((R, D) if with_grads else (0, D), h_ND.dtype),
        jnp.zeros(kernel_DV.shape if with_grads else (D, 0), jnp.float32),
    )
    init = jax.tree_util.tree_map(lambda x: _varying_like(x, h_ND), init)
    ce_sum, dh_RD, dkernel_DV = lax.fori_loop(0, trip, body, init)
    if not with_grads:
        return ce_sum, None, None
    dh_ND = jnp.zeros_like(h_ND).at[order_N].set(dh_RD[:N], unique_indices=True)
    return ce_sum, dh_ND, dkernel_DV


def _static_head(h_ND, kernel_DV, labels_N, weights_N, with_grads: bool):
    """The accelerator path: every chunk, in row order, a trip count known when tracing."""
    N, D = h_ND.shape
    n_chunks, C = _chunks(N, ACCEL_HEAD_CHUNK)
    R = n_chunks * C
    h_nCD = jnp.pad(h_ND, ((0, R - N), (0, 0))).reshape(n_chunks, C, D)
    labels_nC = jnp.pad(labels_N, (0, R - N)).reshape(n_chunks, C)
    weights_nC = jnp.pad(weights_N, (0, R - N)).reshape(n_chunks, C)  # padding rows weigh 0

    def body(dkernel_DV, chunk):
        h_CD, labels_C, weights_C = chunk
        s, dh_CD, dk_DV = _head_chunk(h_CD, kernel_DV, labels_C, weights_C, with_grads)
        return (dkernel_DV + dk_DV if with_grads else dkernel_DV), (s, dh_CD)

    dk0 = _varying_like(jnp.zeros(kernel_DV.shape if with_grads else (D, 0), jnp.float32), h_ND)
    dkernel_DV, (s_n, dh_nCD) = lax.scan(body, dk0, (h_nCD, labels_nC, weights_nC))
    if not with_grads:
        return s_n.sum(), None, None
    return s_n.sum(), dh_nCD.reshape(R, D)[:N], dkernel_DV


def _fused_head(h_ND, kernel_DV, labels_N, weights_N, with_grads: bool):
    """sum_n weights_n * CE(h_n @ kernel, labels_n) [, d/dh, d/dkernel] by HEAD_PATH's path."""
    kernel_DV = kernel_DV.astype(h_ND.dtype)
    args = (h_ND, kernel_DV, labels_N, weights_N)
    sorted_path = lambda *a: _sorted_head(*a, with_grads)  # noqa: E731
    static_path = lambda *a: _static_head(*a, with_grads)  # noqa: E731
    if HEAD_PATH == "sorted":
        return sorted_path(*args)
    if HEAD_PATH == "static":
        return static_path(*args)
    if HEAD_PATH != "auto":
        raise ValueError(f"HEAD_PATH={HEAD_PATH!r}; expected 'auto', 'sorted' or 'static'")
    return lax.platform_dependent(*args, cpu=sorted_path, default=static_path)


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


def _rows(h_BLD, tokens_BL):
    """(h at 0..L-2 as rows, their labels, their weights): position L-1 has no label."""
    labels_N = tokens_BL[:, 1:].reshape(-1)
    weights_N = (labels_N != PAD_TOKEN_ID).astype(jnp.float32)
    return h_BLD[:, :-1].reshape(-1, h_BLD.shape[-1]), labels_N, weights_N


def _data_mesh(tokens_BL):
    """The mesh whose "data" axis splits these tokens' rows over several devices, or None."""
    mesh = getattr(jax.typeof(tokens_BL).sharding, "mesh", None)
    if mesh is None or mesh.empty or DATA_AXIS not in mesh.axis_names:
        return None
    size = mesh.shape[DATA_AXIS]
    return mesh if size > 1 and tokens_BL.shape[0] % size == 0 else None


def _sharded_ce_sum(mesh):
    """lm_head_ce_sum over (h_BLD, kernel, tokens_BL), each device on its own rows of the batch."""
    rows, whole = P(DATA_AXIS), P()

    def local(h_BLD, kernel_DV, tokens_BL, with_grads):
        h_ND, labels_N, weights_N = _rows(h_BLD, tokens_BL)
        ce_sum, dh_ND, dkernel_DV = _fused_head(h_ND, kernel_DV, labels_N, weights_N, with_grads)
        ce_sum = lax.psum(ce_sum, DATA_AXIS)
        if not with_grads:
            return ce_sum
        B, L, D = h_BLD.shape
        dh_BLD = jnp.pad(dh_ND.reshape(B, L - 1, D), ((0, 0), (0, 1), (0, 0)))  # no label at L-1
        return ce_sum, dh_BLD, lax.psum(dkernel_DV, DATA_AXIS)

    def shard(with_grads, out_specs):
        return jax.shard_map(
            lambda h, k, t: local(h, k, t, with_grads),
            mesh=mesh,
            in_specs=(rows, whole, rows),
            out_specs=out_specs,
        )

    @jax.custom_vjp
    def ce_sum(h_BLD, kernel_DV, tokens_BL):
        return shard(False, whole)(h_BLD, kernel_DV, tokens_BL)

    def fwd(h_BLD, kernel_DV, tokens_BL):
        s, dh_BLD, dkernel_DV = shard(True, (whole, rows, whole))(h_BLD, kernel_DV, tokens_BL)
        return s, (dh_BLD, dkernel_DV)

    def bwd(residuals, ct):
        dh_BLD, dkernel_DV = residuals
        return (ct * dh_BLD).astype(dh_BLD.dtype), ct * dkernel_DV, None

    ce_sum.defvjp(fwd, bwd)
    return ce_sum


def head_loss(
    h_BLD: jax.Array, kernel_DV: jax.Array, tokens_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`masked_lm_loss(h @ kernel, tokens)` through the fused head -> (loss, n_labels)."""
    h_ND, labels_N, weights_N = _rows(h_BLD, tokens_BL)
    n_labels = weights_N.sum()
    mesh = _data_mesh(tokens_BL)
    if mesh is None:
        ce_sum = lm_head_ce_sum(h_ND, kernel_DV, labels_N, weights_N)
    else:
        ce_sum = _sharded_ce_sum(mesh)(h_BLD, kernel_DV, tokens_BL)
    return ce_sum / jnp.maximum(n_labels, 1.0), n_labels


def row_losses(
    h_BLD: jax.Array, kernel_DV: jax.Array, tokens_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per row, the summed cross entropy over its non-PAD labels and their count -> ((B,), (B,)).

    For evaluation (no gradients), where the standard error needs each held-out
    segment's own loss: the logits of EVAL_ROWS rows at a time (ACCEL_EVAL_ROWS off the
    CPU), never the batch's.
    """
    labels_BL = tokens_BL[:, 1:]
    weights_BL = (labels_BL != PAD_TOKEN_ID).astype(jnp.float32)
    ce_B = lax.platform_dependent(
        h_BLD, kernel_DV, labels_BL, weights_BL,
        cpu=lambda *a: _row_ce(*a, EVAL_ROWS), default=lambda *a: _row_ce(*a, ACCEL_EVAL_ROWS))
    return ce_B, weights_BL.sum(-1)


def _row_ce(h_BLD, kernel_DV, labels_BL, weights_BL, at_a_time: int) -> jax.Array:
    """Each row's summed weighted cross entropy, at_a_time rows of logits at once -> (B,)."""
    B, L, D = h_BLD.shape
    G = math.gcd(B, at_a_time)

    def rows(args):
        h_GLD, labels_GL, weights_GL = args
        logits = jnp.einsum("gld,dv->glv", h_GLD[:, :-1], kernel_DV.astype(h_GLD.dtype),
                            preferred_element_type=jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels_GL)
        return (ce * weights_GL).sum(-1)

    ce_B = lax.map(rows, (h_BLD.reshape(B // G, G, L, D), labels_BL.reshape(B // G, G, L - 1),
                          weights_BL.reshape(B // G, G, L - 1)))
    return ce_B.reshape(B)
