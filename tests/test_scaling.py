"""The scaling study: scripts/scaling.py end to end on a tiny grid, --fit on a table, bad input."""

import json
import pathlib

import numpy as np
import pytest
from conftest import load_script, run_script

from minigpt_jax import runner, scaling
from minigpt_jax import scaling_law as law

pytestmark = pytest.mark.slow
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
TINY = ["--widths", "16,24,32", "--depths", "1", "--heads", "2", "--tokens", "2k,4k,8k",
        "--set", "batch_size=8", "--set", "eval_batches=2", "--set", "eval_final_batches=4",
        "--set", "dropout=0.0", "--lr", "3e-3", "--resamples", "20"]
OUTPUTS = ["scaling_table.csv", "scaling_table.txt", "scaling_fit.json", "report.md",
           "scaling_loss_vs_tokens.png", "scaling_loss_vs_params.png", "scaling_isoloss.png"]


def script(*args):
    return run_script("scaling.py", *args)


def test_fit_a_table_recovers_known_constants(tmp_path):
    rng = np.random.default_rng(1)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 5)))
    L = law.loss([TRUE[k] for k in law.NAMES], N, D) * np.exp(rng.normal(0, 0.01, N.shape))
    table = tmp_path / "runs.csv"
    table.write_text("N,D,loss\n" + "".join(f"{n},{d},{v}\n" for n, d, v in zip(N, D, L)))
    p = script("--fit", table, "--out", tmp_path / "fit", "--resamples", "100")
    assert p.returncode == 0, p.stderr
    fit = json.loads((tmp_path / "fit" / "scaling_fit.json").read_text())
    for k, v in TRUE.items():
        assert fit[k]["low"] <= v <= fit[k]["high"], (k, fit[k])
    assert "held_out" in fit and len(fit["optimal"]) == 3
    for name in OUTPUTS:
        assert (tmp_path / "fit" / name).exists(), name


@pytest.mark.parametrize("args, match", [
    (["--widths", "30", "--heads", "4"], "--widths 30: not divisible by --heads 4"),
    (["--widths", ","], "--widths is empty"),
    (["--widths", "16,16"], "--widths: 16 given twice"),
    (["--count", "weights"], "--count 'weights'"),
    (["--tokens", "5k,5G"], "--tokens 5G: 5,000,000,000 tokens is larger than the data"),
    (["--tokens", "2k,2.1k,8k"], "both come to"),
    (["--lr", "3e-3", "--tune-lr", "1e-3"], "not allowed with argument"),
    (["--widths", "16", "--depths", "1"], "1 shape(s) x 3 budget(s); expected at least two"),
])
def test_bad_input_is_one_line_and_trains_nothing(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "study"
    try:
        code = load_script("scaling").main([*args, "--out", str(out)])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and "Traceback" not in err, err
    assert not out.exists()


def test_fit_refuses_a_table_of_one_shape(tmp_path, capsys):
    table = tmp_path / "one.csv"
    table.write_text("N,D,loss\n" + "".join(f"1e6,{d},3.0\n" for d in (1e8, 2e8, 4e8, 8e8, 2e9)))
    assert load_script("scaling").main(["--fit", str(table), "--out", str(tmp_path / "o")]) == 2
    assert "one value of N" in capsys.readouterr().err


def test_tiny_study_end_to_end_then_rerun_trains_nothing(tmp_path, monkeypatch):
    out = tmp_path / "study"
    p = script(*TINY, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).exists(), name
    rows = (out / "scaling_table.csv").read_text().splitlines()
    assert len(rows) == 1 + 9  # three shapes x three budgets
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "w16_d1_lr0.003", "w24_d1_lr0.003", "w32_d1_lr0.003"]
    assert "## Scaling law" in (out / "report.md").read_text()
    fit = json.loads((out / "scaling_fit.json").read_text())
    assert set(law.NAMES) <= set(fit) and fit["count"] == "nonembed"
    refit = script("--fit", out / "scaling_table.csv", "--out", tmp_path / "refit",
                   "--resamples", "5")  # the study's own table, read back: its runs group rows
    assert refit.returncode == 0, refit.stderr[-2000:]
    assert "3 runs, too few to resample" in refit.stderr
    first = (out / "scaling_table.csv").read_text()
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("re-run trained again"))
    (out / "scaling_table.csv").unlink()
    assert load_script("scaling").main([*TINY, "--out", str(out)]) == 0
    assert (out / "scaling_table.csv").read_text() == first


def test_budgets_fall_on_evaluation_steps():
    steps, every = scaling.budget_steps(["1.1k", "2k", "0.5ep"], 10_000, 100.0, 1, constant=True)
    assert every == 5 and steps == [10, 20, 50]  # 11 steps rounds to an evaluation step
    assert scaling.budget_steps(["1k", "3k"], 10_000, 90.0, 1, constant=False)[0] == [11, 33]


def fake_runner(calls, lr_best=1e-3):
    """runner.run writing only the held-out rows a known law gives: the study's bookkeeping
    (folders, steps, evaluations, tuning) without training."""
    from minigpt_jax import config as cfg

    def run(experiments, *, out, overrides, sweeps=(), max_steps, data, devices, resume):
        calls.append((pathlib.Path(out).name, max_steps, dict(overrides), sweeps))
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
        variants = [(f"lr_{t}", v) for t, v in sweeps[0][1]] if sweeps else [("baseline", None)]
        for name, lr in variants:
            c = cfg.BASELINE.replace(**overrides, **({"lr": lr} if lr else {}))
            steps = sorted({*range(c.eval_every, max_steps + 1, c.eval_every), max_steps})
            rows = [(s, s * c.batch_size * 60) for s in steps]
            penalty = np.log(c.lr / lr_best) ** 2
            at = [TRUE[k] for k in law.NAMES], law.non_embedding_params(c)
            text = "step,tokens,val_loss,val_perplexity\n" + "".join(
                f"{s},{t},{law.loss(*at, t) + penalty},0\n" for s, t in rows)
            (pathlib.Path(out) / f"metrics_{name}_val.csv").write_text(text)
        return []
    return run


def test_cosine_schedule_runs_each_budget_and_tune_lr_picks_the_best(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run", fake_runner(calls))
    study = scaling.Study(scaling.shapes([16, 32, 64], [1]), ("2k", "4k", "8k"),
                          tune_lrs=(3e-4, 1e-3, 3e-3), resamples=10,
                          overrides={"lr_schedule": "cosine", "batch_size": 8})
    summary = scaling.run_study(study, tmp_path)
    tuned = [c for c in calls if c[3]]
    assert [c[0] for c in tuned] == ["w16_d1", "w32_d1", "w64_d1"]  # lr/<shape>/
    trained = [c for c in calls if not c[3]]
    assert len(trained) == 9 and {c[2]["lr"] for c in trained} == {1e-3}
    steps = [c[1] for c in trained[:3]]  # one run per budget, each as long as its budget
    assert [c[0] for c in trained[:3]] == [f"w16_d1_lr0.001_s{s}" for s in steps]
    assert abs(steps[1] - 2 * steps[0]) <= 1 and abs(steps[2] - 4 * steps[0]) <= 2
    assert summary["points"] == 9 and summary["count"] == "nonembed"
    calls.clear()
    scaling.run_study(study, tmp_path)  # everything on disk: nothing runs again
    assert calls == []
