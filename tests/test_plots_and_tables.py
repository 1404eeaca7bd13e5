"""Plots and results tables: smoothing, figure content, PNG files, CSV and TXT tables."""

import csv
import math
import re

import matplotlib.image
import numpy as np
import pytest
from matplotlib.legend import Legend

from minigpt_jax import plots, tables


def fake_run(n_steps=100, batch_tokens=2000, final=5.2, seed=0, val_every=25):
    """A language-model-like run: loss from ~11 down to `final`, with batch noise."""
    rng = np.random.default_rng(seed)
    rows, val_rows, tokens = [], [], 0
    for step in range(1, n_steps + 1):
        tokens += batch_tokens - int(rng.integers(0, 20))
        loss = final + (11.0 - final) * math.exp(-step / 15) + rng.normal(0, 0.1)
        rows.append({"step": step, "tokens": tokens, "loss": loss, "perplexity": math.exp(loss),
                     "seconds": step * 0.1})
        if step % val_every == 0:
            vl = final + 0.1 + (11.0 - final) * math.exp(-step / 15)
            val_rows.append({"step": step, "tokens": tokens, "val_loss": vl, "val_perplexity": math.exp(vl)})
    return rows, val_rows


# --- smoothing -----------------------------------------------------------------------------

def test_smooth_is_a_centred_moving_average_with_full_windows_at_the_end():
    ramp = np.arange(100.0)
    s = plots.smooth(ramp, 11)
    # Centred (and shrinking at the start): a linear trend comes out unchanged, no lag.
    np.testing.assert_allclose(s[:95], ramp[:95])
    # At the end the window is shifted inward: the mean of the last 11 steps (89..99).
    np.testing.assert_allclose(s[95:], 94.0)
    spike = np.zeros(41)
    spike[20] = 11.0
    expected = np.zeros(41)
    expected[15:26] = 1.0  # spread evenly over the 11 windows that contain it
    np.testing.assert_allclose(plots.smooth(spike, 11), expected)
    np.testing.assert_allclose(plots.smooth(np.full(30, 5.0), 7), 5.0)


def test_smooth_window_rules_and_non_finite_values():
    x = np.random.default_rng(0).normal(size=60)
    np.testing.assert_array_equal(plots.smooth(x, 4), plots.smooth(x, 5))  # rounded up to odd
    np.testing.assert_array_equal(plots.smooth(x), plots.smooth(x, plots.default_window(60)))
    assert plots.default_window(100) == 11 and plots.default_window(19) == 1
    np.testing.assert_allclose(plots.smooth(x[:10]), x[:10], rtol=1e-12)  # too short to smooth
    assert plots.smooth([]).shape == (0,)
    ramp = np.arange(50.0)
    holed = ramp.copy()
    holed[[20, 30]] = [np.nan, np.inf]  # diverged steps are left out of the means
    s = plots.smooth(holed, 5)
    assert s[18] == np.mean([16, 17, 18, 19]) and s[20] == 20.0 and np.isfinite(s).all()
    np.testing.assert_allclose(s[:16], ramp[:16])
    assert np.isnan(plots.smooth([np.nan, np.nan, np.nan], 3)).all()


def test_smooth_reduces_noise_by_about_sqrt_window():
    noise = np.random.default_rng(1).normal(size=2000)
    s = plots.smooth(noise, 51)
    assert 0.1 < s[100:-100].std() < 0.2  # 1/sqrt(51) = 0.14


# --- figures -------------------------------------------------------------------------------

