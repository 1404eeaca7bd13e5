"""stats.py against scipy on written per-seed numbers; seeds.py on made-up Results."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from minigpt_jax import evaluation, seeds, stats
from minigpt_jax.config import Config
from tests.test_report import fake_result

# n_layers_1 minus baseline on seeds 42, 43, 44 of `make run` (paired p 0.047)
BASE = [6.894, 7.412, 6.503]
WORSE = [b + d for b, d in zip(BASE, [0.103, 0.228, 0.152])]


def test_summary_is_mean_sample_std_and_students_t_interval():
    s = stats.summary([6.90, 6.88, 6.95, None, math.nan])
    x = np.array([6.90, 6.88, 6.95])
    lo, hi = sps.t.interval(0.95, 2, loc=x.mean(), scale=sps.sem(x))
    assert s.n == 3 and s.mean == pytest.approx(x.mean()) and s.std == pytest.approx(x.std(ddof=1))
    assert s.ci95 == pytest.approx((hi - lo) / 2) and s.ci95 == pytest.approx(4.303 * s.std / 3**0.5,
                                                                              rel=1e-3)
    one = stats.summary([5.0])
    assert (one.n, one.mean) == (1, 5.0) and math.isnan(one.std) and math.isnan(one.ci95)
    assert stats.summary([]).n == 0


def test_paired_comparison_is_scipys_paired_t_test():
    p = stats.paired(WORSE, BASE)
    d = np.subtract(WORSE, BASE)
    assert p.made and p.n == 3 and p.mean == pytest.approx(d.mean())
    assert p.p == pytest.approx(sps.ttest_rel(WORSE, BASE).pvalue) and p.p == pytest.approx(0.047,
                                                                                           abs=5e-4)
    lo, hi = sps.t.interval(0.95, 2, loc=d.mean(), scale=sps.sem(d))
    assert p.ci95 == pytest.approx((hi - lo) / 2) and p.significant
    # unpaired, the same numbers are nowhere near significant: the seeds' shared level cancels
    assert sps.ttest_ind(WORSE, BASE).pvalue > 0.5
    # a failed seed (NaN) leaves its pair out
    assert stats.paired([*WORSE, math.nan], [*BASE, 6.0]).n == 3


def test_one_seed_cannot_be_compared_and_says_why():
    p = stats.paired([6.9], [7.0])
    assert not p.made and not p.significant and math.isnan(p.p)
    assert p.mean == pytest.approx(-0.1) and "one seed" in p.why_not and "--seeds" in p.why_not
    assert "no seed" in stats.paired([], []).why_not
    with pytest.raises(ValueError, match="2 values against 3"):
        stats.paired([1, 2], [1, 2, 3])


def test_held_out_comparison_on_shared_segments_is_paired():
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 64, 300).astype(float)
    hard = rng.normal(6.0, 1.0, 300)  # per-segment difficulty both models share
    a = (hard + 0.05 + rng.normal(0, 0.05, 300)) * counts
    b = hard * counts
    p = stats.segment_paired(a, b, counts)
    diff_loss, diff_se, m = stats.ratio_estimate(a - b, counts)
    assert p.mean == pytest.approx(a.sum() / counts.sum() - b.sum() / counts.sum())
    assert p.ci95 == pytest.approx(sps.t.ppf(0.975, 299) * diff_se) and m == 300
    assert p.p == pytest.approx(2 * sps.t.sf(diff_loss / diff_se, 299)) and p.significant
    # the unpaired test counts the shared difficulty twice and misses the difference
    sa, sb = stats.ratio_estimate(a, counts)[1], stats.ratio_estimate(b, counts)[1]
    unpaired = stats.unpaired(a.sum() / counts.sum(), sa, b.sum() / counts.sum(), sb)
    assert unpaired.ci95 > 5 * p.ci95 and not unpaired.significant


def test_seeds_to_resolve_is_the_smallest_n_with_80_percent_power():
    # batch_size_16 against lr_1e-3: better on every seed by 0.008 to 0.021 (p 0.087)
    d = np.array([-0.008, -0.014, -0.021])
    n = stats.seeds_to_resolve(d.mean(), d.std(ddof=1))
    effect = abs(d.mean()) / d.std(ddof=1)
    assert 3 < n < 10
    assert stats.paired_power(effect, n) >= 0.8 > stats.paired_power(effect, n - 1)
    assert stats.seeds_to_resolve(0.001, 1.0) is None  # beyond MAX_SEEDS
    assert stats.seeds_to_resolve(0.1, math.nan) is None


def test_lr_sensitivity_is_wortsmans_with_divergence_capped_at_the_start():
    init = [10.8, 10.8, 10.8, 10.8]
    final = [6.0, 5.0, 5.5, math.nan]  # the last lr diverged: counts as 10.8
    assert stats.lr_sensitivity(init, final) == pytest.approx((6.0 + 5.0 + 5.5 + 10.8) / 4 - 5.0)
    assert stats.lr_sensitivity(init, [None] * 4) != stats.lr_sensitivity(init, final)


# --- seeds.py: runs grouped into experiments ---------------------------------------------------

TINY = Config(embed_dim=32, n_heads=2, seq_len=32, batch_size=4)


def seeded(name, vals, config=TINY, start=10.0):
    out = []
    for i, v in enumerate(vals):
        r = fake_result(f"{name}_seed{42 + i}", config.replace(seed=42 + i),
                        np.linspace(start, v, 20), val=v)
        r.experiment = name
        out.append(r)
    return out


def test_experiments_are_compared_seed_by_seed_with_the_reference():
    results = seeded("baseline", BASE) + seeded("n_layers_1", WORSE)
    assert seeds.several(results) and list(seeds.groups(results)) == ["baseline", "n_layers_1"]
    base, other = seeds.experiment_stats(results)
    assert base.vs_reference is None and base.seeds == (42, 43, 44)
    assert other.vs_reference.p == pytest.approx(sps.ttest_rel(WORSE, BASE).pvalue)
    assert other.val.mean == pytest.approx(np.mean(WORSE))
    flipped = seeds.experiment_stats(results, "n_layers_1")
    assert flipped[1].vs_reference is None
    assert flipped[0].vs_reference.mean == pytest.approx(-other.vs_reference.mean)
    with pytest.raises(ValueError, match="'wide' is not in the run; ran: baseline, n_layers_1"):
        seeds.reference(results, "wide")


def test_runs_on_the_same_segments_are_paired_per_segment():
    rng = np.random.default_rng(1)
    counts, hard = rng.integers(20, 31, 50), rng.normal(6, 1, 50)
    c = TINY.replace(eval_final_batches=0)  # every held-out segment
    a, b = fake_result("a", c, [10.0, 7.0]), fake_result("b", c.replace(lr=1e-3), [10.0, 7.0])
    a.final_eval = evaluation.summarize((hard + 0.1) * counts, counts)
    b.final_eval = evaluation.summarize(hard * counts, counts)
    diff, paired = seeds.heldout(a, b)
    assert paired and diff.mean == pytest.approx(0.1) and diff.p < 1e-6
    assert diff.ci95 < 0.2 * stats.unpaired(a.final_eval.loss, a.final_eval.stderr,
                                            b.final_eval.loss, b.final_eval.stderr).ci95
    # another held-out set (data_seed), or another sample of it: unpaired
    for other in (c.replace(data_seed=7), c.replace(eval_final_batches=2)):
        b.config = other
        diff, paired = seeds.heldout(a, b)
        assert not paired and diff.made and diff.n == 0
    b.config = c.replace(batch_size=8)  # a larger batch, but both evaluated every segment
    assert seeds.heldout(a, b)[1]
    b.final_eval = evaluation.Evaluation(6.0, 403.0, 1000, 50, 0.02)  # no per-segment figures
    assert not seeds.heldout(a, b)[1]


def test_an_lr_sweep_gives_its_sensitivity_over_seeds():
    finals = {5e-4: [6.9, 7.0, 6.8], 1e-3: [6.4, 6.5, 6.3], 2e-3: [6.5, 6.4, 6.6]}
    results = [r for lr, v in finals.items()
               for r in seeded(f"lr_{lr:g}", v, TINY.replace(lr=lr))]
    results += seeded("wide", [6.0, 6.1, 6.2], TINY.replace(embed_dim=64))  # another shape
    (sweep,) = seeds.lr_sweeps(results)
    assert sweep.lrs == (5e-4, 1e-3, 2e-3) and sweep.best_lr == 1e-3
    assert sweep.experiments == ("lr_0.0005", "lr_0.001", "lr_0.002")
    want = [np.mean([finals[lr][i] for lr in finals]) - min(finals[lr][i] for lr in finals)
            for i in range(3)]
    assert list(sweep.per_seed.values()) == pytest.approx(want)
    assert sweep.summary.mean == pytest.approx(np.mean(want))
    assert seeds.lr_sweeps(results[:6]) == []  # two learning rates are not a sweep
