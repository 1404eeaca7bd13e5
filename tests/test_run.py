"""scripts/run.py end to end, on tiny models, into tmp_path."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--set", "embed_dim=32", "--set", "n_heads=2", "--set", "seq_len=32", "--set", "batch_size=4"]


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run.py"), *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=600,
    )


def test_two_experiments_write_metrics(tmp_path):
    r = run("--experiments", "baseline,n_layers_1", "--max-steps", "3", "--out", str(tmp_path), *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("baseline", "n_layers_1"):
        rows = list(csv.DictReader(open(tmp_path / f"metrics_{name}.csv")))
        assert [int(r["step"]) for r in rows] == [1, 2, 3]
        tokens = [int(r["tokens"]) for r in rows]
        assert tokens[0] > 0 and tokens == sorted(tokens)
        for row in rows:
            assert 0 < float(row["loss"]) < 20
            assert float(row["perplexity"]) == pytest.approx(2.718281828 ** float(row["loss"]), rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--experiments", "nope"], "unknown experiment 'nope'; valid: baseline, lr_1e-3"),
    (["--set", "foo=1"], "unknown config key 'foo'; valid keys:"),
    (["--set", "lr=fast"], "lr='fast': expected float"),
    (["--set", "seq_len=16"], "seq_len=16: must be in [32, 128]"),
    (["--max-steps", "0"], "--max-steps 0: must be a positive integer"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    r = run("--out", str(tmp_path / "out"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
