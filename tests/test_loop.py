"""The training loop and parallel experiments in-process: placement, resume, metrics, failures."""

import csv
import json
import re

import jax
import numpy as np
import pytest

from minigpt_jax import (
    checkpoint,
    data,
    evaluation,
    loop,
    parallel,
    program,
    tables,
    train,
)
from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.options import RunOptions


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.default_rng(0)
    return data.from_arrays([rng.integers(0, 50000, n) for n in rng.integers(40, 300, 50)], "test")


def small(**kw) -> Config:
    base = dict(embed_dim=32, n_heads=2, seq_len=32, batch_size=4, eval_every=3, ckpt_every=4,
                val_fraction=0.1, eval_batches=2)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def prep(seqs):
    return data.prepare(seqs, small())


def key(rows):
    return [(r["step"], r["tokens"], r["loss"], r["perplexity"], r["lr"], r["grad_norm"])
            for r in rows]


@pytest.mark.slow
def test_experiments_live_on_their_own_devices_at_once(tmp_path, prep):
    devs = jax.devices()
    assert len(devs) >= 4, "conftest sets JAX_NUM_CPU_DEVICES=6"
    exps = [loop.Experiment(f"e{i}", small(seed=i), devs[i + 1]) for i in range(3)]
    results = parallel.run_all(exps, lambda c: prep, RunOptions(out=tmp_path, max_steps=4))
    for i, r in enumerate(results):
        assert r.status == "ok", r.status
        assert r.state_devices == {devs[i + 1]}
        assert r.device == f"cpu:{i + 1}"
        assert len(r.rows) == 4 and len(r.val_rows) == 2  # step 3 and the end
    assert key(results[0].rows) != key(results[1].rows)  # different seeds


def test_resume_equals_straight_run(tmp_path, prep):
    dev = jax.devices()[2]
    exp = loop.Experiment("baseline", small(dropout=0.1), dev)
    straight = loop.run_experiment(exp, prep, RunOptions(out=tmp_path / "a", max_steps=9))
    loop.run_experiment(exp, prep, RunOptions(out=tmp_path / "b", max_steps=5))
    resumed = loop.run_experiment(exp, prep,
                                  RunOptions(out=tmp_path / "b", max_steps=9, resume=True))
    assert resumed.status == "ok" and len(resumed.rows) == 9
    assert key(resumed.rows) == key(straight.rows)
    # the first invocation ended at step 5 and evaluated there too; the rest is the same
    assert [(r["step"], r["val_loss"]) for r in resumed.val_rows if r["step"] != 5] == \
        [(r["step"], r["val_loss"]) for r in straight.val_rows]
    p1 = jax.tree_util.tree_leaves(straight.state.params)
    p2 = jax.tree_util.tree_leaves(resumed.state.params)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2))


@pytest.mark.slow
def test_resume_cuts_the_metrics_back_to_the_checkpoint(tmp_path, prep):
    """Rows written after the checkpoint a run resumes from are not kept twice."""
    exp = loop.Experiment("baseline", small(ckpt_every=4), jax.devices()[0])
    loop.run_experiment(exp, prep, RunOptions(out=tmp_path, max_steps=6))  # checkpoints at 4 and 6
    for step in (6,):
        mngr = checkpoint.manager(tmp_path / "checkpoints" / "baseline")
        mngr.delete(step)  # as if killed between step 6's rows and its checkpoint
    resumed = loop.run_experiment(exp, prep, RunOptions(out=tmp_path, max_steps=8, resume=True))
    assert [r["step"] for r in resumed.rows] == list(range(1, 9))
    jsonl = [json.loads(line)["step"] for line in open(tmp_path / "metrics_baseline.jsonl")]
    assert jsonl == sorted(jsonl) and len([s for s in jsonl if s == 5]) == 1


def test_checkpoint_holds_state_config_and_a_fixed_size_progress(tmp_path, prep):
    c = small()
    loop.run_experiment(loop.Experiment("baseline", c, jax.devices()[0]), prep,
                        RunOptions(out=tmp_path, max_steps=5))
    mngr = checkpoint.manager(tmp_path / "checkpoints" / "baseline")
    assert mngr.all_steps() == [4, 5]
    assert checkpoint.read_config(mngr, 5) == c
    state, progress = checkpoint.restore(mngr, 5, c)
    rows = list(csv.DictReader(open(tmp_path / "metrics_baseline.csv")))
    assert int(state.step) == 5
    assert progress == {"step": 5, "next_batch": 5, "tokens": int(rows[-1]["tokens"]),
                        "seconds": progress["seconds"], "data": ""} and progress["seconds"] > 0


