"""outcome/report.md: in process on made-up but consistent Results; end to end through run.py."""

import csv
import math
import re

import numpy as np
import pytest
from conftest import TINY, run_script

from minigpt_jax import comparisons, data, evaluation, report, tables
from minigpt_jax.config import Config, num_params
from minigpt_jax.loop import Result
from tests.test_run import data_folder  # noqa: F401 (a fixture)

SECTIONS = ["## 1. Model", "## 2. Data", "## 3. Training setup and experiments", "## 4. Results"]


def fake_result(name, config, losses, per_step=100, status="ok", val=None, overrides=""):
    rows = [{"step": i + 1, "tokens": per_step * (i + 1), "loss": v, "perplexity": math.exp(v),
             "lr": config.lr, "grad_norm": 1.0, "seconds": 0.1, "elapsed": 0.1 * (i + 1)}
            for i, v in enumerate(losses)]
    val_rows = [] if val is None else [{"step": len(rows), "tokens": rows[-1]["tokens"],
                                        "val_loss": val, "val_perplexity": math.exp(val)}]
    return Result(name, config, "cpu:0", rows, val_rows, 1.5, status, overrides)


def fake_prepared(n_train=40, n_val=4):
    seg = np.zeros((n_train, 32), np.int32)
    return data.Prepared(train=seg, val=np.zeros((n_val, 32), np.int32), sequences=30, held_out=2,
                         dropped_sequences=3, dropped_tails=5, tokens=2000, dropped_tokens=100,
                         label_tokens=1200, pad_share=0.125)


def links(text):
    return re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)


@pytest.fixture
def page(tmp_path):
    tiny = Config(embed_dim=32, n_heads=2, seq_len=32, batch_size=4)
    results = [
        fake_result("baseline", tiny, np.linspace(10.0, 6.0, 20), val=6.2),
        fake_result("wide", tiny.replace(embed_dim=64), np.linspace(10.0, 5.0, 10), per_step=300,
                    val=5.5, overrides="embed_dim=64"),
        fake_result("broken", tiny.replace(lr=1.0), [10.0, 12.0, 15.0],
                    status="failed: broken: non-finite loss at step 4", overrides="lr=1.0"),
    ]
    prepared = fake_prepared()
    for f in ("loss_curves.png", "loss_curve_baseline.png", "loss_curve_wide.png"):
        (tmp_path / f).write_bytes(b"png")
    path = report.write_report(tmp_path, results, {r.name: prepared for r in results},
                                "made up (token sequences)", {"command": "`run.py --x`"})
    return path.read_text(), results, tmp_path


def test_four_sections_in_order_with_every_experiment(page):
    text, results, _ = page
    assert [text.index(s) for s in SECTIONS] == sorted(text.index(s) for s in SECTIONS)
    for r in results:
        assert text.count(f"| {r.name} |") >= 3, r.name  # parameters, experiments, results


def test_parameter_split_adds_up_to_the_closed_form_count(page):
    text, results, _ = page
    for r in results:
        c = r.config
        split = report.parameter_split(c)
        assert split["embedding"] == split["head"] == c.vocab_size * c.embed_dim
        assert split["positional"] == c.seq_len * c.embed_dim and split["ln_f"] == 2 * c.embed_dim
        assert sum(split.values()) == num_params(c)
        cells = [f"{v:,}" for v in split.values()] + [f"{num_params(c):,}"]
        assert f"| {r.name} | " + " | ".join(cells) + " |" in text


def test_data_numbers_and_steps_per_epoch(page):
    text, _, _ = page
    for fact in ["30 (2,000 tokens)",
                 "44 segments kept; 3 sequences dropped whole, 5 tails dropped",
                 "2 sequences held out -> 4 validation and 40 training segments", "1,200", "12.5%",
                 "batch 4: 10"]:
        assert fact in text, fact


