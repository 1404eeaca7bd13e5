"""The fast paths compute what the plain ones do: eval per row, K steps in one
dispatch, bf16, prefetch. The fused head itself is tested in test_losses.py.

Speed itself is measured by `python -m benchmarks.bench` (BENCHMARKS.md), never here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import (  # one batch recipe for the head's and the step's tests
    _full_logits_loss,
    _tokens,
)

from minigpt_jax.train import create_state, device_prefetch, eval_step, train_step, train_steps


def test_eval_step_equals_full_logits_loss(tiny):
    state = create_state(tiny)
    tokens = _tokens(tiny, seed=3)
    loss_ref, n_ref = _full_logits_loss(tiny, state.params, tokens)
    out = eval_step(state, tokens)
    assert out["loss_sum"].shape == out["tokens"].shape == (tiny.batch_size,)  # one per row
    assert int(out["tokens"].sum()) == int(n_ref)
    np.testing.assert_allclose(float(out["loss_sum"].sum()), float(loss_ref * n_ref), rtol=1e-6)
    # each row's own sum: the full-logits loss of that row alone
    for b in range(tiny.batch_size):
        loss_b, n_b = _full_logits_loss(tiny, state.params, tokens[b : b + 1])
        assert int(out["tokens"][b]) == int(n_b)
        np.testing.assert_allclose(float(out["loss_sum"][b]), float(loss_b * n_b),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
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
    assert set(metrics) == {"loss", "perplexity", "tokens", "lr", "grad_norm"}
    assert all(v.shape == (K,) for v in metrics.values())
    got = list(
        zip(
            map(float, metrics["loss"]),
            map(float, metrics["perplexity"]),
            map(int, metrics["tokens"]),
        )
    )
    np.testing.assert_allclose(np.array(got), np.array(losses), rtol=1e-6)
    assert (
        len({round(x[0], 6) for x in losses}) == K
    )  # the steps differ: the comparison is not vacuous
    assert int(fused.step) == K
    for a, b in zip(
        jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(fused.params)
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_loss(tiny):
    tiny = tiny.replace(lr=1e-2)
    c16 = tiny.replace(dtype="bfloat16")
    tokens = _tokens(tiny, seed=4, pads=False)
    state32, m32 = train_step(create_state(tiny), tokens, jax.random.key(0))
    state16, m16 = train_step(create_state(c16), tokens, jax.random.key(0))
    assert m16["loss"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree_util.tree_leaves(state16.params)} == {jnp.dtype(jnp.float32)}
    assert {
        x.dtype
        for x in jax.tree_util.tree_leaves(state16.opt_state)
        if hasattr(x, "dtype") and x.ndim
    } == {jnp.dtype(jnp.float32)}
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
