"""The report's comparison sentences follow the numbers: fixed per-seed losses, no training."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from minigpt_jax import comparisons, report, stats
from tests.test_report import fake_prepared
from tests.test_stats import BASE, TINY, WORSE, seeded

# batch_size_16 against lr_1e-3 on three seeds: better on each by 0.008 to 0.021 (paired p 0.087)
LR = [6.894, 7.401, 6.512]
BS = [v - d for v, d in zip(LR, [0.008, 0.010, 0.021])]


def test_a_significant_difference_carries_its_interval_and_p_value():
    d = stats.paired(WORSE, BASE)  # +0.103, +0.228, +0.152: p 0.047
    text = comparisons.verdict("n_layers_1", "baseline", d)
    lo, hi = d.mean - d.ci95, d.mean + d.ci95
    assert text == (f"`n_layers_1` is higher (worse) than `baseline` by {d.mean:.4f} in final"
                    f" validation loss (n_layers_1 − baseline: 95% CI {lo:+.4f} to {hi:+.4f},"
                    " p = 0.047; 3 paired"
                    " seeds).")


def test_a_difference_within_the_seeds_noise_says_how_many_seeds_would_resolve_it():
    d = stats.paired(BS, LR)
    assert d.p == pytest.approx(sps.ttest_rel(BS, LR).pvalue) and d.p > 0.05 and not d.significant
    text = comparisons.verdict("batch_size_16", "lr_1e-3", d)
    n = stats.seeds_to_resolve(d.mean, d.std)
    assert text.startswith(f"`batch_size_16` and `lr_1e-3` differ by {d.mean:+.4f} in final"
                           " validation loss (batch_size_16 − lr_1e-3: 95% CI ")
    assert f"p = {d.p:.3f}; 3 paired seeds): within the seeds' noise;" in text
    assert f"about {n} seeds would resolve a difference this size (80% power at p < 0.05" in text
    assert "better" not in text and "lower" not in text


def test_one_seed_says_it_cannot_test_and_why():
    text = comparisons.verdict("a", "b", stats.paired([6.9], [7.0]))
    assert text.startswith("`a` is 0.1000 below `b` in final validation loss, untested: one seed")
    held = comparisons.verdict("a", "b", stats.Paired(400, 0.01, 0.02, 0.32, math.nan),
                               over="held-out segments")
    assert "400 held-out segments, paired): within the held-out sample's noise." in held


def test_several_seeds_rank_experiments_not_runs(tmp_path):
    results = seeded("baseline", BASE) + seeded("n_layers_1", WORSE) + seeded("lr_1e-3", LR) \
        + seeded("batch_size_16", BS)
    text = report.write_report(tmp_path, results, {r.name: fake_prepared() for r in results},
                               "made up").read_text()
    seeds_part = text.split("### Over seeds")[1].split("###")[0]
    assert "| baseline | 3 | " in seeds_part and "| reference | - |" in seeds_part
    d = stats.paired(WORSE, BASE)
    assert f"| +{d.mean:.4f} (95% CI {d.mean - d.ci95:+.4f} to {d.mean + d.ci95:+.4f}) |" \
        " p = 0.047 |" in seeds_part
    obs = text.split("### Observations")[1].split("###")[0]
    assert f"`batch_size_16` reached the lowest mean final validation loss over 3 seeds," \
        f" {np.mean(BS):.4f} ± " in obs
    assert "`batch_size_16` ≈ `lr_1e-3` ≈ `baseline` < `n_layers_1`" in obs
    assert comparisons.verdict("batch_size_16", "lr_1e-3", stats.paired(BS, LR)) in obs
    # n_layers_1 against baseline was said as neighbours; the rest against the reference
    assert "`baseline` is higher (worse)" not in obs
    assert "`baseline` is lower (better) than `n_layers_1` by" in obs
    against = obs.split("Against the reference, `baseline` (the others): ")[1].split("\n")[0]
    assert comparisons.verdict("batch_size_16", "baseline", stats.paired(BS, BASE)) in against
    assert "`n_layers_1`" not in against
    assert "### baseline_seed43" not in text  # seeds are banded, not one section each
    assert "_seed43` reached" not in obs  # no single run is called best
    # the train losses at equal tokens: means over seeds, the lowest tested against the next
    (line,) = [ln for ln in obs.splitlines() if "tokens seen" in ln]
    assert "(mean over seeds)" in line and ("paired seeds" in line or "untested" in line)


def test_an_lr_sweep_is_in_the_report(tmp_path):
    results = [r for lr, v in ((5e-4, [6.9, 7.0]), (1e-3, [6.4, 6.5]), (2e-3, [6.5, 6.4]))
               for r in seeded(f"lr_{lr:g}", v, TINY.replace(lr=lr))]
    text = report.write_report(tmp_path, results, {r.name: fake_prepared() for r in results},
                               "made up").read_text()
    part = text.split("### LR sensitivity")[1].split("###")[0]
    assert "| `lr_0.0005`, `lr_0.001`, `lr_0.002` | 0.0005 0.001 0.002 | 2 |" in part
    assert "first step's training loss" in part and "| 0.001 |" in part