def test_observations_rank_compare_at_equal_tokens_and_name_the_failure(page):
    text, _, _ = page
    obs = text.split("### Observations")[1].split("###")[0]
    # no standard error on these made-up results: the ranking must not claim an order
    assert "`wide` reached the lowest validation loss, 5.5000 (perplexity 244.69)" in obs
    assert "`wide` ≈ `baseline`." in obs
    assert ("`wide` is 0.7000 below `baseline` in final validation loss, untested: no standard"
            " error to test it against.") in obs
    assert "Each experiment ran one seed" in obs  # the seed-to-seed spread is not measured
    assert "`broken` did not finish: failed: broken: non-finite loss at step 4 after 3 steps" in obs
    assert "`broken` diverged" in obs and "`baseline` diverged" not in obs
    gap = 6.2 - tables.row(page[1][0])["train_loss"]
    assert f"over-fitting): `baseline` {gap:+.4f}, `wide` " in obs
    assert "; all on cpu:0, one after another." in obs
    (gap_line,) = [line for line in obs.splitlines() if "over-fitting): " in line]
    assert "`broken`" not in gap_line  # its last evaluation predates its last step
    assert report._f(1.4086e12, ".4f") == "1.409e+12" and report._f(None, ".4f") == "-"
    # broken reached the fewest tokens, 300: baseline's 3rd step (a 3-step window over a straight
    # line is the line), wide's 1st (its own value), broken's last (3 rows are not smoothed)
    base = 10.0 - 4.0 * 2 / 19
    assert (f"At 300 tokens seen (the most every run reached), the smoothed train loss was"
            f" `baseline` {base:.4f}, `wide` 10.0000, `broken` 15.0000: `baseline` lowest,"
            f" {15.0 - base:.4f} below `broken` (one seed per experiment: not tested") in obs


def test_only_existing_images_are_linked_and_the_html_beside_it(page):
    text, _, out = page
    assert links(text) == ["loss_curves.png", "loss_curve_baseline.png", "loss_curve_wide.png"]
    assert "No curves" not in text.split("### broken")[0]
    assert not list(out.glob("*.tmp"))
    html = out / "report.html"
    if html.exists():  # markdown-it-py present
        assert "<table>" in html.read_text() and '<img src="loss_curves.png"' in html.read_text()


# --- end to end ---------------------------------------------------------------------------------


