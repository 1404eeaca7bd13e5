"""scripts/run.py end to end in subprocesses, on tiny models, into tmp_path."""

import csv
import math

import numpy as np
import pytest
from conftest import TINY, run_script

NAMES = ["baseline", "lr_1e-3", "batch_size_16", "n_layers_1", "embed_dim_64"]


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    seqs = [torch.tensor(rng.integers(0, 50000, n)) for n in rng.integers(20, 150, 80)]
    torch.save(seqs, folder / "tokenized_data.pt")
    return folder


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_folder):
    out = tmp_path_factory.mktemp("out")
    r = run_script("run.py", "--devices", "1,2,3,4,5", "--max-steps", 3, "--data", data_folder,
                   "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_every_output_exists(full_run):
    out, _ = full_run
    expected = ["loss_curves.png", "perplexity_curves.png", "results_table.txt",
                "results_table.csv"]
    for n in NAMES:
        expected += [f"metrics_{n}.csv", f"loss_curve_{n}.png", f"perplexity_curve_{n}.png",
                     f"mini_gpt_{n}.pt"]
    missing = [f for f in expected if not (out / f).is_file()]
    assert not missing
    assert not [p for p in out.rglob("*.tmp*")], "temporary files left behind"
    import matplotlib.image

    for png in out.glob("*.png"):
        img = matplotlib.image.imread(png)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.01, png


def test_results_table_has_five_rows_of_finite_numbers_on_their_devices(full_run):
    out, _ = full_run
    rows = list(csv.DictReader(open(out / "results_table.csv")))
    assert [r["experiment"] for r in rows] == NAMES
    assert [r["device"] for r in rows] == [f"cpu:{i}" for i in (1, 2, 3, 4, 5)]
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == "3"
        for k in ("parameters", "tokens", "train_loss", "train_perplexity", "val_loss",
                  "val_perplexity", "wall_seconds", "tokens_per_second"):
            assert math.isfinite(float(r[k])), (r["experiment"], k, r[k])
    text = (out / "results_table.txt").read_text()
    assert all(n in text for n in NAMES)


def test_checkpoints_restore_with_plain_orbax(full_run):
    import orbax.checkpoint as ocp

    out, _ = full_run
    for name, d in [("baseline", 32), ("embed_dim_64", 64)]:
        mngr = ocp.CheckpointManager(out / "checkpoints" / name)
        assert mngr.latest_step() == 3
        got = mngr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      config=ocp.args.JsonRestore()))
        params = got["state"]["params"]
        assert params["embed"]["embedding"].shape == (50257, d)
        assert params["layers_0"]["attn"]["qkv"]["kernel"].shape == (d, 3 * d)
        assert int(got["state"]["step"]) == 3 and got["config"]["embed_dim"] == d


