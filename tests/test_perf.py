"""The fast paths compute what the plain ones do: fused head, K steps in one dispatch, bf16, prefetch.

Speed itself is measured by scripts/bench.py (BENCHMARKS.md), never here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import train
from minigpt_jax.config import PAD_TOKEN_ID
from minigpt_jax.model import MiniGPT, init_params
from minigpt_jax.train import (create_state, device_prefetch, eval_step, masked_lm_loss, train_step,
                               train_steps)


def _tokens(c, seed=0, pads=True):
    t = np.random.default_rng(seed).integers(0, PAD_TOKEN_ID, (c.batch_size, c.seq_len)).astype(np.int32)
    if pads:
        t[0, c.seq_len // 2:] = PAD_TOKEN_ID  # a PAD suffix
        t[1, 3] = PAD_TOKEN_ID  # a PAD in the middle
        t[2, :] = PAD_TOKEN_ID  # a row without any label
    return jnp.asarray(t)


def _full_logits_loss(c, params, tokens):
    return masked_lm_loss(MiniGPT(c).apply({"params": params}, tokens), tokens)


def _fused_loss(c, params, tokens):
    h = MiniGPT(c).apply({"params": params}, tokens, hidden=True)
    return train.head_loss(h, params["lm_head"]["kernel"], tokens)


@pytest.mark.parametrize("chunk", [16, 512])  # 16: eight chunks, a padded last one, a partial trip
def test_fused_head_equals_full_logits_loss_and_gradients(tiny, monkeypatch, chunk):
    monkeypatch.setattr(train, "HEAD_CHUNK", chunk)
    params = init_params(tiny, jax.random.key(0))
    tokens = _tokens(tiny)
    # a fresh jit traces again, so it sees the patched HEAD_CHUNK
    (loss_ref, n_ref), g_ref = jax.jit(jax.value_and_grad(lambda p: _full_logits_loss(tiny, p, tokens), has_aux=True))(params)
    (loss, n), g = jax.jit(jax.value_and_grad(lambda p: _fused_loss(tiny, p, tokens), has_aux=True))(params)
    assert int(n) == int(n_ref) == int((np.asarray(tokens)[:, 1:] != PAD_TOKEN_ID).sum())
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(g_ref):
        b = dict(jax.tree_util.tree_leaves_with_path(g))[path]
        rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
        assert rel <= 1e-5, f"{jax.tree_util.keystr(path)}: gradient relative difference {rel:.3g}"


def test_fused_head_skips_pad_labels_exactly(tiny):
    """Rows whose label is PAD get no gradient; a batch without labels gives loss 0 and zero grads."""
    params = init_params(tiny, jax.random.key(0))
    all_pad = jnp.full((tiny.batch_size, tiny.seq_len), PAD_TOKEN_ID, jnp.int32).at[:, 0].set(7)
    (loss, n), g = jax.value_and_grad(lambda p: _fused_loss(tiny, p, all_pad), has_aux=True)(params)
    assert float(loss) == 0.0 and int(n) == 0
    assert float(jnp.abs(g["lm_head"]["kernel"]).max()) == 0.0

    h = jnp.asarray(np.random.default_rng(1).normal(size=(6, tiny.embed_dim)), jnp.float32)
    kernel = params["lm_head"]["kernel"]
    labels = jnp.array([5, PAD_TOKEN_ID, 9, PAD_TOKEN_ID, 11, 12], jnp.int32)
    weights = (labels != PAD_TOKEN_ID).astype(jnp.float32)
    dh = jax.grad(train.lm_head_ce_sum)(h, kernel, labels, weights)
    assert np.all(np.asarray(dh)[[1, 3]] == 0) and np.all(np.abs(np.asarray(dh)[[0, 2, 4, 5]]).sum(-1) > 0)


def test_eval_step_equals_full_logits_loss(tiny):
    state = create_state(tiny)
    tokens = _tokens(tiny, seed=3)
    loss_ref, n_ref = _full_logits_loss(tiny, state.params, tokens)
    out = eval_step(state, tokens)
    assert int(out["tokens"]) == int(n_ref)
    np.testing.assert_allclose(float(out["loss_sum"]), float(loss_ref * n_ref), rtol=1e-6)


def test_fused_steps_equal_single_steps(tiny):
    """K steps in one dispatch: the same per-step metrics, dropout keys and final parameters."""
    c = tiny.replace(dropout=0.2, lr=1e-2)
    K = 4
    batches = jnp.stack([_tokens(c, seed=s) for s in range(K)])
    rng = jax.random.key(5)

    single = create_state(c)
    losses = []
    for k in range(K):
        single, m = train_step(single, batches[k], rng)
        losses.append((float(m["loss"]), float(m["perplexity"]), int(m["tokens"])))

    fused, metrics = train_steps(create_state(c), batches, rng)
    assert set(metrics) == {"loss", "perplexity", "tokens"}
    assert all(v.shape == (K,) for v in metrics.values())
    got = list(zip(map(float, metrics["loss"]), map(float, metrics["perplexity"]), map(int, metrics["tokens"])))
    np.testing.assert_allclose(np.array(got), np.array(losses), rtol=1e-6)
    assert len({round(x[0], 6) for x in losses}) == K  # the steps differ: the comparison is not vacuous
    assert int(fused.step) == K
    for a, b in zip(jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(fused.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_loss(tiny):
    tiny = tiny.replace(lr=1e-2)
    c16 = tiny.replace(dtype="bfloat16")
    tokens = _tokens(tiny, seed=4, pads=False)
    state32, m32 = train_step(create_state(tiny), tokens, jax.random.key(0))
    state16, m16 = train_step(create_state(c16), tokens, jax.random.key(0))
    assert m16["loss"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree_util.tree_leaves(state16.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(state16.opt_state)
            if hasattr(x, "dtype") and x.ndim} == {jnp.dtype(jnp.float32)}
    # bf16 matmuls: close to float32, but not equal (the dtype really reached the compute)
    l32, l16 = float(m32["loss"]), float(m16["loss"])
    assert l16 != l32 and abs(l16 - l32) / l32 < 2e-2
    # and it trains
    for _ in range(20):
        state16, m = train_step(state16, tokens, jax.random.key(0))
    assert float(m["loss"]) < l16 - 1.0


def test_device_prefetch_yields_every_batch_in_order():
    batches = [np.full((2, 3), i, np.int32) for i in range(5)]
    out = list(device_prefetch(iter(batches), size=2))
    assert [int(b[0, 0]) for b in out] == list(range(5))
    assert all(isinstance(b, jax.Array) for b in out)
    assert list(device_prefetch(iter([]))) == []