def table_rows(out):
    with open(out / "results_table.csv") as f:
        return {r["experiment"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_run_writes_a_report_whose_numbers_are_the_runs(tmp_path, data_folder):  # noqa: F811
    """Two experiments; baseline diverges (lr 1, weight decay 30, as in test_reliability)."""
    out = tmp_path / "out"
    r = run_script("run.py", "--experiments", "baseline,lr_1e-3", "--devices", "1,2",
                   "--max-steps", 8, "--data", data_folder, "--out", out, *TINY, "--set", "lr=1",
                   "--set", "weight_decay=30")
    assert r.returncode == 1, r.stderr[-3000:]
    text = (out / "report.md").read_text()
    assert all(s in text for s in SECTIONS)
    table = table_rows(out)
    assert table["baseline"]["status"].startswith("failed: baseline: non-finite loss at step")
    assert f"| baseline | {table['baseline']['status']} |" in text
    row = table["lr_1e-3"]
    with open(out / "metrics_lr_1e-3.csv") as f:
        metrics = list(csv.DictReader(f))
    assert row["steps"] == metrics[-1]["step"] == "8"
    cells = [row["status"], f"{int(row['steps']):,}", f"{int(row['tokens']):,}",
             f"{float(metrics[-1]['loss']):.4f}", f"{float(row['train_loss']):.4f}",
             f"{float(row['train_perplexity']):,.2f}", f"{float(row['val_loss']):.4f}",
             f"{float(row['val_perplexity']):,.2f}"]
    assert "| lr_1e-3 | " + " | ".join(cells) + " |" in text
    assert f"| {int(row['parameters']):,} |" in text  # the split's total
    assert f"{float(row['wall_seconds']):,.1f}" in text and row["device"] == "cpu:2"
    adamw = ("AdamW (betas 0.9, 0.999, eps 1e-8), learning rate {} (constant, no warmup),"
             " weight decay 30")
    assert f"`baseline`: {adamw.format(1)}" in text and f"`lr_1e-3`: {adamw.format(0.001)}" in text
    for setting in ("seq_len 32", "n_heads 2", "batch_size 4", "seed 42", "eval_every 2"):
        assert setting in text.split("Settings all experiments share:")[1].split("\n")[0], setting
    for f in links(text):
        assert (out / f).is_file(), f
    want = {"loss_curves.png", "loss_curve_lr_1e-3.png", "perplexity_curve_lr_1e-3.png"}
    assert want <= set(links(text))
    assert "`baseline` did not finish: failed: baseline: non-finite loss" in text


@pytest.mark.slow
def test_bad_arguments_write_no_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = run_script("run.py", "--out", out, "--set", "lr=fast")
    assert r.returncode == 2 and not (out / "report.md").exists() and not list(out.iterdir())


def test_data_statistics_keep_the_counts_not_the_segments():

    rng = np.random.default_rng(0)
    seqs = data.from_arrays([rng.integers(0, 50000, n) for n in (40, 100, 300, 20, 64)], "made up")
    a = Config(embed_dim=32, n_heads=2, seq_len=32, batch_size=4)
    results = [fake_result("a", a, [10.0]), fake_result("b", a.replace(lr=1e-3), [10.0]),
               fake_result("c", a.replace(seq_len=64), [10.0])]
    stats = report.data_statistics(seqs, results)
    assert stats["a"] is stats["b"] and stats["a"] is not stats["c"]
    for name, c in (("a", a), ("c", a.replace(seq_len=64))):
        full = data.prepare(seqs, c)
        assert stats[name].train.nbytes == stats[name].val.nbytes == 0
        assert (len(stats[name].train), len(stats[name].val)) == (len(full.train), len(full.val))
        assert (stats[name].label_tokens, stats[name].pad_share) == (full.label_tokens, full.pad_share)


def test_ranking_says_within_noise_when_the_held_out_test_does_not_resolve_it():
    tiny = Config(embed_dim=32, n_heads=2, seq_len=32, batch_size=4)
    a = fake_result("a", tiny, np.linspace(10.0, 6.0, 20), val=5.50)
    b = fake_result("b", tiny, np.linspace(10.0, 6.0, 20), val=5.52)
    c = fake_result("c", tiny, np.linspace(10.0, 6.0, 20), val=5.90)
    for r in (a, b, c):
        r.final_eval = evaluation.Evaluation(r.val_rows[-1]["val_loss"], 1.0, 5000, 100, 0.02)
    rows = {r.name: tables.row(r) for r in (a, b, c)}
    notes = " ".join(comparisons.ranking([a, b, c], rows))
    # no per-segment losses: unpaired, se hypot(0.02, 0.02); a-b 0.02 apart: p 0.48, tied;
    # b-c 0.38 apart: ordered, with its interval and p-value
    assert "`a` ≈ `b` < `c`" in notes
    assert ("`a` and `b` differ by -0.0200 in final validation loss (a − b: 95% CI -0.0754 to +0.0354,"
            " p = 0.480; two unpaired standard errors: different held-out segments): within the"
            " held-out sample's noise.") in notes
    assert "over 5,000 held-out label tokens (100 segments), standard error 0.0200" in notes
    assert ("`b` is lower (better) than `c` by 0.3800 in final validation loss (b − c: 95% CI -0.4354 to"
            " -0.3246, p < 0.001;") in notes


def test_setup_shows_where_the_time_went(tmp_path):
    tiny = Config(embed_dim=32, n_heads=2, seq_len=32, batch_size=4)
    r = fake_result("baseline", tiny, np.linspace(10.0, 6.0, 20), val=6.2)
    r.phases.update(data=12.3, segment=1.5, compile=3.0, train=40.0, final_eval=2.0, outputs=0.5)
    text = report.write_report(tmp_path, [r], {"baseline": fake_prepared()}, "made up",
                               {}).read_text()
    setup = text.split("## 3. Training setup and experiments")[1].split("## 4.")[0]
    assert "| experiment | data | segment | compile | train | final_eval | outputs |" in setup
    assert re.search(r"\| baseline \| 12\.3 \| 1\.5 \| 3\.0 \| 40\.0 \| 2\.0 \| 0\.5 \|", setup)


def test_write_section_replaces_its_own_section_and_keeps_the_rest(tmp_path):
    (tmp_path / report.FILE).write_text("# MiniGPT report\n\n## Results\n\nold\n\n## Setup\n\nkept\n")
    report.write_section(tmp_path, "Results", "new body")
    report.write_section(tmp_path, "Tuning", "study")
    text = (tmp_path / report.FILE).read_text()
    assert "old" not in text and "new body" in text and "kept" in text
    assert text.index("## Results") < text.index("## Setup") < text.index("## Tuning")
    report.write_section(tmp_path / "fresh", "Scaling", "law")
    assert "## Scaling\n\nlaw" in (tmp_path / "fresh" / report.FILE).read_text()