def test_experiment_figures_are_labelled_and_not_squashed_by_the_first_steps():
    rows, val_rows = fake_run()
    figs = plots.experiment_figures("lr_1e-3", rows, val_rows)
    assert set(figs) == {"loss_curve_lr_1e-3.png", "perplexity_curve_lr_1e-3.png"}
    ax = figs["loss_curve_lr_1e-3.png"].axes[0]
    assert "lr_1e-3" in ax.get_title(loc="left")
    assert ax.get_xlabel() == "step" and "nats" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train loss, per step", "train loss, centred moving average (11 steps)",
                      "validation loss"]
    low, high = ax.get_ylim()
    smoothed = plots.smooth([r["loss"] for r in rows])
    # The start (~11 nats) is above the range, which is said above the plot ...
    assert high < 9.0 and "y axis cut" in ax.get_title(loc="right")
    # ... but everything after the first 10% of the run, and every validation point, is inside.
    assert high >= smoothed[10:].max() and high >= max(v["val_loss"] for v in val_rows)
    assert low <= min(smoothed.min(), min(v["val_loss"] for v in val_rows))
    ppl = figs["perplexity_curve_lr_1e-3.png"].axes[0]
    assert ppl.get_yscale() == "log"
    assert ppl.get_ylim()[1] == pytest.approx(math.exp(high), rel=1e-6)  # same cut, relabelled


def test_short_runs_are_drawn_whole_and_unsmoothed():
    rows, _ = fake_run(n_steps=5)
    ax = plots.experiment_figures("tiny", rows)["loss_curve_tiny.png"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss, per step"]
    assert ax.get_ylim()[1] > max(r["loss"] for r in rows)
    assert ax.get_title(loc="right") == ""


def test_comparison_uses_tokens_and_one_colour_per_experiment():
    runs = {"baseline": fake_run(), "batch_size_16": fake_run(200, 1000, 5.4, seed=2),
            "broken": ([], [])}
    figs = plots.comparison_figures(runs)
    assert set(figs) == {"loss_curves.png", "perplexity_curves.png"}
    ax = figs["loss_curves.png"].axes[0]
    assert ax.get_xlabel() == "tokens seen"
    lines = ax.get_lines()
    assert len(lines) == 4  # smoothed line + validation markers per experiment with data
    for line, markers in (lines[0:2], lines[2:4]):
        assert line.get_color() == markers.get_color() and markers.get_marker() == "o"
    # Both runs saw the same tokens over different step counts: the x ranges match.
    assert lines[0].get_xdata()[-1] == pytest.approx(lines[2].get_xdata()[-1], rel=0.01)
    legends = [[t.get_text() for t in c.get_texts()] for c in ax.get_children() if isinstance(c, Legend)]
    assert sorted(legends) == [["baseline", "batch_size_16"],
                               ["train, centred moving average (~1/10 run)", "validation"]]
    assert figs["perplexity_curves.png"].axes[0].get_yscale() == "log"
    assert plots.comparison_figures({"broken": ([], [])}) == {}


def test_png_files_are_written_whole_readable_and_not_blank(tmp_path):
    rows, val_rows = fake_run()
    paths = plots.plot_experiment(tmp_path, "baseline", rows, val_rows)
    paths += plots.plot_comparison(tmp_path, {"baseline": (rows, val_rows), "n_layers_1": fake_run(seed=3)})
    assert sorted(p.name for p in paths) == ["loss_curve_baseline.png", "loss_curves.png",
                                             "perplexity_curve_baseline.png", "perplexity_curves.png"]
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == (600, 960), path  # 8 x 5 inches at 120 dpi
        rgb = image[..., :3].reshape(-1, 3)
        assert (rgb.min(axis=1) < 0.9).mean() > 0.02, f"{path} is nearly blank"
        assert len(np.unique(np.round(rgb * 255), axis=0)) > 50, f"{path} has almost no colours"
        assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_failed_experiment_without_steps_writes_no_curve_and_does_not_crash(tmp_path):
    assert plots.plot_experiment(tmp_path, "failed", [], []) == []
    assert plots.plot_comparison(tmp_path, {"failed": ([], [])}) == []
    nan_rows = [{"step": s, "tokens": 100 * s, "loss": math.nan, "perplexity": math.nan} for s in (1, 2, 3)]
    paths = plots.plot_experiment(tmp_path, "diverged", nan_rows)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)
    assert "3 non-finite steps" in plots.experiment_figures("diverged", nan_rows)[
        "loss_curve_diverged.png"].axes[0].get_title(loc="right")