def test_metrics_go_to_csv_jsonl_and_tensorboard(tmp_path, prep):
    loop.run_experiment(loop.Experiment("m", small(), jax.devices()[0]), prep,
                        RunOptions(out=tmp_path, max_steps=4))
    rows = list(csv.DictReader(open(tmp_path / "metrics_m.csv")))
    assert list(rows[0]) == ["step", *loop.TRAIN_FIELDS]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["lr"]) == pytest.approx(5e-4, rel=1e-6) and float(r["grad_norm"]) > 0
               and float(r["seconds"]) > 0 for r in rows)
    val = list(csv.DictReader(open(tmp_path / "metrics_m_val.csv")))
    assert [int(r["step"]) for r in val] == [3, 4]
    assert len((tmp_path / "metrics_m.jsonl").read_text().splitlines()) == 4 + 2
    assert list((tmp_path / "tensorboard" / "m").glob("events*"))


def test_experiments_differing_only_in_lr_share_one_compilation(prep):
    from minigpt_jax import train

    batch = jax.numpy.asarray(prep.train[:4])
    before = train.train_step._cache_size()
    for lr in (1e-4, 2e-4, 3e-4):
        c = small(lr=lr, seed=3, batch_size=4)
        state, m = train.train_step(train.create_state(c), batch, jax.random.key(0))
        assert float(m["lr"]) == pytest.approx(lr)
    assert train.train_step._cache_size() == before + 1


def test_resume_with_other_config_is_refused(tmp_path, prep):
    loop.run_experiment(loop.Experiment("baseline", small(), jax.devices()[0]), prep,
                        RunOptions(out=tmp_path, max_steps=2))
    with pytest.raises(checkpoint.CheckpointError, match=r"another config \(lr: 0.0005 vs 0.001"):
        checkpoint.check_resumable(tmp_path, {"baseline": small(lr=1e-3)})
    checkpoint.check_resumable(tmp_path, {"baseline": small()})


def test_nan_stops_only_that_experiment(tmp_path, prep, monkeypatch):
    real_step = program.train_step

    def poisoned(state, batch, rng):  # the experiment with lr 7e-4 diverges at step 7
        bad = abs(float(state.opt_state.hyperparams["learning_rate"]) - 7e-4) < 1e-9
        state, m = real_step(state, batch, rng)
        if bad and int(state.step) >= 7:
            m = {**m, "loss": m["loss"] * float("nan")}
        return state, m

    monkeypatch.setattr(program, "train_step", poisoned)
    devs = jax.devices()
    exps = [loop.Experiment("bad", small(lr=7e-4), devs[1]),
            loop.Experiment("good", small(), devs[2])]
    bad, good = parallel.run_all(exps, lambda c: prep, RunOptions(out=tmp_path, max_steps=10))
    assert bad.status == "failed: bad: non-finite loss at step 7", bad.status
    assert good.status == "ok" and len(good.rows) == 10
    assert len(bad.rows) == 6  # the rows before the diverging step are kept
    # the last good checkpoint (step 4) is kept, and it is finite
    mngr = checkpoint.manager(tmp_path / "checkpoints" / "bad")
    assert mngr.latest_step() == 4
    state, _ = checkpoint.restore(mngr, 4, exps[0].config)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_exception_in_one_experiment_is_contained(tmp_path, prep):
    def prepare(c):
        if c.seed == 13:
            raise RuntimeError("disk on fire")
        return prep

    exps = [loop.Experiment("a", small(seed=13), jax.devices()[0]),
            loop.Experiment("b", small(), jax.devices()[0])]
    a, b = parallel.run_all(exps, prepare, RunOptions(out=tmp_path, max_steps=2))
    assert a.status == "failed: disk on fire" and b.status == "ok"


def test_block_boundaries_depend_only_on_absolute_step():
    c = small(eval_every=50, ckpt_every=100)
    assert loop.block_end(0, 1000, c) == 10
    assert loop.block_end(5, 1000, c) == 10
    assert loop.block_end(95, 97, c) == 97
    assert loop.block_end(0, 1000, small(eval_every=4, ckpt_every=0)) == 4  # 0: by the clock only


