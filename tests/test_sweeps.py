"""What people expect of a training harness, end to end: sweeps, their own text, the optimizer
options and metrics on the command line, bad values as one line."""

import csv
import json

import pytest
from conftest import run_script, tiny_args

TINY = tiny_args(eval_every=2, eval_batches=2)
DEVICES = 2  # simulated CPU devices of each run


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """Two documents of plain English, long enough for the segmentation (docs/spec.md) (>= 32 tokens)."""
    folder = tmp_path_factory.mktemp("text")
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun".split()
    for i in range(2):
        (folder / f"doc{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(2500)))
    (folder / "sub").mkdir()
    (folder / "sub" / "more.txt").write_text("A third document, short, in a subfolder. " * 60)
    return folder


def test_a_2x2_sweep_over_text_writes_four_experiments(tmp_path, text_folder):
    r = run_script("run.py", "--data", text_folder, "--sweep", "lr=1e-3,2e-3",
                   "--sweep", "seed=1,2", "--max-steps", 2, "--out", tmp_path,
                   "--set", "lr_schedule=cosine",
                   "--set", "warmup_steps=1", "--set", "grad_clip=1.0",
                   "--set", "decay_params=matrices", "--set", "val_fraction=0.34", *TINY,
                   devices=DEVICES)
    assert r.returncode == 0, r.stderr[-3000:]
    names = ["lr_1e-3_seed_1", "lr_1e-3_seed_2", "lr_2e-3_seed_1", "lr_2e-3_seed_2"]
    table = list(csv.DictReader(open(tmp_path / "results_table.csv")))
    assert [row["experiment"] for row in table] == names
    assert [row["overrides"].split(", ")[-2:] for row in table] == \
        [["lr=1e-3", "seed=1"], ["lr=1e-3", "seed=2"], ["lr=2e-3", "seed=1"], ["lr=2e-3", "seed=2"]]
    for name in names:
        for f in (f"metrics_{name}.csv", f"loss_curve_{name}.png", f"mini_gpt_{name}.pt"):
            assert (tmp_path / f).is_file(), f
        assert (tmp_path / "checkpoints" / name).is_dir()
        assert list((tmp_path / "tensorboard" / name).glob("events*"))
    assert (tmp_path / "loss_curves.png").is_file()
    # the options reached the optimizer: warmup then cosine, from each run's own lr
    rows = list(csv.DictReader(open(tmp_path / "metrics_lr_2e-3_seed_1.csv")))
    assert [float(row["lr"]) for row in rows] == pytest.approx([1e-3, 2e-3], rel=1e-6)
    jsonl = [json.loads(line) for line in open(tmp_path / "metrics_lr_2e-3_seed_1.jsonl")]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens"} <= set(jsonl[0])
    assert any("val/loss" in row for row in jsonl)
    # a text folder is read once, tokenized with GPT-2 BPE, and said so
    assert f"{text_folder} (text)" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--sweep", "lr"], "--sweep 'lr': expected key=v1,v2,..., e.g. --sweep lr=1e-3,3e-4"),
    (["--sweep", "lr=1e-3,"], "--sweep 'lr=1e-3,': expected key=v1,v2,..."),
    (["--sweep", "lr=1e-3", "--sweep", "lr=2e-3"], "--sweep lr given twice; expected each key once"),
    (["--sweep", "lr=1e-3,0.001"], "--sweep lr: 1e-3, 0.001 are the same value; expected distinct values"),
    (["--sweep", "learning_rate=1"], "unknown config key 'learning_rate'"),
    (["--sweep", "lr=fast"], "lr='fast': expected float"),
    (["--only", "n_layers_1", "--sweep", "n_layers=2,3"], "--sweep n_layers: experiment n_layers_1 sets"),
    (["--set", "lr_schedule=linear"], "lr_schedule='linear': must be one of constant, cosine"),
    (["--set", "warmup_steps=-1"], "warmup_steps=-1: must be >= 0"),
    (["--set", "min_lr_ratio=2"], "min_lr_ratio=2.0: must be in [0, 1]"),
    (["--set", "grad_clip=-1"], "grad_clip=-1.0: must be >= 0"),
    (["--set", "decay_params=biases"], "decay_params='biases': must be one of all, matrices"),
    (["--set", "matmul_precision=fast"], "matmul_precision='fast': must be one of default"),
    (["--set", "ckpt_minutes=0"], "ckpt_minutes=0.0: must be > 0"),
    (["--set", "eval_batches=0"], "eval_batches=0: must be a positive integer"),
    (["--text-docs", "line"], "--text-docs 'line': expected file (one document per file) or block"),
    (["--data", "{tmp}/empty.txt"], "empty.txt: empty file; expected UTF-8 text"),
    (["--data", "{tmp}/latin1.txt"], "latin1.txt: not UTF-8"),
])
def test_bad_values_of_the_new_options_are_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 50)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = run_script("run.py", "--out", tmp_path / "out", *args, devices=DEVICES)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_cosine_schedule_needs_more_steps_than_its_warmup(tmp_path, text_folder):
    r = run_script("run.py", "--data", text_folder, "--only", "baseline", "--max-steps", 2,
                   "--out", tmp_path / "out", "--set", "lr_schedule=cosine",
                   "--set", "warmup_steps=5", *TINY, devices=DEVICES)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines == ["run.py: error: baseline: warmup_steps=5: must be < the run's total steps (2)"
                     " with cosine"], r.stderr


def test_a_stacked_sweep_equals_the_same_sweep_run_variant_by_variant(tmp_path, text_folder):
    """--stack trains the variants as one vmapped program; each still gets its own files and
    the same per-step losses (float32 rounding: tests/test_stack.py states the bound)."""
    common = ["--data", text_folder, "--sweep", "lr=1e-3,3e-3", "--sweep", "seed=1,2", "--max-steps", 3,
              *TINY, "--set", "dropout=0.1"]
    alone = run_script("run.py", *common, "--out", tmp_path / "alone", devices=DEVICES)
    stacked = run_script("run.py", *common, "--stack", "--out", tmp_path / "stacked",
                         devices=DEVICES)
    assert alone.returncode == stacked.returncode == 0, stacked.stderr[-3000:]
    for name in ["lr_1e-3_seed_1", "lr_1e-3_seed_2", "lr_3e-3_seed_1", "lr_3e-3_seed_2"]:
        a, s = ([float(r["loss"]) for r in csv.DictReader(open(tmp_path / d / f"metrics_{name}.csv"))]
                for d in ("alone", "stacked"))
        assert len(a) == len(s) == 3 and a == pytest.approx(s, rel=1e-6), name
        for f in (f"mini_gpt_{name}.pt", f"loss_curve_{name}.png", "report.md"):
            assert (tmp_path / "stacked" / f).is_file(), f
        assert (tmp_path / "stacked" / "checkpoints" / name).is_dir()
