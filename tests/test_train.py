import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import train
from minigpt_jax.config import PAD_TOKEN_ID
from minigpt_jax.train import create_state, train_step


def _batch(c, seed=0):
    return jnp.asarray(
        np.random.default_rng(seed).integers(0, 50000, (c.batch_size, c.seq_len)), jnp.int32
    )


def _losses(c, steps, batch, seed_rng=0):
    state = create_state(c)
    rng = jax.random.key(seed_rng)
    out = []
    for _ in range(steps):
        state, m = train_step(state, batch, rng)
        out.append(float(m["loss"]))
    return out, state


def test_thirty_steps_on_one_batch_drive_loss_down(tiny):
    c = tiny.replace(lr=1e-2)
    losses, state = _losses(c, 30, _batch(c))
    assert int(state.step) == 30
    assert losses[-1] < 0.3 * losses[0], losses


def test_same_seed_same_losses_other_seed_differs(tiny):
    c = tiny.replace(dropout=0.1)
    batch = _batch(c)
    a, _ = _losses(c, 3, batch)
    b, _ = _losses(c, 3, batch)
    d, _ = _losses(c.replace(seed=7), 3, batch)
    assert a == b
    assert a != d


def test_dropout_masks_differ_between_steps(tiny):
    """With lr tiny the params barely move; the loss still changes with each step's mask."""
    c = tiny.replace(dropout=0.5, lr=1e-12)
    batch = _batch(c)
    losses, _ = _losses(c, 4, batch)
    assert len(set(losses)) == 4
    # and without dropout the same near-frozen params give the same loss every step
    flat, _ = _losses(c.replace(dropout=0.0), 4, batch)
    np.testing.assert_allclose(flat, flat[0], rtol=1e-6)


def test_metrics(tiny):
    batch = np.array(_batch(tiny))
    batch[0, 10:] = PAD_TOKEN_ID
    state = create_state(tiny)
    _, m = train_step(state, jnp.asarray(batch), jax.random.key(0))
    assert int(m["tokens"]) == tiny.batch_size * (tiny.seq_len - 1) - (tiny.seq_len - 10)
    np.testing.assert_allclose(float(m["perplexity"]), np.exp(float(m["loss"])), rtol=1e-6)


def test_matmul_precision_is_a_config_choice_in_the_compiled_step(tiny):
    """float32 asks XLA for exact float32 matmuls (HIGHEST); default leaves JAX's choice
    (TF32 on NVIDIA GPUs). Checked in the lowered program, so it holds on any machine."""
    batch = jnp.zeros((tiny.batch_size, tiny.seq_len), jnp.int32)

    def lowered(c):
        state = train.create_state(c)
        return jax.jit(lambda s, b: train._step(s, b, jax.random.key(0))[1]["loss"]).lower(state, batch).as_text()

    assert "HIGHEST" in lowered(tiny.replace(matmul_precision="float32"))
    assert "HIGHEST" not in lowered(tiny)


def test_golden_baseline_step(float32_matmuls):
    """One AdamW step of the baseline (docs/spec.md's config, init and dropout) on a fixed batch
    whose last 16 positions are PAD. If a change is meant to move these numbers (the model,
    the init, the loss, the optimizer), check it against PyTorch (tests/test_parity.py), then
    update EXPECTED from this test's failure message."""
    import jax

    from minigpt_jax.config import PAD_TOKEN_ID, Config
    from minigpt_jax.train import create_state, train_step

    EXPECTED = {"loss": 10.997293472290039, "grad_norm": 0.32496315240859985, "tokens": 1504}
    c = Config()
    batch = np.random.default_rng(0).integers(0, c.vocab_size, (c.batch_size, c.seq_len), dtype=np.int32)
    batch[:, 48:] = PAD_TOKEN_ID
    _, m = train_step(create_state(c), batch, jax.random.PRNGKey(c.seed + 1))
    got = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "tokens": int(m["tokens"])}
    assert got["tokens"] == EXPECTED["tokens"], got
    assert got["loss"] == pytest.approx(EXPECTED["loss"], rel=1e-5), (
        f"baseline step changed: got {got}; if meant, set EXPECTED to it")
    assert got["grad_norm"] == pytest.approx(EXPECTED["grad_norm"], rel=1e-4), (
        f"baseline step changed: got {got}; if meant, set EXPECTED to it")
