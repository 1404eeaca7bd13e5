import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import config as cfg
from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.model import MiniGPT, count_params, init_params


def test_baseline_parameter_count_is_exact():
    params = jax.eval_shape(lambda: init_params(cfg.BASELINE, jax.random.key(0)))
    assert count_params(params) == 13_270_784 == cfg.num_params(cfg.BASELINE)


@pytest.mark.parametrize("name", list(cfg.EXPERIMENTS))
def test_every_experiment_matches_closed_form_count(name):
    c = cfg.experiment_config(name)
    params = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    assert count_params(params) == cfg.num_params(c)


def test_other_shapes_match_closed_form_count():
    c = Config(embed_dim=48, n_heads=3, n_layers=3, ffn_mult=2, seq_len=40)
    params = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    assert count_params(params) == cfg.num_params(c)


def test_submodule_names_follow_state_dict_contract(tiny):
    params = init_params(tiny, jax.random.key(0))
    assert set(params) == {"embed", "pos", "layers_0", "layers_1", "ln_f", "head"}
    assert set(params["layers_0"]) == {"ln1", "attn", "ln2", "ffn"}
    assert set(params["layers_0"]["attn"]) == {"qkv", "proj"}
    assert params["pos"]["embed"]["embedding"].shape == (tiny.seq_len, 32)  # seq_len rows
    assert params["layers_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)
    assert "bias" not in params["head"]


def test_initial_distributions_follow_pytorch():
    c = Config(embed_dim=128, n_heads=4)
    p = init_params(c, jax.random.key(0))
    emb = np.asarray(p["embed"]["embedding"])
    assert abs(emb.std() - 1.0) < 0.01 and abs(emb.mean()) < 0.01
    for kernel, bias, fan_in in [
        (p["layers_0"]["ffn"]["fc1"]["kernel"], p["layers_0"]["ffn"]["fc1"]["bias"], 128),
        (p["layers_0"]["ffn"]["fc2"]["kernel"], p["layers_0"]["ffn"]["fc2"]["bias"], 512),
    ]:
        bound = 1 / np.sqrt(fan_in)
        for x in (np.asarray(kernel), np.asarray(bias)):
            assert np.abs(x).max() <= bound
            assert np.abs(x).max() > 0.95 * bound  # uniform over the whole range
    np.testing.assert_array_equal(p["ln_f"]["scale"], 1.0)
    np.testing.assert_array_equal(p["ln_f"]["bias"], 0.0)


def _embedding_jacobian(c, tokens, t):
    """d logits[0, t] / d input embeddings, summed over vocab and width -> (L,)."""
    model = MiniGPT(c)
    variables = model.init(jax.random.key(0), tokens)
    params, perturb = variables["params"], variables["perturbations"]

    def logit_t(pert):
        return model.apply({"params": params, "perturbations": pert}, tokens)[0, t].sum()

    g = jax.grad(logit_t)(perturb)["embeddings"][0]  # (L, D)
    return np.abs(np.asarray(g)).sum(-1)


@pytest.mark.slow
def test_causality_by_gradients(tiny):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 50000, (1, tiny.seq_len)), jnp.int32)
    for t in (0, 5, tiny.seq_len - 1):
        dep = _embedding_jacobian(tiny, tokens, t)
        assert (dep[t + 1:] == 0).all(), f"logits at {t} depend on later positions"
        assert (dep[: t + 1] > 0).all(), f"logits at {t} should depend on every earlier position"


def test_pad_key_is_an_ordinary_key_by_gradients(tiny):
    """docs/spec.md, Model: the mask is causal only; a PAD in the middle is seen by every later
    position."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50000, (1, tiny.seq_len))
    pad_at = 10
    tokens[0, pad_at] = PAD_TOKEN_ID
    tokens = jnp.asarray(tokens, jnp.int32)
    for t in (9, 10, 11, 20, tiny.seq_len - 1):
        dep = _embedding_jacobian(tiny, tokens, t)
        assert (dep[pad_at] > 0) == (t >= pad_at), f"position {t} and the PAD at {pad_at}"
        assert (dep[t + 1:] == 0).all()


@pytest.mark.slow
def test_no_nan_for_all_pad_row_and_leading_pad(tiny):
    params = init_params(tiny, jax.random.key(0))
    rows = np.full((3, tiny.seq_len), PAD_TOKEN_ID, np.int32)
    rows[1, 1:] = np.arange(1, tiny.seq_len)  # starts with PAD
    rows[2, :5] = [1, 2, 3, 4, 5]  # PAD suffix
    logits = MiniGPT(tiny).apply({"params": params}, jnp.asarray(rows))
    assert np.isfinite(np.asarray(logits)).all()
    grads = jax.grad(lambda p: MiniGPT(tiny).apply({"params": p}, jnp.asarray(rows)).sum())(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_dropout_only_in_training():
    c = Config(embed_dim=32, n_heads=2, seq_len=32, dropout=0.5)
    params = init_params(c, jax.random.key(0))
    tokens = jnp.arange(32, dtype=jnp.int32)[None]
    m = MiniGPT(c)
    eval1, eval2 = m.apply({"params": params}, tokens), m.apply({"params": params}, tokens)
    np.testing.assert_array_equal(eval1, eval2)
    tr1 = m.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    tr2 = m.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(tr1, eval1) and not np.allclose(tr1, tr2)


def test_longer_than_positional_table_is_an_error(tiny):
    params = init_params(tiny, jax.random.key(0))
    with pytest.raises(ValueError, match=f"exceeds seq_len={tiny.seq_len}"):
        MiniGPT(tiny).apply({"params": params}, jnp.zeros((1, tiny.seq_len + 1), jnp.int32))
