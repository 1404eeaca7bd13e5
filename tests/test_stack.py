"""Stacked variants: each equals its separate run; own checkpoints and metrics; one compilation."""

import jax
import numpy as np
import pytest

from minigpt_jax import checkpoint, data, loop, parallel, stack, tables
from minigpt_jax.config import Config
from minigpt_jax.options import RunOptions

# Float32 tolerance of a stacked variant against its separate run: a vmapped matmul is another
# kernel than a single one, so the two differ by rounding, which training carries forward.
# Losses: relative, per step. Params: absolute, in units of the variant's lr, because AdamW's
# m / sqrt(v) turns a rounding-sized difference in a near-zero gradient into an update
# difference of up to one lr in that element. (Measured on the CPU over 8 steps: losses within
# 1e-7 relative, params within 0.05 lr; an update message: a change that moves these numbers
# past the bounds changes the stacked program's arithmetic, not just its rounding.)
LOSS_RTOL = 1e-6
PARAM_ATOL_LR = 0.1


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.default_rng(0)
    return data.from_arrays([rng.integers(0, 50000, n) for n in rng.integers(40, 300, 50)], "test")


def small(**kw) -> Config:
    base = {"embed_dim": 32, "n_heads": 2, "seq_len": 32, "batch_size": 4, "eval_every": 3, "ckpt_every": 4,
                "val_fraction": 0.1, "eval_batches": 2, "dropout": 0.1}
    return Config(**{**base, **kw})


VARIANTS = {"a": {"lr": 5e-4, "seed": 0}, "b": {"lr": 1e-3, "seed": 1, "weight_decay": 0.1},
            "c": {"lr": 2e-4, "seed": 2, "max_epochs": 2}}
STEPS = 8


def experiments(device):
    return [loop.Experiment(n, small(**kw), device, ", ".join(f"{k}={v}" for k, v in kw.items()))
            for n, kw in VARIANTS.items()]


@pytest.fixture(scope="module")
def separate(seqs, tmp_path_factory):
    """Each variant run alone, on its own data (the held-out split depends on the seed)."""
    out = tmp_path_factory.mktemp("separate")
    return {e.name: loop.run_experiment(e, data.prepare(seqs, e.config), RunOptions(out=out, max_steps=STEPS))
            for e in experiments(jax.devices()[1])}


@pytest.fixture(scope="module")
def stacked(seqs, tmp_path_factory):
    out = tmp_path_factory.mktemp("stacked")
    exps = experiments(jax.devices()[1])
    before = stack.stacked_step._cache_size()
    results = stack.run_stacked(exps, [data.prepare(seqs, e.config) for e in exps], RunOptions(out=out, max_steps=STEPS))
    return out, results, stack.stacked_step._cache_size() - before


def test_each_variant_equals_its_separate_run(separate, stacked):
    _, results, _ = stacked
    for r in results:
        alone = separate[r.name]
        assert r.status == "ok" and alone.status == "ok", (r.status, alone.status)
        assert [x["step"] for x in r.rows] == list(range(1, STEPS + 1))
        assert [x["tokens"] for x in r.rows] == [x["tokens"] for x in alone.rows]  # same batches
        assert [x["lr"] for x in r.rows] == [x["lr"] for x in alone.rows]
        np.testing.assert_allclose([x["loss"] for x in r.rows], [x["loss"] for x in alone.rows],
                                   rtol=LOSS_RTOL, err_msg=r.name)
        np.testing.assert_allclose([x["val_loss"] for x in r.val_rows],
                                   [x["val_loss"] for x in alone.val_rows], rtol=LOSS_RTOL)
        assert [x["step"] for x in r.val_rows] == [3, 6, 8]
        for a, b in zip(jax.tree_util.tree_leaves(r.state.params),
                        jax.tree_util.tree_leaves(alone.state.params)):
            np.testing.assert_allclose(a, b, atol=PARAM_ATOL_LR * r.config.lr, rtol=0)
        assert int(r.state.step) == STEPS and r.state_devices == {jax.devices()[1]}
    # the variants really differ: not one run copied three times
    a, b = results[0].rows, results[1].rows
    assert a[0]["loss"] != b[0]["loss"]