@pytest.mark.slow
def test_fused_blocks_match_single_steps_and_resume_at_block_boundaries(tmp_path, prep):
    """The accelerator path (blocks in one dispatch; a short last block masked), forced on the
    CPU."""
    c = small(dropout=0.1, eval_every=10, ckpt_every=10)
    exp = loop.Experiment("baseline", c, jax.devices()[3])
    single = loop.run_experiment(exp, prep,
                                 RunOptions(out=tmp_path / "s", max_steps=13, fuse=False))
    fused = loop.run_experiment(exp, prep, RunOptions(out=tmp_path / "f", max_steps=13, fuse=True))
    np.testing.assert_allclose([r["loss"] for r in fused.rows], [r["loss"] for r in single.rows],
                               rtol=1e-6)
    assert [r["tokens"] for r in fused.rows] == [r["tokens"] for r in single.rows]
    assert len(fused.rows) == 13
    loop.run_experiment(exp, prep, RunOptions(out=tmp_path / "r", max_steps=10, fuse=True))
    resumed = loop.run_experiment(exp, prep, RunOptions(out=tmp_path / "r", max_steps=13,
                                                        resume=True, fuse=True))
    assert key(resumed.rows) == key(fused.rows)
    p1 = jax.tree_util.tree_leaves(resumed.state.params)
    p2 = jax.tree_util.tree_leaves(fused.state.params)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2))  # the masked steps changed nothing


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MB tmpfs: room for one checkpoint of small() (about 39 MB) and not for two."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()}); "
                    "test_a_failing_writer_stops_with_one_line covers the behaviour")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_with_one_line_and_keeps_the_last_checkpoint(small_disk, prep, capfd):
    c = small(ckpt_every=2, eval_every=100)
    r = loop.run_experiment(loop.Experiment("full", c, jax.devices()[0]), prep,
                            RunOptions(out=small_disk, max_steps=8))
    err = capfd.readouterr().err
    ckpt = small_disk / "checkpoints" / "full"
    m = re.fullmatch(rf"failed: checkpoint {re.escape(str(ckpt))}: saving step (\d+) failed"
                     r" \(No space left on device; it needs about 37 MB, \d+ MB free there\);"
                     r" the checkpoint of step (\d+) is kept", r.status)
    assert m, r.status
    failed, kept = int(m.group(1)), int(m.group(2))
    assert kept == failed - 2 and failed < 8
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]
    mngr = checkpoint.manager(ckpt)
    assert mngr.latest_step() == kept
    checkpoint.verify(mngr, kept, c)  # the previous checkpoint is whole
    # the metrics are kept
    assert [row["step"] for row in r.rows][:failed] == list(range(1, failed + 1))
    assert r.state is not None  # the trained state survives for an export


def test_a_failing_writer_stops_with_one_line(tmp_path, prep, monkeypatch, capfd):
    """The same without a small filesystem: the Orbax write itself fails with ENOSPC."""
    import errno

    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    c = small(ckpt_every=2, eval_every=100)
    r = loop.run_experiment(loop.Experiment("w", c, jax.devices()[0]), prep,
                            RunOptions(out=tmp_path, max_steps=8))
    ckpt = tmp_path / "checkpoints" / "w"
    assert r.status.startswith(f"failed: checkpoint {ckpt}: saving step 4 failed"
                               " (No space left on device;")
    assert r.status.endswith("; the checkpoint of step 2 is kept") and "\n" not in r.status
    assert "Traceback" not in capfd.readouterr().err
    assert checkpoint.manager(ckpt).latest_step() == 2
    assert [row["step"] for row in r.rows][:4] == [1, 2, 3, 4]  # the metrics are kept


@pytest.mark.slow
def test_a_stopped_cosine_run_resumes_on_the_same_schedule(tmp_path, prep):
    """The schedule's length is the run's: a resumed run rebuilds it from the same total."""
    import threading

    c = small(lr_schedule="cosine", warmup_steps=2, dropout=0.1)
    exp = loop.Experiment("cos", c, jax.devices()[0])
    straight = loop.run_experiment(exp, prep, RunOptions(out=tmp_path / "a", max_steps=9))
    stop = threading.Event()
    stop.set()  # honoured at the first block's end (step 3)
    stopped = loop.run_experiment(exp, prep, RunOptions(out=tmp_path / "b", max_steps=9, stop=stop))
    assert stopped.status == "stopped at step 3"
    resumed = loop.run_experiment(exp, prep,
                                  RunOptions(out=tmp_path / "b", max_steps=9, resume=True))
    assert resumed.status == "ok" and key(resumed.rows) == key(straight.rows)
    lrs = [r["lr"] for r in straight.rows]
    assert lrs[:3] == pytest.approx([5e-4 / 3, 1e-3 / 3, 5e-4], rel=1e-6)  # nanoGPT's warmup
    assert lrs[2] > lrs[5] > lrs[8] > 0  # then the cosine down


def test_nothing_held_out_means_no_evaluation(tmp_path, seqs):
    """val_fraction=0 (training on everything, as the PyTorch project did): no validation rows."""
    c = small(val_fraction=0.0)
    r = loop.run_experiment(loop.Experiment("all", c, jax.devices()[0]), data.prepare(seqs, c),
                            RunOptions(out=tmp_path, max_steps=4))
    assert r.status == "ok" and len(r.rows) == 4 and r.val_rows == []
    assert tables.row(r)["val_loss"] is None


