"""The loss and the fused LM head: values, gradients, each HEAD_PATH, the GPU program, sharding.

Every head path is compared with `masked_lm_loss` on the full logits, which is
itself checked against NumPy. The GPU program is lowered on this CPU machine
(`jax.export` for the "cuda" platform), so its loop structure is tested here.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minigpt_jax import losses, train
from minigpt_jax.config import PAD_TOKEN_ID
from minigpt_jax.losses import masked_lm_loss
from minigpt_jax.model import MiniGPT, init_params

PATHS = ["sorted", "static"]


def _tokens(c, seed=0, pads=True, batch=None):
    t = (
        np.random.default_rng(seed)
        .integers(0, PAD_TOKEN_ID, (batch or c.batch_size, c.seq_len))
        .astype(np.int32)
    )
    if pads:
        t[0, c.seq_len // 2 :] = PAD_TOKEN_ID  # a PAD suffix
        t[1, 3] = PAD_TOKEN_ID  # a PAD in the middle
        t[2, :] = PAD_TOKEN_ID  # a row without any label
    return jnp.asarray(t)


def _full_logits_loss(c, params, tokens):
    return masked_lm_loss(MiniGPT(c).apply({"params": params}, tokens), tokens)


def _fused_loss(c, params, tokens):
    h = MiniGPT(c).apply({"params": params}, tokens, hidden=True)
    return losses.head_loss(h, params["head"]["kernel"], tokens)


def _both_with_grads(c, params, tokens):
    """(loss, labels) and gradients of the full-logits reference, then of the fused head; a fresh
    jit each, so each traces again and sees the module constants a test patched."""
    ref = jax.jit(jax.value_and_grad(lambda p: _full_logits_loss(c, p, tokens), has_aux=True))
    fused = jax.jit(jax.value_and_grad(lambda p: _fused_loss(c, p, tokens), has_aux=True))
    return (*ref(params), *fused(params))


def test_loss_matches_numpy_and_ignores_pad_labels():
    rng = np.random.default_rng(0)
    V = 50257
    logits = rng.normal(size=(2, 5, V)).astype(np.float32)
    tokens = np.array([[1, 2, 3, PAD_TOKEN_ID, PAD_TOKEN_ID], [7, 8, 9, 10, 11]], np.int32)
    loss, n = masked_lm_loss(jnp.asarray(logits), jnp.asarray(tokens))
    # NumPy: log-softmax over the vocabulary, labels shifted by one, PAD labels dropped
    lp = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    labels = tokens[:, 1:]
    picked = np.take_along_axis(lp, labels[..., None], -1)[..., 0]
    keep = labels != PAD_TOKEN_ID
    expected = -(picked * keep).sum() / keep.sum()
    assert int(n) == 6
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # changing the logits that predict PAD labels leaves the loss unchanged
    changed = logits.copy()
    changed[0, 2:] = rng.normal(size=changed[0, 2:].shape) * 10
    loss2, _ = masked_lm_loss(jnp.asarray(changed), jnp.asarray(tokens))
    assert float(loss2) == float(loss)


def test_loss_without_labels_is_zero():
    tokens = jnp.array([[5] + [PAD_TOKEN_ID] * 4, [PAD_TOKEN_ID] * 5], jnp.int32)
    loss, n = masked_lm_loss(jnp.ones((2, 5, 50257)), tokens)
    assert float(loss) == 0.0 and int(n) == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "chunk", [16, 512]
)  # 16: eight chunks, a padded last one (and for sorted, a partial trip)
def test_fused_head_equals_full_logits_loss_and_gradients(tiny, monkeypatch, path, chunk):
    monkeypatch.setattr(losses, "HEAD_PATH", path)
    monkeypatch.setattr(losses, "HEAD_CHUNK", chunk)
    monkeypatch.setattr(losses, "ACCEL_HEAD_CHUNK", chunk)
    params = init_params(tiny, jax.random.key(0))
    tokens = _tokens(tiny)
    # a fresh jit traces again, so it sees the patched module constants
    (loss_ref, n_ref), g_ref, (loss, n), g = _both_with_grads(tiny, params, tokens)
    assert int(n) == int(n_ref) == int((np.asarray(tokens)[:, 1:] != PAD_TOKEN_ID).sum())
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    for key, a in jax.tree_util.tree_leaves_with_path(g_ref):
        b = dict(jax.tree_util.tree_leaves_with_path(g))[key]
        rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
        assert rel <= 1e-5, f"{jax.tree_util.keystr(key)}: gradient relative difference {rel:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_fused_head_skips_pad_labels_exactly(tiny, monkeypatch, path):
    """PAD-labelled rows get no gradient; a batch without labels: loss 0, zero grads."""
    monkeypatch.setattr(losses, "HEAD_PATH", path)
    params = init_params(tiny, jax.random.key(0))
    all_pad = jnp.full((tiny.batch_size, tiny.seq_len), PAD_TOKEN_ID, jnp.int32).at[:, 0].set(7)
    (loss, n), g = jax.value_and_grad(lambda p: _fused_loss(tiny, p, all_pad), has_aux=True)(params)
    assert float(loss) == 0.0 and int(n) == 0
    assert float(jnp.abs(g["head"]["kernel"]).max()) == 0.0

    h = jnp.asarray(np.random.default_rng(1).normal(size=(6, tiny.embed_dim)), jnp.float32)
    kernel = params["head"]["kernel"]
    labels = jnp.array([5, PAD_TOKEN_ID, 9, PAD_TOKEN_ID, 11, 12], jnp.int32)
    weights = (labels != PAD_TOKEN_ID).astype(jnp.float32)
    dh = jax.grad(losses.lm_head_ce_sum)(h, kernel, labels, weights)
    assert np.all(np.asarray(dh)[[1, 3]] == 0) and np.all(
        np.abs(np.asarray(dh)[[0, 2, 4, 5]]).sum(-1) > 0
    )


def test_unknown_head_path_is_an_error(tiny, monkeypatch):
    monkeypatch.setattr(losses, "HEAD_PATH", "fast")
    params = init_params(tiny, jax.random.key(0))
    with pytest.raises(ValueError, match="HEAD_PATH='fast'; expected 'auto', 'sorted' or 'static'"):
        _fused_loss(tiny, params, _tokens(tiny))


def _loop_bounds(stablehlo: str) -> list[bool]:
    """For each while loop: whether its condition compares the counter with a constant."""
    constants = set(re.findall(r"(%[\w#]+) = stablehlo\.constant", stablehlo))
    bounds = re.findall(
        r"cond \{\s*%[\w#]+ = stablehlo\.compare\s+LT, %[\w#]+, (%[\w#]+)", stablehlo
    )
    assert len(bounds) == stablehlo.count("stablehlo.while"), "a while condition of another form"
    return [b in constants for b in bounds]


def test_gpu_step_has_no_data_dependent_loop(tiny, monkeypatch):
    """The train step lowered for CUDA loops over head chunks a fixed number of times; the
    same step lowered for the CPU keeps the loop that stops after the labelled rows."""
    monkeypatch.setattr(
        losses, "ACCEL_HEAD_CHUNK", 32
    )  # several chunks: a loop is there to look at
    state = train.create_state(tiny)
    spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))  # noqa: E731
    args = (
        jax.tree_util.tree_map(spec, state),
        jax.ShapeDtypeStruct((tiny.batch_size, tiny.seq_len), jnp.int32),
        spec(jax.random.key(0)),
    )
    # new function objects: JAX caches traces by function; the patched chunk is read when tracing
    cuda = jax.export.export(jax.jit(lambda *a: train._step(*a)), platforms=["cuda"])(*args)
    cpu = jax.export.export(jax.jit(lambda *a: train._step(*a)), platforms=["cpu"])(*args)
    cuda, cpu = cuda.mlir_module(), cpu.mlir_module()
    assert "stablehlo.sort" not in cuda  # no row sorting either
    assert _loop_bounds(cuda) == [True]  # one loop, over the 4 head chunks
    assert False in _loop_bounds(cpu)  # the check can fail: the CPU's loop bound is data


def _mesh(n=4):
    return Mesh(np.array(jax.devices("cpu")[:n]), ("data",))


def _collectives(compiled_hlo: str) -> list[str]:
    return re.findall(
        r"= (\S+) (all-gather|all-to-all|reduce-scatter|collective-permute)\(", compiled_hlo
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_sharded_head_equals_one_device_and_gathers_no_rows(tiny, monkeypatch, path):
    """On a 4-device "data" mesh each device runs the head on its own rows: the same loss and
    gradients as one device, and no all-gather of the (B, L, D) hidden states."""
    monkeypatch.setattr(losses, "HEAD_PATH", path)
    monkeypatch.setattr(losses, "HEAD_CHUNK", 16)
    monkeypatch.setattr(losses, "ACCEL_HEAD_CHUNK", 16)
    c = tiny.replace(batch_size=8)
    params = init_params(c, jax.random.key(0))
    tokens = _tokens(c, seed=2)
    h = MiniGPT(c).apply({"params": params}, tokens, hidden=True)
    kernel = params["head"]["kernel"]
    rows, whole = NamedSharding(_mesh(), P("data")), NamedSharding(_mesh(), P())
    fn = jax.jit(jax.value_and_grad(lambda h, k, t: losses.head_loss(h, k, t)[0], (0, 1)))
    loss1, (dh1, dk1) = fn(h, kernel, tokens)
    sharded = (jax.device_put(h, rows), jax.device_put(kernel, whole), jax.device_put(tokens, rows))
    loss4, (dh4, dk4) = fn(*sharded)
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-6)
    for a, b in ((dh1, dh4), (dk1, dk4)):
        assert float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a)) <= 1e-5
    assert dh4.sharding.spec[0] == "data"  # the hidden-state gradient stays split by rows
    loss_eval, n_eval = jax.jit(lambda *a: losses.head_loss(*a))(*sharded)  # no grads: eval_step
    np.testing.assert_allclose(float(loss_eval), float(loss1), rtol=1e-6)
    assert int(n_eval) == int((np.asarray(tokens)[:, 1:] != PAD_TOKEN_ID).sum())

    assert _collectives(fn.lower(*sharded).compile().as_text()) == []

    # the check can fail: the head over the global rows, as before, makes XLA gather them
    def global_head(h, k, t):
        h_ND, labels_N, weights_N = losses._rows(h, t)
        return losses.lm_head_ce_sum(h_ND, k, labels_N, weights_N)

    gathered = _collectives(jax.jit(jax.grad(global_head)).lower(*sharded).compile().as_text())
    assert "all-gather" in [op for _, op in gathered]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["auto", "sorted"])
def test_fused_head_on_gpu_equals_full_logits(tiny, monkeypatch, float32_matmuls, path):
    monkeypatch.setattr(losses, "HEAD_PATH", path)
    gpu = jax.devices("gpu")[0]
    params = jax.device_put(init_params(tiny, jax.random.key(0)), gpu)
    tokens = jax.device_put(_tokens(tiny), gpu)
    (loss_ref, _), g_ref, (loss, _), g = _both_with_grads(tiny, params, tokens)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    dk, dk_ref = g["head"]["kernel"], g_ref["head"]["kernel"]
    assert float(jnp.linalg.norm(dk - dk_ref) / jnp.linalg.norm(dk_ref)) <= 1e-5


@pytest.mark.gpu
def test_gpu_train_steps_equal_cpu_steps(tiny, float32_matmuls):
    """Five AdamW steps on the GPU (static head) and on the CPU (sorted head) agree."""
    c = tiny.replace(lr=1e-2)
    out = {}
    for platform in ("cpu", "gpu"):
        device = jax.devices(platform)[0]
        state = jax.device_put(train.create_state(c), device)
        rng = jax.device_put(jax.random.key(0), device)
        out[platform] = []
        for s in range(5):
            state, m = train.train_step(state, jax.device_put(_tokens(c, seed=s), device), rng)
            out[platform].append(float(m["loss"]))
    np.testing.assert_allclose(out["gpu"], out["cpu"], rtol=1e-5)