def test_each_variant_has_its_own_checkpoint_and_metrics(stacked):
    out, results, _ = stacked
    for r in results:
        mngr = checkpoint.manager(checkpoint.checkpoint_dir(out, r.name))
        assert mngr.all_steps() == [4, 8]
        assert checkpoint.read_config(mngr, 8) == r.config
        state, progress = checkpoint.restore(mngr, 8, r.config)
        assert progress["step"] == 8 and progress["tokens"] == r.rows[-1]["tokens"]
        for x, y in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(r.state.params)):
            np.testing.assert_array_equal(x, y)
        assert (out / f"metrics_{r.name}.csv").is_file() and (out / f"metrics_{r.name}_val.csv").is_file()
        assert tables.row(r)["experiment"] == r.name and tables.row(r)["overrides"] == r.overrides


def test_the_stacked_step_compiles_once(stacked):
    assert stacked[2] == 1


def test_stacked_resume_equals_straight_run(seqs, stacked, tmp_path):
    _, straight, _ = stacked
    exps = experiments(jax.devices()[1])
    preps = [data.prepare(seqs, e.config) for e in exps]
    stack.run_stacked(exps, preps, RunOptions(out=tmp_path, max_steps=5))
    resumed = stack.run_stacked(exps, preps, RunOptions(out=tmp_path, max_steps=STEPS, resume=True))
    for r, s in zip(resumed, straight):
        assert r.status == "ok"
        assert [(x["step"], x["loss"], x["tokens"]) for x in r.rows] == \
            [(x["step"], x["loss"], x["tokens"]) for x in s.rows]


def test_a_diverging_variant_fails_alone(seqs, separate, tmp_path, monkeypatch):
    real = stack.stacked_step

    def poisoned(state, batches, rngs, active):  # variant b's loss is NaN from step 6
        state, m = real(state, batches, rngs, active)
        bad = (np.arange(3) == 1) & (np.asarray(state.step) >= 6)
        return state, {**m, "loss": jax.numpy.where(bad, np.nan, m["loss"])}

    monkeypatch.setattr(stack, "stacked_step", poisoned)
    exps = experiments(jax.devices()[1])
    a, b, c = stack.run_stacked(exps, [data.prepare(seqs, e.config) for e in exps], RunOptions(out=tmp_path, max_steps=STEPS))
    assert b.status == "failed: b: non-finite loss at step 6" and b.state is None
    assert [x["step"] for x in b.rows] == [1, 2, 3, 4, 5]
    assert checkpoint.manager(checkpoint.checkpoint_dir(tmp_path, "b")).latest_step() == 4
    for r in (a, c):  # the others go on, unchanged
        assert r.status == "ok"
        np.testing.assert_allclose([x["loss"] for x in r.rows], [x["loss"] for x in separate[r.name].rows],
                                   rtol=LOSS_RTOL)


def test_fused_blocks_match_single_steps(seqs, stacked, tmp_path):
    """The accelerator path (blocks in one dispatch, masked tail), forced on the CPU."""
    _, single, _ = stacked
    exps = experiments(jax.devices()[1])
    fused = stack.run_stacked(exps, [data.prepare(seqs, e.config) for e in exps], RunOptions(out=tmp_path, max_steps=STEPS, fuse=True))
    for f, s in zip(fused, single):
        np.testing.assert_allclose([x["loss"] for x in f.rows], [x["loss"] for x in s.rows], rtol=LOSS_RTOL)
        assert [x["tokens"] for x in f.rows] == [x["tokens"] for x in s.rows]


def test_stackable_refuses_what_is_not_a_value():
    assert stack.stackable([small(lr=1e-3, seed=1, weight_decay=0.0, max_epochs=3), small()]) == (True, "")
    ok, why = stack.stackable([small(), small(embed_dim=64)], ["base", "wide"])
    assert not ok and why.startswith("base and wide differ in embed_dim: 32 vs 64: different shapes")
    ok, why = stack.stackable([small(), small(batch_size=8)])
    assert not ok and "batch_size: 4 vs 8: different shapes" in why
    ok, why = stack.stackable([small(), small(grad_clip=1.0)])
    assert not ok and "grad_clip: 0.0 vs 1.0" in why and "static in the optimizer" in why
    ok, why = stack.stackable([small(), small(dropout=0.0)])
    assert not ok and "dropout: 0.1 vs 0.0" in why
    ok, why = stack.stackable([small(lr_schedule="cosine"), small(lr_schedule="cosine", max_epochs=2)])
    assert not ok and "cosine" in why
    with pytest.raises(ValueError, match="cannot stack: x and y differ in n_layers: 2 vs 1: different shapes"):
        stack.run_stacked([loop.Experiment("x", small(), jax.devices()[0]),
                           loop.Experiment("y", small(n_layers=1), jax.devices()[0])], None, RunOptions(out="unused"))
    with pytest.raises(ValueError, match="share one device; got x on cpu:0, y on cpu:1"):
        stack.run_stacked([loop.Experiment("x", small(), jax.devices()[0]),
                           loop.Experiment("y", small(), jax.devices()[1])], None, RunOptions(out="unused"))