def test_resume_on_other_data_is_refused(tmp_path, prep):
    e = loop.Experiment("baseline", small(), jax.devices()[0], data_id="a" * 64)
    loop.run_experiment(e, prep, RunOptions(out=tmp_path, max_steps=2))
    with pytest.raises(checkpoint.CheckpointError, match=r"trained on other data.*other.pt"):
        checkpoint.check_resumable(tmp_path, {"baseline": small()}, "b" * 64, "other.pt")
    checkpoint.check_resumable(tmp_path, {"baseline": small()}, "a" * 64, "same.pt")  # same data
    with pytest.raises(checkpoint.CheckpointError, match=r"another config \(segmentation"):
        checkpoint.check_resumable(tmp_path, {"baseline": small(segmentation="chunks")}, "a" * 64)


def test_final_evaluation_of_zero_batches_is_every_held_out_batch(tmp_path, prep):
    """eval_final_batches=0: exactly the figure of evaluating every held-out batch in turn; a
    bound below the held-out set's size evaluates fewer segments."""
    c = small(eval_final_batches=0)
    r = loop.run_experiment(loop.Experiment("all", c, jax.devices()[0]), prep,
                            RunOptions(out=tmp_path / "a", max_steps=2))
    sums, counts = [], []
    for batch in data.eval_batches(prep.val, c.batch_size):
        m = jax.device_get(train.eval_step(r.state, batch))
        sums.append(m["loss_sum"])
        counts.append(m["tokens"])
    whole = evaluation.summarize(np.concatenate(sums), np.concatenate(counts))
    labels = int(np.count_nonzero(np.asarray(prep.val)[:, 1:] != PAD_TOKEN_ID))
    assert r.final_eval.tokens == whole.tokens == labels
    assert r.final_eval.segments == whole.segments
    assert r.final_eval.loss == pytest.approx(whole.loss, rel=1e-6)
    assert r.val_rows[-1]["val_loss"] == pytest.approx(whole.loss, rel=1e-6)
    bounded = loop.run_experiment(loop.Experiment("one", small(eval_final_batches=1),
                                                  jax.devices()[0]), prep,
                                  RunOptions(out=tmp_path / "b", max_steps=2))
    assert bounded.final_eval.segments <= c.batch_size < whole.segments


def test_bounded_final_sample_is_the_same_across_experiments_data_copies_and_a_resume(
        tmp_path, seqs, prep):
    c = small(eval_final_batches=2)
    assert 2 * c.batch_size < len(prep.val), "the bound must make it a sample"
    again = data.prepare(data.from_arrays(seqs.to_list(), "the same data, read again"), c)
    picked = evaluation.final_batches(prep.val, 2, c.batch_size, c.seed)
    np.testing.assert_array_equal(
        np.stack(picked), np.stack(evaluation.final_batches(again.val, 2, c.batch_size, c.seed)))
    dev = jax.devices()[0]
    a = loop.run_experiment(loop.Experiment("a", c, dev), prep,
                            RunOptions(out=tmp_path / "a", max_steps=6))
    b = loop.run_experiment(loop.Experiment("b", c.replace(lr=1e-3), dev), prep,
                            RunOptions(out=tmp_path / "b", max_steps=6))
    assert a.final_eval.loss != b.final_eval.loss  # other weights, the same held-out rows
    assert ((a.final_eval.tokens, a.final_eval.segments)
            == (b.final_eval.tokens, b.final_eval.segments))
    assert a.final_eval.tokens == int(np.count_nonzero(np.stack(picked)[:, :, 1:] != PAD_TOKEN_ID))
    loop.run_experiment(loop.Experiment("a", c, dev), prep,
                        RunOptions(out=tmp_path / "c", max_steps=3))
    resumed = loop.run_experiment(loop.Experiment("a", c, dev), prep,
                                  RunOptions(out=tmp_path / "c", max_steps=6, resume=True))
    assert resumed.final_eval == a.final_eval


def test_phase_times_and_throughput_without_compilation(tmp_path, prep):
    r = loop.run_experiment(loop.Experiment("p", small(), jax.devices()[0]), prep,
                            RunOptions(out=tmp_path, max_steps=4))
    assert {"compile", "train", "final_eval"} <= set(r.phases)
    assert all(r.phases[k] > 0 for k in ("compile", "train", "final_eval")), r.phases
    row = tables.row(r)
    elapsed = r.rows[-1]["elapsed"]  # training seconds, compilation left out
    assert row["compile_seconds"] == round(r.phases["compile"], 2)
    assert row["tokens_per_second"] == pytest.approx(r.tokens / elapsed, abs=0.1)
    assert elapsed <= r.phases["train"] + 1e-6
    assert row["tokens_per_second"] * r.phases["train"] >= r.tokens * (1 - 1e-6)
    with_compile = r.tokens / (elapsed + r.phases["compile"])
    assert row["tokens_per_second"] > with_compile
