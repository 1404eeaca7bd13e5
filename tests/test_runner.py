"""The runner in-process: device placement, resume, failures that stay contained."""

import pathlib

import jax
import numpy as np
import pytest

from minigpt_jax import checkpoint, data, runner
from minigpt_jax.config import Config


@pytest.fixture(scope="module")
def chunks():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 50000, n) for n in rng.integers(10, 120, 60)]
    return data.split_chunks(data.chunk_sequences(seqs, 32), 0.1, 0)


def small(**kw) -> Config:
    base = dict(embed_dim=32, n_heads=2, seq_len=32, batch_size=4, eval_every=3, ckpt_every=4)
    return Config(**{**base, **kw})


def key(rows):
    return [(r["step"], r["tokens"], r["loss"], r["perplexity"]) for r in rows]


@pytest.fixture
def quiet_outputs(monkeypatch):
    """Skip plots and exports: these tests are about training."""
    monkeypatch.setattr(runner, "write_experiment_outputs", lambda out, r: None)


def test_experiments_live_on_their_own_devices_at_once(tmp_path, chunks, quiet_outputs):
    devs = jax.devices()
    assert len(devs) >= 4, "conftest sets JAX_NUM_CPU_DEVICES=6"
    exps = [runner.Experiment(f"e{i}", small(seed=i), devs[i + 1]) for i in range(3)]
    results = runner.run_all(exps, lambda c: chunks, tmp_path, max_steps=4)
    for i, r in enumerate(results):
        assert r.status == "ok", r.status
        assert r.state_devices == {devs[i + 1]}
        assert r.device == f"cpu:{i + 1}"
        assert len(r.rows) == 4 and len(r.val_rows) == 2  # step 3 and the end
    assert key(results[0].rows) != key(results[1].rows)  # different seeds


def test_resume_equals_straight_run(tmp_path, chunks):
    tr, va = chunks
    dev = jax.devices()[2]
    exp = runner.Experiment("baseline", small(dropout=0.1), dev)
    straight = runner.run_experiment(exp, tr, va, tmp_path / "a", max_steps=9)
    runner.run_experiment(exp, tr, va, tmp_path / "b", max_steps=5)
    resumed = runner.run_experiment(exp, tr, va, tmp_path / "b", max_steps=9, resume=True)
    assert resumed.status == "ok" and len(resumed.rows) == 9
    assert key(resumed.rows) == key(straight.rows)
    p1 = jax.tree_util.tree_leaves(straight.state.params)
    p2 = jax.tree_util.tree_leaves(resumed.state.params)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2))


def test_checkpoint_holds_state_config_and_progress(tmp_path, chunks):
    tr, va = chunks
    c = small()
    runner.run_experiment(runner.Experiment("baseline", c, jax.devices()[0]), tr, va, tmp_path, max_steps=5)
    mngr = checkpoint.manager(tmp_path / "checkpoints" / "baseline")
    assert mngr.all_steps() == [4, 5]
    assert checkpoint.read_config(mngr, 5) == c
    state, progress = checkpoint.restore(mngr, 5, c)
    assert int(state.step) == 5 and progress["next_batch"] == 5 and len(progress["rows"]) == 5


def test_resume_with_other_config_is_refused(tmp_path, chunks):
    tr, va = chunks
    runner.run_experiment(runner.Experiment("baseline", small(), jax.devices()[0]), tr, va, tmp_path, max_steps=2)
    with pytest.raises(checkpoint.CheckpointError, match=r"another config \(lr: 0.0005 vs 0.001"):
        runner.check_resumable(tmp_path, {"baseline": small(lr=1e-3)})
    runner.check_resumable(tmp_path, {"baseline": small()})


def test_nan_stops_only_that_experiment(tmp_path, chunks, quiet_outputs, monkeypatch):
    real_step = runner.train_step

    def poisoned(state, batch, rng):  # the experiment with seed 99 diverges at step 7
        seed_99 = state.apply_fn.__self__.config.seed == 99
        state, m = real_step(state, batch, rng)
        if seed_99 and int(state.step) >= 7:
            m = {**m, "loss": m["loss"] * float("nan")}
        return state, m

    monkeypatch.setattr(runner, "train_step", poisoned)
    devs = jax.devices()
    exps = [runner.Experiment("bad", small(seed=99), devs[1]), runner.Experiment("good", small(), devs[2])]
    bad, good = runner.run_all(exps, lambda c: chunks, tmp_path, max_steps=10)
    assert bad.status == "failed: bad: non-finite loss at step 7", bad.status
    assert good.status == "ok" and len(good.rows) == 10
    assert len(bad.rows) == 6  # the rows before the diverging block are kept
    # the last good checkpoint (step 4) is kept, and it is finite
    mngr = checkpoint.manager(tmp_path / "checkpoints" / "bad")
    assert mngr.latest_step() == 4
    state, _ = checkpoint.restore(mngr, 4, exps[0].config)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_exception_in_one_experiment_is_contained(tmp_path, chunks, quiet_outputs):
    def chunks_for(c):
        if c.seed == 13:
            raise RuntimeError("disk on fire")
        return chunks

    exps = [runner.Experiment("a", small(seed=13), jax.devices()[0]), runner.Experiment("b", small(), jax.devices()[0])]
    a, b = runner.run_all(exps, chunks_for, tmp_path, max_steps=2)
    assert a.status == "failed: disk on fire" and b.status == "ok"


def test_block_boundaries_depend_only_on_absolute_step():
    c = small(eval_every=50, ckpt_every=100)
    assert runner.block_end(0, 1000, c) == 10
    assert runner.block_end(5, 1000, c) == 10
    assert runner.block_end(95, 97, c) == 97


def test_fused_blocks_match_single_steps_and_resume_at_block_boundaries(tmp_path, chunks):
    """The accelerator path (whole LOG_EVERY blocks in one dispatch), forced on the CPU."""
    tr, va = chunks
    c = small(dropout=0.1, eval_every=10, ckpt_every=10)
    exp = runner.Experiment("baseline", c, jax.devices()[3])
    single = runner.run_experiment(exp, tr, va, tmp_path / "s", max_steps=12, fuse=False)
    fused = runner.run_experiment(exp, tr, va, tmp_path / "f", max_steps=12, fuse=True)
    np.testing.assert_allclose([r["loss"] for r in fused.rows], [r["loss"] for r in single.rows], rtol=1e-6)
    assert [r["tokens"] for r in fused.rows] == [r["tokens"] for r in single.rows]
    runner.run_experiment(exp, tr, va, tmp_path / "r", max_steps=10, fuse=True)
    resumed = runner.run_experiment(exp, tr, va, tmp_path / "r", max_steps=12, resume=True, fuse=True)
    assert key(resumed.rows) == key(fused.rows)
