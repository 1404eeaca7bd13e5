"""--seeds N: the runs, their shared held-out set, the stacked seeds against seeds run apart."""

import numpy as np
import pytest

from minigpt_jax import config, data, evaluation, runner
from minigpt_jax.options import RunOptions

SMALL = {"embed_dim": 16, "n_heads": 2, "n_layers": 1, "seq_len": 32, "batch_size": 4,
         "eval_every": 2, "eval_batches": 1, "eval_final_batches": 3, "val_fraction": 0.2}


def test_seeds_expand_each_experiment_into_named_runs_of_consecutive_seeds():
    p = runner.plan(["baseline", "lr_1e-3"], {"seed": 7}, seeds=3)
    assert list(p.experiments) == [f"{n}_seed{s}" for n in ("baseline", "lr_1e-3")
                                   for s in (7, 8, 9)]
    assert [c.seed for c, _ in p.experiments.values()] == [7, 8, 9, 7, 8, 9]
    assert {c.data_seed for c, _ in p.experiments.values()} == {42}  # the held-out set stays
    assert p.experiment("lr_1e-3_seed8") == "lr_1e-3"
    assert p.experiments["lr_1e-3_seed8"][1].endswith("seed=8")


def test_one_seed_is_todays_plan():
    one, today = (runner.plan(["baseline", "n_layers_1"], seeds=1),
                  runner.plan(["baseline", "n_layers_1"]))
    assert one == today and list(one.experiments) == ["baseline", "n_layers_1"] and not one.groups


@pytest.mark.parametrize("seeds, message", [
    (0, r"--seeds 0: expected a positive integer"),
    (-2, r"--seeds -2: expected a positive integer"),
    (1.5, r"--seeds 1.5: expected a positive integer"),
    (True, r"--seeds True: expected a positive integer"),
])
def test_bad_seed_counts_are_refused(seeds, message):
    with pytest.raises(runner.RunError, match=message):
        runner.plan(["baseline"], seeds=seeds)


def test_a_seed_range_that_leaves_32_bits_is_refused():
    with pytest.raises(runner.RunError,
                       match=r"baseline's seeds 4294967294..4294967296 leave \[0, 2\*\*32\)"):
        runner.plan(["baseline"], {"seed": 2**32 - 2}, seeds=3)


def test_a_reference_outside_the_run_is_refused(tmp_path):
    p = runner.plan(["baseline", "lr_1e-3"], seeds=2)
    with pytest.raises(runner.RunError, match=r"--reference n_layers_1: not an experiment of this"
                       r" run; expected one of baseline, lr_1e-3"):
        runner.check(RunOptions(out=tmp_path / "o", reference="n_layers_1"), p)
    runner.check(RunOptions(out=tmp_path / "o", reference="lr_1e-3"), p)
    assert not (tmp_path / "o").exists()


def test_the_held_out_split_and_samples_do_not_move_with_the_seed():
    rng = np.random.default_rng(0)
    seqs = data.from_arrays([rng.integers(0, 50000, n) for n in rng.integers(40, 300, 60)], "t")
    c = config.Config(**SMALL)
    a, b = data.prepare(seqs, c.replace(seed=1)), data.prepare(seqs, c.replace(seed=2))
    assert a is b  # one memoised split: the data seed decides it
    other = data.prepare(seqs, c.replace(data_seed=7))
    assert not np.array_equal(np.asarray(other.val.starts), np.asarray(a.val.starts))
    first = evaluation.final_batches(a.val, 3, 4, c.data_seed)
    again = evaluation.final_batches(b.val, 3, 4, c.replace(seed=2).data_seed)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


def test_a_checkpoints_config_from_before_data_seed_keeps_its_split():
    saved = config.Config(seed=7).to_dict()
    del saved["data_seed"]
    assert config.Config.from_dict(saved).data_seed == 7
    assert config.Config.from_dict(config.Config(seed=7).to_dict()).data_seed == 42


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    kw = dict(overrides=SMALL, seeds=2, max_steps=4)
    return (runner.run(["baseline"], out=out / "stacked", **kw),
            runner.run(["baseline"], out=out / "apart", seeds_apart=True, **kw))


@pytest.mark.slow
def test_stacked_seeds_equal_seeds_run_apart_and_share_their_held_out_set(both):
    from tests.test_stack import LOSS_RTOL

    stacked, apart = both
    assert [r.name for r in stacked] == ["baseline_seed42", "baseline_seed43"]
    assert [r.stacked for r in stacked] == [2, 2] and [r.stacked for r in apart] == [1, 1]
    assert {r.experiment for r in stacked} == {"baseline"}
    for s, a in zip(stacked, apart):
        np.testing.assert_allclose([r["loss"] for r in s.rows], [r["loss"] for r in a.rows],
                                   rtol=LOSS_RTOL)
        np.testing.assert_allclose(s.final_eval.loss, a.final_eval.loss, rtol=1e-5)
    first, second = stacked
    assert first.rows[-1]["loss"] != second.rows[-1]["loss"]  # the seeds do differ
    assert first.final_eval.tokens == second.final_eval.tokens  # on the same held-out segments
    np.testing.assert_array_equal(first.final_eval.per_segment[:, 1],
                                  second.final_eval.per_segment[:, 1])


@pytest.mark.slow
def test_one_seed_is_the_plain_run_number_for_number(tmp_path):
    """--seeds 1 is the run without it: the experiment's own name, unstacked, and the same
    losses and final evaluation as the driver gives that config directly."""
    import jax

    from minigpt_jax import loop

    [r] = runner.run(["baseline"], overrides=SMALL, seeds=1, max_steps=4, out=tmp_path / "a")
    assert (r.name, r.experiment, r.stacked) == ("baseline", "", 1)
    seqs = runner.load_data(None, [r.config.vocab_size])
    plain = loop.run_experiment(loop.Experiment("baseline", r.config, jax.devices()[0]),
                                data.prepare(seqs, r.config),
                                RunOptions(out=tmp_path / "b", max_steps=4))
    assert [x["loss"] for x in r.rows] == [x["loss"] for x in plain.rows]
    assert r.final_eval.loss == plain.final_eval.loss