def test_pt_exports_load_strictly_and_match_jax_logits(full_run):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from minigpt_jax import checkpoint
    from minigpt_jax.model import MiniGPT
    from torch_compat import reference

    out, _ = full_run
    tokens = np.random.default_rng(1).integers(0, 50000, (2, 32))
    for name in ("baseline", "n_layers_1"):
        params, config, step = checkpoint.load_params(out / "checkpoints" / name)
        model = reference.MiniGPT.from_config(config)
        model.load_state_dict(torch.load(out / f"mini_gpt_{name}.pt", weights_only=True),
                              strict=True)
        model.eval()
        with torch.no_grad():
            want = reference.causal_logits(model, torch.tensor(tokens)).numpy()
        got = np.asarray(MiniGPT(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_resume_via_cli_equals_straight_run(tmp_path, data_folder):
    args = ["--experiments", "baseline", "--data", data_folder, *TINY, "--set", "dropout=0.1"]
    a = run_script("run.py", *args, "--max-steps", 6, "--out", tmp_path / "a")
    b1 = run_script("run.py", *args, "--max-steps", 4, "--out", tmp_path / "b")
    b2 = run_script("run.py", *args, "--max-steps", 6, "--out", tmp_path / "b", "--resume")
    assert a.returncode == b1.returncode == b2.returncode == 0, (a.stderr + b2.stderr)[-2000:]

    def metrics(out):
        return [(r["step"], r["tokens"], r["loss"], r["perplexity"])
                for r in csv.DictReader(open(out / "metrics_baseline.csv"))]

    assert len(metrics(tmp_path / "a")) == 6
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


@pytest.mark.parametrize("args, message", [
    (["--experiments", "nope"], "unknown experiment 'nope'; valid: baseline, lr_1e-3"),
    (["--set", "foo=1"], "unknown config key 'foo'; valid keys:"),
    (["--set", "lr=fast"], "lr='fast': expected float"),
    (["--set", "seq_len=16"], "seq_len=16: must be in [32, 4096]"),
    (["--max-steps", "0"], "--max-steps 0: must be a positive integer"),
    (["--devices", "1,x"],
     "--devices '1,x': 'x' is not an integer; expected indices into jax.devices()"),
    (["--only", "nope"], "unknown experiment 'nope'; valid: baseline, lr_1e-3"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    r = run_script("run.py", "--out", tmp_path / "out", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_inspect_export_import_scripts(full_run, tmp_path):
    pytest.importorskip("torch")
    out, _ = full_run
    r = run_script("inspect_checkpoint.py", out / "checkpoints" / "baseline")
    assert r.returncode == 0, r.stderr
    assert "step        3" in r.stdout and "head.kernel" in r.stdout and "(32, 50257)" in r.stdout
    assert "second moment (nu)" in r.stdout and "on disk" in r.stdout
    r = run_script("export_state_dict.py", out / "checkpoints" / "baseline", tmp_path / "x.pt")
    assert r.returncode == 0, r.stderr
    r = run_script("import_state_dict.py", tmp_path / "x.pt", tmp_path / "ckpt", "--n-heads", "2")
    assert r.returncode == 0, r.stderr
    r = run_script("export_state_dict.py", tmp_path / "ckpt", tmp_path / "y.pt")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.pt").read_bytes() != b""
    import torch

    a, b = torch.load(tmp_path / "x.pt"), torch.load(tmp_path / "y.pt")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = run_script("inspect_checkpoint.py", tmp_path / "nothing")
    assert r.returncode == 2 and "no such checkpoint folder" in r.stderr


@pytest.mark.parametrize("n_devices, used", [(1, [0, 0]), (3, [1, 2])])
def test_devices_that_do_not_exist_are_left_out_with_a_notice(tmp_path, data_folder, n_devices,
                                                              used):
    """Their rule: listed indices that do not exist are dropped; none left, every device."""
    r = run_script("run.py", "--devices", "1,2,3,4,5", "--experiments", "baseline,lr_1e-3",
                   "--max-steps", 1, "--data", data_folder, "--out", tmp_path, *TINY,
                   devices=n_devices)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = sorted(set(used))
    notice = [line for line in r.stderr.splitlines() if line.startswith("run.py: --devices")]
    assert notice == [f"run.py: --devices 1,2,3,4,5: {n_devices} cpu device(s) found, no index"
                      f" {','.join(str(i) for i in range(n_devices, 6) if i)};"
                      f" using {','.join(map(str, kept))}"]
    rows = list(csv.DictReader(open(tmp_path / "results_table.csv")))
    assert [row["device"] for row in rows] == [f"cpu:{i}" for i in used]


def test_only_runs_one_experiment_and_final_loss_is_the_last_step(tmp_path, data_folder):
    r = run_script("run.py", "--only", "lr_1e-3", "--max-steps", 3, "--data", data_folder,
                   "--out", tmp_path, *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = list(csv.DictReader(open(tmp_path / "results_table.csv")))
    last = list(csv.DictReader(open(tmp_path / "metrics_lr_1e-3.csv")))[-1]
    assert row["experiment"] == "lr_1e-3" and last["step"] == "3"
    assert float(row["final_loss"]) == float(last["loss"])
    assert math.isclose(float(row["final_perplexity"]), math.exp(float(last["loss"])), rel_tol=1e-6)


def test_every_long_phase_prints_a_line_and_the_report_shows_the_phase_times(full_run):
    """A line for reading the data, compiling and the final evaluation (its bar); at the end one
    line per experiment with its phase times (the runner's data, segment and outputs with the
    loop's compile, train and final_eval), which report.md's Setup section tabulates."""
    import re

    from minigpt_jax import report

    out, r = full_run
    err = r.stderr.replace("\r", "\n")
    assert re.search(r"^data: .*, read and checked in [\d.]+ s; split and segmented in [\d.]+ s$",
                     err, re.M)
    assert len(re.findall(r"step program traced and compiled in [\d.]+ s", err)) == len(NAMES)
    assert all(f"{n}: final evaluation" in err for n in NAMES)
    text = (out / "report.md").read_text()
    setup = text.split("## 3. Training setup and experiments")[1].split("## 4.")[0]
    assert "| experiment | " + " | ".join(report.PHASES) + " |" in setup
    for n in NAMES:
        m = re.search(rf"^  {re.escape(n)} +ok; (.*)$", err, re.M)
        assert m, f"no phase line for {n}"
        phases = dict(re.findall(r"(\w+) ([\d.]+) s", m.group(1)))
        assert list(phases) == list(report.PHASES), m.group(1)
        assert all(float(v) >= 0 for v in phases.values()) and float(phases["train"]) > 0
        before_outputs = " | ".join(phases[k] for k in report.PHASES[:-1])
        assert f"| {n} | {before_outputs} |" in setup, n  # outputs grows after the report