# --- results table -------------------------------------------------------------------------

RESULTS = [
    {"experiment": "baseline", "final_loss": 5.2, "final_perplexity": 181.27, "overrides": "",
     "parameters": 13_326_976, "device": "cuda:1",
     "steps": 1200, "tokens": 2_419_000, "train_loss": 5.123456, "train_perplexity": 167.9,
     "val_loss": 5.3, "val_perplexity": 200.34, "val_stderr": 0.012, "val_tokens": 60_000,
     "wall_seconds": 95.25, "compile_seconds": 3.5, "tokens_per_second": 25396.0,
     "status": "ok"},
    {"experiment": "lr_1e-3", "final_loss": 5.5, "final_perplexity": 244.69, "overrides": {"lr": 0.001},
     "parameters": 13_326_976, "device": "cuda:2",
     "steps": 600, "tokens": 1_209_000, "train_loss": 5.6, "train_perplexity": 270.4,
     "val_loss": math.nan, "val_perplexity": None, "wall_seconds": 48.0, "tokens_per_second": 25187.5,
     "status": "stopped at step 600"},
    {"experiment": "embed_dim_64", "overrides": "embed_dim=64", "device": "cuda:5",
     "status": "failed: RuntimeError: out of memory\nwhile allocating " + "x" * 100},
]


def test_results_csv_round_trips_with_the_documented_columns(tmp_path):
    txt_path, csv_path = tables.write_results_table(tmp_path, RESULTS)
    assert (txt_path.name, csv_path.name) == ("results_table.txt", "results_table.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == tables.RESULT_FIELDS == (
        "experiment", "final_loss", "final_perplexity", "overrides", "parameters", "device", "steps",
        "tokens", "train_loss",
        "train_perplexity", "val_loss", "val_perplexity", "val_stderr", "val_tokens", "wall_seconds",
        "compile_seconds", "tokens_per_second", "status")
    ok, stopped, failed = rows
    assert float(ok["train_loss"]) == 5.123456 and int(ok["parameters"]) == 13_326_976  # full precision
    assert float(ok["final_loss"]) == 5.2 and float(stopped["final_perplexity"]) == 244.69
    numeric = tables.RESULT_FIELDS[1:3] + tables.RESULT_FIELDS[6:17]
    assert all(math.isfinite(float(ok[k])) for k in numeric)
    assert stopped["overrides"] == "lr=0.001" and stopped["val_loss"] == stopped["val_perplexity"] == ""
    assert stopped["status"] == "stopped at step 600"
    assert all(failed[k] == "" for k in numeric) and failed["parameters"] == ""
    assert failed["status"].startswith("failed: RuntimeError: out of memory while allocating xxx")
    assert failed["status"].endswith("x" * 100)  # the CSV keeps the whole reason, on one line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_table.csv", "results_table.txt"]


