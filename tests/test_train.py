import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax.config import PAD_TOKEN_ID
from minigpt_jax.train import create_state, masked_lm_loss, train_step


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


def _batch(c, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 50000, (c.batch_size, c.seq_len)), jnp.int32)


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
