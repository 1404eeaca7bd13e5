"""scaling_law: counting, the approach-3 fit and its intervals, refusals, N*(C); no training."""

import math

import numpy as np
import pytest

from minigpt_jax import report
from minigpt_jax import scaling_law as law
from minigpt_jax.config import Config, num_params

# Hoffmann et al. 2022's constants (approach 3)
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def generated(noise=0.01, seed=1, sizes=6, budgets=5):
    """Losses of a known law on a grid of N and D, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, sizes),
                                           np.geomspace(1e8, 1e11, budgets)))
    L = law.loss([TRUE[k] for k in law.NAMES], N, D) * np.exp(rng.normal(0, noise, N.shape))
    return N, D, L


@pytest.fixture(scope="module")
def recovered():
    return law.fit(*generated(), resamples=100)


def test_fit_recovers_known_constants_within_its_intervals(recovered):
    for k in law.NAMES:
        assert recovered.low[k] <= TRUE[k] <= recovered.high[k], (k, recovered.low[k],
                                                                   recovered.high[k])
        assert recovered.low[k] <= recovered.values[k] <= recovered.high[k]
    assert abs(recovered.values["alpha"] - TRUE["alpha"]) < 0.05
    assert abs(recovered.values["beta"] - TRUE["beta"]) < 0.05
    assert recovered.warnings == []
    assert recovered.replicates.shape == (100, 5)


@pytest.mark.slow
def test_intervals_cover_the_truth_about_95_percent_of_the_time():
    """Four noisy draws, five constants each: 95% intervals miss about one in twenty."""
    covered = 0
    for seed in range(4):
        f = law.fit(*generated(seed=seed), resamples=60)
        covered += sum(f.low[k] <= TRUE[k] <= f.high[k] for k in law.NAMES)
    assert covered >= 17, covered


def test_bootstrap_resamples_runs_when_there_are_enough():
    N, D, L = generated()  # six sizes: one run per size, its five budgets together
    f = law.fit(N, D, L, groups=N, resamples=60)
    assert not any("too few to resample" in w for w in f.warnings), f.warnings
    for k in ("alpha", "beta"):
        assert f.low[k] <= TRUE[k] <= f.high[k], (k, f.low[k], f.high[k])
    few = N <= np.sort(np.unique(N))[2]  # three runs
    g = law.fit(N[few], D[few], L[few], groups=N[few], resamples=10)
    assert any(w.startswith("3 runs, too few to resample") for w in g.warnings), g.warnings


def test_noiseless_law_is_recovered_exactly():
    f = law.fit(*generated(noise=0.0), resamples=5)
    for k in law.NAMES:
        assert f.values[k] == pytest.approx(TRUE[k], rel=1e-3), k


@pytest.mark.parametrize("case, match", [
    ("one_shape", "one value of N"), ("one_budget", "one value of D"),
    ("four_points", "4 points; expected at least 5"), ("negative", "loss holds a non-positive")])
def test_refuses_data_that_cannot_identify_the_law(case, match):
    N, D, L = generated(noise=0.0)
    if case == "one_shape":
        N = np.full_like(N, 1e7)
    elif case == "one_budget":
        D = np.full_like(D, 1e9)
    elif case == "four_points":
        N, D, L = N[:4], D[:4], L[:4]
    else:
        L = L.copy()
        L[3] = -1.0
    with pytest.raises(law.FitError, match=match):
        law.fit(N, D, L, resamples=5)


def test_warns_when_a_span_is_too_narrow():
    N, D, L = generated(noise=0.002, sizes=16)
    keep = N <= N.min() * 2.6  # three sizes spanning 2.5x
    f = law.fit(N[keep], D[keep], L[keep], resamples=20)
    assert any(w.startswith("N spans only") for w in f.warnings), f.warnings


def test_compute_optimal_matches_chinchilla_closed_form(recovered):
    """With C = 6ND the optimum has a closed form (Hoffmann et al. 2022, eq. 4)."""
    E, A, a, B, b = (TRUE[k] for k in law.NAMES)
    C = 1e21
    G = (a * A / (b * B)) ** (1 / (a + b))
    n, d = law.optimal([TRUE[k] for k in law.NAMES], C, (math.log(6.0), 1.0))
    assert n == pytest.approx(G * (C / 6) ** (b / (a + b)), rel=1e-4)
    assert d == pytest.approx((C / 6) / n, rel=1e-6)
    row = law.optimal_table(recovered, [C], (math.log(6.0), 1.0))[0]
    assert row["N_low"] <= row["N"] <= row["N_high"] and row["D_low"] <= row["D"] <= row["D_high"]


def test_held_out_prediction_covers_the_largest_model():
    N, D, L = generated(noise=0.002)
    h = law.held_out(N, D, L, resamples=50)
    assert h["N"] == N.max() and len(h["rows"]) == 5
    for r in h["rows"]:
        assert r["low"] <= r["predicted"] <= r["high"]
        assert r["measured"] == pytest.approx(r["predicted"], rel=0.02)
    assert law.held_out(N[:6], D[:6], L[:6])["refused"].startswith("one value of D")


def test_non_embedding_count_matches_the_models_parameters():
    c = Config(embed_dim=48, n_heads=4, n_layers=3, seq_len=64)
    split = report.parameter_split(c)
    assert law.non_embedding_params(c) == split["blocks"] + split["ln_f"]
    assert law.count_params(c, "all") == num_params(c) == sum(split.values())
    with pytest.raises(law.FitError, match="--count 'some'"):
        law.count_params(c, "some")


def test_flops_count_attention_and_head_beyond_6n():
    c = Config(embed_dim=16, n_heads=2, n_layers=1, seq_len=64)
    d, V, L = 16, c.vocab_size, 64
    matrices = 12 * d * d  # qkv, projection, two FFN matrices (ffn_mult 4)
    assert law.flops_per_token(c) == 6 * matrices + 12 * d * L + 6 * d * V
    assert law.flops_per_token(c) > 6 * law.non_embedding_params(c) * 10  # the head dominates


def test_read_table_names_what_is_missing(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("N,D\n1,2\n")
    with pytest.raises(law.FitError, match="no column loss"):
        law.read_table(p)
    p.write_text("N,D,loss\n1,2,x\n")
    with pytest.raises(law.FitError, match="column loss holds 'x'"):
        law.read_table(p)