def test_results_txt_has_a_title_and_aligned_fixed_width_columns():
    lines = tables.results_txt(RESULTS).splitlines()
    assert lines[0] == "MiniGPT experiment results"
    header, rule, body = lines[1], lines[2], lines[3:]
    assert set(rule) == {"-"} and len(body) == 3

    def cells(line):  # cells are separated by two or more spaces
        return [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", line)]

    head = cells(header)
    assert [c[2] for c in head] == [c[1] for c in tables.RESULT_COLUMNS]
    for line in body:
        row = cells(line)
        assert len(row) == len(head), line
        for (h_start, h_end, _), (start, end, text), (_, _, kind) in zip(head, row, tables.RESULT_COLUMNS):
            if kind == "text":
                assert start == h_start, (line, text)  # left-aligned under its header
            else:
                assert end == h_end, (line, text)  # right-aligned under its header
    ok, stopped, failed = (dict(zip([c[2] for c in head], [c[2] for c in cells(x)])) for x in body)
    assert ok["params"] == "13,326,976" and ok["smoothed loss"] == "5.1235" and ok["overrides"] == "-"
    assert ok["final loss"] == "5.2000" and list(ok)[:3] == ["experiment", "final loss", "final ppl"]
    assert stopped["val loss"] == stopped["val ppl"] == "-"
    assert failed["final loss"] == failed["smoothed loss"] == failed["tokens/s"] == "-"
    assert failed["status"].endswith("...") and len(failed["status"]) == tables.TXT_TEXT_MAX


def test_unknown_result_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown result keys \['val_los'\]; valid: experiment"):
        tables.write_results_table(tmp_path, [{"experiment": "baseline", "val_los": 5.0}])
    assert not list(tmp_path.iterdir())


def test_infinite_values_render_instead_of_crashing(tmp_path):
    results = [{"experiment": "diverged", "steps": 7, "train_loss": float("inf"),
                "train_perplexity": float("inf"), "status": "failed: non-finite loss at step 7"}]
    tables.write_results_table(tmp_path, results)
    assert "inf" in (tmp_path / "results_table.txt").read_text()
    row = next(csv.DictReader(open(tmp_path / "results_table.csv")))
    assert row["train_loss"] == "inf" and row["steps"] == "7"


# --- several seeds -------------------------------------------------------------------------

def test_seeds_are_drawn_as_a_mean_with_a_min_max_band(tmp_path):
    runs = [fake_run(seed=s, final=5.2 + 0.1 * s) for s in range(3)]
    figs = plots.seeds_figures("baseline", runs)
    assert set(figs) == {"loss_curve_baseline.png", "perplexity_curve_baseline.png"}
    ax = figs["loss_curve_baseline.png"].axes[0]
    assert "3 seeds" in ax.get_title(loc="left")
    (band,) = ax.collections[:1]  # fill_between: the smoothed curves' min to max
    edge = band.get_paths()[0].vertices[:, 1]
    smoothed = np.array([plots.smooth([r["loss"] for r in rows]) for rows, _ in runs])
    assert edge.max() == pytest.approx(smoothed.max()) and edge.min() == pytest.approx(
        smoothed.min())
    assert smoothed.max(axis=0)[-1] - smoothed.min(axis=0)[-1] > 0.15  # seeds end 0.1 apart
    mean_line = ax.get_lines()[1]
    np.testing.assert_allclose(mean_line.get_ydata(), smoothed.mean(axis=0), rtol=1e-9)
    labels = [t.get_text() for lg in ax.get_children() if isinstance(lg, Legend)
              for t in lg.get_texts()]
    assert "band: min to max over seeds" in labels
    assert "validation loss, mean (bars: min to max)" in labels
    # one seed: exactly today's figure
    one = plots.seeds_figures("baseline", runs[:1])["loss_curve_baseline.png"].axes[0]
    today = plots.experiment_figures("baseline", *runs[0])["loss_curve_baseline.png"].axes[0]
    assert [t.get_text() for t in one.get_legend().get_texts()] == \
        [t.get_text() for t in today.get_legend().get_texts()]
    assert one.get_ylim() == today.get_ylim()
    paths = plots.plot_seeds(tmp_path, "baseline", runs)
    paths += plots.plot_comparison(tmp_path, {"baseline": runs, "lr_1e-3": [fake_run(seed=9)]})
    for path in paths:
        assert matplotlib.image.imread(path).shape[:2] == (600, 960)


def test_comparison_bands_experiments_with_several_seeds_only():
    runs = [fake_run(seed=s, final=5.2 + 0.1 * s) for s in range(3)]
    ax = plots.comparison_figures({"baseline": runs, "wide": fake_run(seed=5)})[
        "loss_curves.png"].axes[0]
    assert len(ax.collections) >= 1  # baseline's band (and its validation bars)
    legends = [[t.get_text() for t in c.get_texts()] for c in ax.get_children()
               if isinstance(c, Legend)]
    assert ["baseline (3 seeds)", "wide"] in legends
    assert any("band: min to max over seeds" in lg for lg in legends)
    single = plots.comparison_figures({"baseline": [runs[0]]})["loss_curves.png"].axes[0]
    same = plots.comparison_figures({"baseline": runs[0]})["loss_curves.png"].axes[0]
    assert single.get_ylim() == same.get_ylim() and not single.collections


def seeded_results():
    from tests.test_stats import BASE, WORSE, seeded
    return seeded("baseline", BASE) + seeded("n_layers_1", WORSE)


def test_several_seeds_add_a_seed_column_and_one_summary_row_per_experiment(tmp_path):
    from scipy import stats as sps

    from tests.test_stats import BASE, WORSE
    results = seeded_results()
    tables.write_results(tmp_path, results)
    with open(tmp_path / "results_table.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == (tables.RESULT_FIELDS + ("seed",) + tables.SUMMARY_FIELDS)
    runs, summary = rows[:6], rows[6:]
    assert [r["seed"] for r in runs] == ["42", "43", "44"] * 2
    assert all(r["seeds"] == "" for r in runs) and [r["experiment"] for r in summary] == [
        "baseline", "n_layers_1"]
    base, other = summary
    assert base["seeds"] == "3" and float(base["val_loss_mean"]) == pytest.approx(np.mean(BASE))
    assert float(base["val_loss_std"]) == pytest.approx(np.std(BASE, ddof=1))
    assert float(base["val_loss_ci95"]) == pytest.approx(
        sps.t.ppf(0.975, 2) * sps.sem(BASE))
    assert base["delta_val_loss"] == base["p_value"] == ""  # the reference
    assert float(other["p_value"]) == pytest.approx(sps.ttest_rel(WORSE, BASE).pvalue)
    assert float(other["delta_val_loss"]) == pytest.approx(np.mean(np.subtract(WORSE, BASE)))
    assert float(other["train_loss_mean"]) == pytest.approx(
        np.mean([tables.row(r)["train_loss"] for r in results[3:]]))
    txt = (tmp_path / "results_table.txt").read_text()
    assert "Over seeds:" in txt and "val ±ci95" in txt and "p" in txt.split("Over seeds")[1]
    assert not (tmp_path / "lr_sensitivity.csv").exists()


def test_one_seed_tables_are_todays_byte_for_byte(tmp_path):
    from tests.test_stats import BASE, seeded
    results = seeded("baseline", BASE[:1]) + seeded("n_layers_1", BASE[1:2])
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    tables.write_results(tmp_path / "new", results)
    tables.write_results_table(tmp_path / "old", [tables.row(r) for r in results])
    for f in ("results_table.txt", "results_table.csv"):
        assert (tmp_path / "new" / f).read_bytes() == (tmp_path / "old" / f).read_bytes()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "results_table.csv", "results_table.txt"]


def test_an_lr_sweep_adds_its_sensitivity(tmp_path):
    from tests.test_stats import TINY, seeded
    results = [r for lr, v in ((5e-4, [6.9, 7.0]), (1e-3, [6.4, 6.5]), (2e-3, [6.5, 6.4]))
               for r in seeded(f"lr_{lr:g}", v, TINY.replace(lr=lr))]
    paths = tables.write_results(tmp_path, results)
    assert [p.name for p in paths][-1] == "lr_sensitivity.csv"
    (row,) = csv.DictReader(open(tmp_path / "lr_sensitivity.csv"))
    assert row["lrs"] == "0.0005 0.001 0.002" and row["seeds"] == "2" and row["best_lr"] == "0.001"
    want = np.mean([np.mean([6.9, 6.4, 6.5]) - 6.4, np.mean([7.0, 6.5, 6.4]) - 6.4])
    assert float(row["lr_sensitivity"]) == pytest.approx(want)
    assert "LR sensitivity (Wortsman et al. 2023)" in (tmp_path / "results_table.txt").read_text()