@pytest.mark.slow
def test_variants_of_different_lengths_each_stop_at_their_own_end(seqs, tmp_path):
    """One epoch and two: the shorter variant is frozen at its end and equals its separate run."""
    few = data.from_arrays([np.asarray(seqs.tokens[seqs.offsets[i]:seqs.offsets[i + 1]]) for i in range(8)],
                              "few")
    exps = [loop.Experiment("one", small(max_epochs=1, seed=5), jax.devices()[1]),
            loop.Experiment("two", small(max_epochs=2, seed=5, lr=1e-3), jax.devices()[1])]
    prep = data.prepare(few, exps[0].config)
    per_epoch = data.steps_per_epoch(len(prep.train), 4)
    assert 2 <= per_epoch <= 8, per_epoch
    stacked = stack.run_stacked(exps, prep, RunOptions(out=tmp_path / "stacked"))
    for r, e in zip(stacked, exps):
        alone = loop.run_experiment(e, prep, RunOptions(out=tmp_path / "alone"))
        assert r.status == "ok" and len(r.rows) == e.config.max_epochs * per_epoch
        np.testing.assert_allclose([x["loss"] for x in r.rows], [x["loss"] for x in alone.rows], rtol=LOSS_RTOL)
        assert [x["step"] for x in r.val_rows] == [x["step"] for x in alone.val_rows]
        assert checkpoint.manager(checkpoint.checkpoint_dir(tmp_path / "stacked", r.name)).latest_step() == len(r.rows)
        assert int(r.state.step) == len(r.rows)


@pytest.mark.slow
def test_run_all_stacks_what_shares_a_device_and_a_program(seqs, separate, tmp_path):
    d1, d2 = jax.devices()[1], jax.devices()[2]
    a, b, c = experiments(d1)
    exps = [a, loop.Experiment("wide", small(embed_dim=64), d1), b, loop.Experiment("c2", c.config, d2)]
    assert stack.groups(exps) == [[0, 2], [1], [3]]
    done = []
    results = parallel.run_all(exps, lambda cfg: data.prepare(seqs, cfg), RunOptions(out=tmp_path, max_steps=2, on_result=lambda r: done.append(r.name), stack=True))
    assert [r.name for r in results] == ["a", "wide", "b", "c2"] and sorted(done) == sorted(["a", "wide", "b", "c2"])
    assert all(r.status == "ok" and len(r.rows) == 2 for r in results), [r.status for r in results]
    for r, name in ((results[0], "a"), (results[2], "b"), (results[3], "c")):
        np.testing.assert_allclose([x["loss"] for x in r.rows], [x["loss"] for x in separate[name].rows[:2]],
                                   rtol=LOSS_RTOL)
    assert results[1].state_devices == {d1} and results[3].state_devices == {d2}


def test_what_cannot_run_as_one_stack_is_refused_before_anything_is_written(seqs, tmp_path):
    few = data.from_arrays([np.asarray(seqs.tokens[seqs.offsets[i]:seqs.offsets[i + 1]]) for i in range(8)],
                              "few")
    exps = [loop.Experiment(n, small(lr_schedule="cosine"), jax.devices()[0]) for n in ("x", "y")]
    preps = [data.prepare(seqs, exps[0].config), data.prepare(few, exps[0].config)]
    with pytest.raises(ValueError, match=r"optimizer programs differ \(a cosine schedule's length is static"):
        stack.run_stacked(exps, preps, RunOptions(out=tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    # a resume whose variants' checkpoints are at different steps (one was resumed alone)
    with pytest.raises(ValueError, match=r"one step \(a at step 4, b at step 8\); resume them without --stack"):
        loop.common_step(["a", "b", "c"], [4, 8, 10], [10, 10, 10])  # c finished: not asked
    assert loop.common_step(["a", "b", "c"], [4, 4, 10], [10, 10, 10]) == 4
