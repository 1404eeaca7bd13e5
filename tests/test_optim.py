import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

from minigpt_jax import optim
from minigpt_jax.config import Config, ConfigError, parse_overrides
from minigpt_jax.model import init_params


@pytest.fixture(scope="module")
def params():
    c = Config(embed_dim=16, n_heads=2, n_layers=1, seq_len=32, dropout=0.0)
    # shifted so that no leaf is zero (LayerNorm biases start at 0, and decaying 0 changes nothing)
    return jax.tree.map(lambda p: p + 0.5, init_params(c, jax.random.key(0)))


def get_lr(it, lr, warmup, total, min_lr):
    """nanoGPT's get_lr with lr_decay_iters = total."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > total:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (total - warmup)))
    return min_lr + coeff * (lr - min_lr)


def test_cosine_schedule_is_nanogpt_get_lr():
    c = Config(lr=1e-3, lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    sched = optim.schedule(c, total_steps=100)
    for step in (0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 150):
        want = get_lr(step, 1e-3, 10, 100, 1e-4)
        assert float(sched(step)) == pytest.approx(want, rel=1e-5), step


def test_constant_schedule_with_and_without_warmup():
    assert float(optim.schedule(Config(lr=3e-4))(12345)) == pytest.approx(3e-4)
    sched = optim.schedule(Config(lr=1e-3, warmup_steps=4))
    got = [float(sched(s)) for s in (0, 1, 3, 4, 1000)]
    np.testing.assert_allclose(got, [2e-4, 4e-4, 8e-4, 1e-3, 1e-3], rtol=1e-6)


def test_optimizer_applies_the_schedule_and_keeps_lr_in_state(params):
    c = Config(lr=1e-3, lr_schedule="cosine", warmup_steps=3, min_lr_ratio=0.0)
    tx = optim.make_optimizer(c, total_steps=10)
    state = tx.init(params)
    sched = optim.schedule(c, 10)
    grads = jax.tree.map(jnp.ones_like, params)
    for step in range(6):
        _, state = tx.update(grads, state, params)
        assert float(optim.current_lr(state)) == pytest.approx(float(sched(step)), rel=1e-6)
    # lr is a value of the state, not a constant of the program
    assert isinstance(state.hyperparams["learning_rate"], jax.Array)


def test_default_update_equals_optax_adamw_exactly(params):
    c = Config()
    assert (c.lr, c.weight_decay) == (5e-4, 0.01)
    ours, ref = optim.make_optimizer(c), optax.adamw(5e-4, 0.9, 0.999, 1e-8, weight_decay=0.01)
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0) + 0.1, params)
    u1, _ = ours.update(grads, ours.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_clipping_bounds_the_gradient_adam_sees(params):
    """Clipped updates on raw gradients equal unclipped updates on gradients scaled to norm <= 1."""
    key1, key2 = jax.random.split(jax.random.key(1))

    def rand(key, norm):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        g = [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
        g = jax.tree.unflatten(tree, g)
        return jax.tree.map(lambda x: x * (norm / optim.global_norm(g)), g)
    g1, g2 = rand(key1, 100.0), rand(key2, 0.5)  # the second is under the bound: untouched

    def run(config, grads):
        tx = optim.make_optimizer(config)
        state, p = tx.init(params), params
        for g in grads:
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        return p

    clipped = run(Config(grad_clip=1.0), [g1, g2])
    by_hand = run(Config(), [jax.tree.map(lambda x: x / 100.0, g1), g2])
    unclipped = run(Config(), [g1, g2])
    for a, b, c in zip(*map(jax.tree.leaves, (clipped, by_hand, unclipped))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not all(np.allclose(a, c) for a, c in zip(*map(jax.tree.leaves, (clipped, unclipped))))


def changed(config, params) -> dict:
    tx = optim.make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    return {jax.tree_util.keystr(path): bool(jnp.any(u != 0)) for path, u in flat}


def test_matrices_mask_leaves_biases_norms_and_embeddings_undecayed(params):
    moved = changed(Config(decay_params="matrices"), params)
    decayed = sorted(k for k, v in moved.items() if v)
    assert decayed == sorted(k for k in moved if k.endswith("['kernel']")), decayed
    assert {"['layers_0']['attn']['qkv']['kernel']", "['head']['kernel']"} <= set(decayed)
    for k in ("['embed']['embedding']", "['pos']['embed']['embedding']",
              "['layers_0']['ln1']['scale']", "['ln_f']['bias']",
              "['layers_0']['ffn']['fc1']['bias']"):
        assert not moved[k], k


def test_all_decays_every_parameter(params):
    moved = changed(Config(), params)
    assert all(moved.values()), [k for k, v in moved.items() if not v]


def test_options_reach_config_through_set():
    o = parse_overrides(["lr_schedule=cosine", "warmup_steps=100", "min_lr_ratio=0.05",
                         "grad_clip=1.0", "decay_params=matrices"])
    c = Config().replace(**o)
    assert (c.lr_schedule, c.warmup_steps, c.min_lr_ratio, c.grad_clip, c.decay_params) == (
        "cosine", 100, 0.05, 1.0, "matrices")


@pytest.mark.parametrize("overrides, message", [
    ({"lr_schedule": "linear"}, "lr_schedule='linear': must be one of constant, cosine"),
    ({"warmup_steps": -1}, "warmup_steps=-1: must be >= 0"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5: must be in [0, 1]"),
    ({"min_lr_ratio": -0.1}, "min_lr_ratio=-0.1: must be in [0, 1]"),
    ({"grad_clip": -1.0}, "grad_clip=-1.0: must be >= 0"),
    ({"grad_clip": float("nan")}, "grad_clip=nan: must be >= 0"),
    ({"decay_params": "kernels"}, "decay_params='kernels': must be one of all, matrices"),
    ({"warmup_steps": 1.5}, "warmup_steps=1.5: expected int"),
])
def test_bad_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        Config(**overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cosine_needs_a_total_longer_than_warmup():
    c = Config(lr_schedule="cosine", warmup_steps=100)
    with pytest.raises(ConfigError, match="total_steps"):
        optim.make_optimizer(c)
    with pytest.raises(ConfigError, match=r"warmup_steps=100: must be < the run's total steps"):
        optim.make_optimizer(c, total_steps=100)


def test_optimizers_differing_in_lr_share_one_compiled_step(params):
    traces = []

    @jax.jit
    def step(state, grads):
        traces.append(1)
        return state.apply_gradients(grads=grads)

    grads = jax.tree.map(jnp.ones_like, params)
    lrs = []
    for c in (Config(lr=1e-3), Config(lr=5e-4, weight_decay=0.1), Config(lr=2e-4)):
        state = TrainState.create(apply_fn=_apply, params=params, tx=optim.make_optimizer(c))
        state = step(state, grads)
        lrs.append(float(optim.current_lr(state.opt_state)))
        moved = float(state.params["ln_f"]["bias"][0] - params["ln_f"]["bias"][0])
        # Adam's first step is -lr * (sign(g) + weight_decay * p)
        assert moved == pytest.approx(-c.lr * (1 + c.weight_decay * 0.5), rel=1e-4)
    assert len(traces) == 1
    assert lrs == pytest.approx([1e-3, 5e-4, 2e-4])
    assert optim.make_optimizer(Config()) != optim.make_optimizer(Config(grad_clip=1.0))


def _apply(*args):
    raise AssertionError("not called")


@pytest.mark.slow
def test_with_hyperparams_stacks_lrs_for_vmap(params):
    tx = optim.make_optimizer(Config())
    states = jax.vmap(lambda lr: optim.with_hyperparams(tx.init(params), lr))(
        jnp.array([1e-3, 2e-3]))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, states = jax.vmap(lambda s: tx.update(grads, s, params))(states)
    np.testing.assert_allclose(optim.current_lr(states), [1e-3, 2e-3], rtol=1e-6)
    np.testing.assert_allclose(updates["ln_f"]["bias"][:, 0], [-1e-3 * 1.005, -2e-3 * 1.005],
                               rtol=1e-4)
