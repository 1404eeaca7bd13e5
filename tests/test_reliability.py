"""Reliability of scripts/run.py: bad input is one clear error before any training, and
no signal, kill -9, NaN or failure loses or corrupts what was already computed.

- The bad-input table runs run.py's main() in this process (seconds for all of it) and
  captures file descriptor 2, so anything a library prints counts too; three of its
  cases run again as real subprocesses.
- The fault tests start run.py as a subprocess on a tiny model, watch its checkpoint
  folder to pick the moment, then signal or kill it. They assert what must hold
  whatever the exact step the signal lands on.
"""

import csv
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import TINY, load_script, run_script, start_script

torch = pytest.importorskip("torch")

STEPS = 16  # of the straight run every interrupted run is compared with
ORBAX_TMP = ".orbax-checkpoint-tmp"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    torch.save([torch.tensor(rng.integers(0, 50000, n)) for n in rng.integers(20, 150, 80)],
               folder / "tokenized_data.pt")
    return folder


def base_args(data_folder, steps=STEPS, experiments="baseline"):
    return ["--experiments", experiments, "--data", str(data_folder), *TINY, "--max-steps", str(steps)]


class Started:
    """run.py in the background, its output going to a log file."""

    def __init__(self, args, log: pathlib.Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = start_script("run.py", *args, stdout=f)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, condition, timeout=300.0):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run.py ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {what} after {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.005)

    def finish(self, timeout=300.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"run.py still running {timeout} s after the signal:\n{self.text()[-3000:]}")


def committed_steps(ckpt: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def saving_step(ckpt: pathlib.Path) -> int:
    """The step of a checkpoint being written now (its temporary folder), else -1."""
    try:
        names = os.listdir(ckpt)
    except FileNotFoundError:
        return -1
    return max((int(n.split(".")[0]) for n in names if ORBAX_TMP in n), default=-1)


def metrics(out, name="baseline"):
    """Per step: everything but the wall-clock seconds."""
    return [(r["step"], r["tokens"], r["loss"], r["perplexity"])
            for r in csv.DictReader(open(out / f"metrics_{name}.csv"))]


def results(out):
    return {r["experiment"]: r for r in csv.DictReader(open(out / "results_table.csv"))}


def assert_outputs_whole(out: pathlib.Path, aborted: bool = False):
    """Every file under out is complete: CSVs parse, PNGs decode, .pt files load, and the latest
    checkpoint of each experiment reads in full. No temporary file is left, unless the run was
    aborted (then they may be, under names nothing reads)."""
    import matplotlib.image

    from minigpt_jax import checkpoint
    from minigpt_jax.config import Config

    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name or ORBAX_TMP in p.name]
    assert aborted or not leftovers, f"temporary files left behind: {leftovers}"
    for f in out.glob("*.csv"):
        rows = list(csv.DictReader(open(f)))
        if aborted and f.name.startswith("metrics_"):  # append-only: an abort may tear the last row
            rows = rows[:-1]
        assert all(None not in r.values() and "" not in (r.get("step"), r.get("loss")) for r in rows), f
    for f in out.glob("*.png"):
        assert matplotlib.image.imread(f).shape[0] > 100, f
    for f in out.glob("*.pt"):
        assert "head.weight" in torch.load(f, weights_only=True), f
    for ckpt in (out / "checkpoints").glob("*"):
        steps = committed_steps(ckpt)
        if steps:
            mngr = checkpoint.manager(ckpt)
            checkpoint.verify(mngr, steps[-1], checkpoint.read_config(mngr, steps[-1]))
            assert isinstance(checkpoint.read_config(mngr, steps[-1]), Config)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_folder):
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("straight")
    r = run_script("run.py", *base_args(data_folder), "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(metrics(out)) == STEPS
    return out


# ---------------------------------------------------------------- bad input, before training


class _WouldRunCode:
    """Unpickling this calls os.system: the classic malicious .pt payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pt(obj):
    def make(path):
        torch.save(obj, path)
    return make


def raw(data: bytes):
    def make(path):
        path.write_bytes(data)
    return make


def truncated(path):
    torch.save([torch.arange(1000)], path)
    path.write_bytes(path.read_bytes()[:-200])


def damage_state_data(step: pathlib.Path):
    for f in (step / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)


def other_data(step: pathlib.Path):
    """Not damage: other data beside the run (step is tmp/out/checkpoints/baseline/16)."""
    rng = np.random.default_rng(1)
    torch.save([torch.tensor(rng.integers(0, 50000, n)) for n in rng.integers(20, 150, 80)],
               step.parents[3] / "other.pt")


# id -> (what goes into --data, or None; extra arguments; expected message, a regex).
# {data}, {out}, {ckpt} in the arguments and message are filled in per case.
DATA_CASES = {
    "missing path": ("missing", [], r"{tmp}/nope.pt: no such file; expected a file written by torch.save"),
    "folder with neither data file": ("folder", [], r"{data}: a folder with neither tokenized_data.pt nor sample_dataset.pt; expected one of them"),
    "not a zip or pickle": (raw(b"token ids, one per line\n1 2 3\n"), [], r"not a zip archive or pickle \(starts with b'token id'\); expected a file written by torch.save"),
    "truncated .pt": (truncated, [], r"damaged or truncated \(\w+Error: .*\); expected a complete copy of a file written by torch.save"),
    "pickle that would run code": ("payload", [], r"refused to load, its pickle would call \S*system and so could run code; expected only tensors"),
    "dict without input_ids": (pt({"ids": torch.zeros(2, 40, dtype=torch.long)}), [], r"found a dict with keys \['ids'\], without 'input_ids'; expected a dict with an 'input_ids' 2-D integer tensor"),
    "list of strings": (pt(["Hello world", "more text"]), [], r"sequence 0 is a str \('Hello world'\); expected a 1-D integer tensor"),
    "nested lists": (pt([[[1, 2, 3], [4, 5, 6]]]), [], r"sequence 0 holds a list of 3 items at position 0; expected integer token ids"),
    "3-D tensor": (pt([torch.zeros(2, 3, 40, dtype=torch.long)]), [], r"sequence 0 has shape \(2, 3, 40\); expected a 1-D sequence of token ids"),
    "3-D input_ids": (pt({"input_ids": torch.zeros(2, 3, 40, dtype=torch.long)}), [], r"'input_ids' has shape \(2, 3, 40\); expected a 2-D integer tensor"),
    "float tensors": (pt([torch.rand(40)]), [], r"sequence 0 has dtype float32; expected integer token ids"),
    "negative ids": (pt([torch.arange(40), torch.tensor([5, 6, -3, 7])]), [], r"sequence 1 has token id -3 at position 2; expected ids in \[0, 50257\)"),
    "ids >= vocab_size": (pt({"input_ids": torch.tensor([[1, 2, 50257, 3]])}), [], r"sequence 0 has token id 50257 at position 2; expected ids in \[0, 50257\)"),
    "empty list": (pt([]), [], r"no sequences found; expected at least one sequence of token ids"),
    "only sequences shorter than 2 tokens": (pt([torch.tensor([5]), torch.tensor([], dtype=torch.long)]), [], r"every sequence is shorter than 2 tokens; expected at least one with 2 or more"),
}
ARG_CASES = {
    "seq_len below 32": (["--set", "seq_len=16"], r"seq_len=16: must be in \[32, 4096\]"),
    "seq_len above 4096": (["--set", "seq_len=4097"], r"seq_len=4097: must be in \[32, 4096\]"),
    "embed_dim not divisible by n_heads": (["--experiments", "baseline", "--set", "embed_dim=30"], r"embed_dim=30: must be divisible by n_heads=4"),
    "zero batch size": (["--set", "batch_size=0"], r"batch_size=0: must be a positive integer \(>= 1\)"),
    "negative batch size": (["--set", "batch_size=-8"], r"batch_size=-8: must be a positive integer \(>= 1\)"),
    "zero learning rate": (["--set", "lr=0"], r"lr=0.0: must be > 0"),
    "negative learning rate": (["--set", "lr=-1e-3"], r"lr=-0.001: must be > 0"),
    "unknown experiment": (["--experiments", "baseline,lr_1e-4"], r"unknown experiment 'lr_1e-4'; valid: baseline, lr_1e-3, batch_size_16, n_layers_1, embed_dim_64"),
    "unknown --set key": (["--set", "learning_rate=1e-3"], r"unknown config key 'learning_rate'; valid keys: vocab_size, seq_len"),
    "malformed --set value": (["--set", "batch_size=3.5"], r"batch_size='3.5': expected int"),
    "--set without =": (["--set", "lr"], r"--set 'lr': expected key=value, e.g. --set lr=1e-3"),
    "--max-steps not an integer": (["--max-steps", "ten"], r"--max-steps 'ten': expected a positive integer"),
    "--devices with a non-integer": (["--devices", "0,gpu1"], r"--devices '0,gpu1': 'gpu1' is not an integer; expected indices into jax.devices\(\)"),
    "--only with a list": (["--only", "baseline,lr_1e-3"], r"--only 'baseline,lr_1e-3': expected one experiment name or 'all'"),
    "--only and --experiments": (["--only", "baseline", "--experiments", "baseline"], r"--only and --experiments both given; expected one of them"),
    "--out under a regular file": (["--out", "{tmp}/a_file/out"], r"--out {tmp}/a_file/out: {tmp}/a_file is not a folder; expected a writable folder"),
    "--out where nothing can be created": (["--out", "/proc/minigpt-out"], r"--out /proc/minigpt-out: cannot create anything in /proc \(.+\); expected a writable folder"),
}
RESUME_CASES = {  # --resume against a copy of the straight run's checkpoints (steps 14 and 16)
    "--resume with another configuration": (None, ["--set", "lr=1e-3"], r"--resume: checkpoint {ckpt}/16 was made with another config \(lr: 0.0005 vs 0.001 \[saved vs now\]\); expected the same config"),
    "--resume, checkpoint state damaged": (damage_state_data, [], r"--resume: checkpoint {ckpt}/16: damaged, cannot be read \(ValueError: .*\); expected a complete checkpoint: delete {ckpt}/16 to resume from step 14, or run without --resume"),
    "--resume, checkpoint state missing": (lambda s: shutil.rmtree(s / "state"), [], r'--resume: checkpoint {ckpt}/16: damaged, cannot be read \(KeyError: Item "state" was not found in the checkpoint\. .*\); expected a complete checkpoint'),
    "--resume, checkpoint progress garbled": (lambda s: (s / "progress" / "metadata").write_text('{"rows": [{"st'), [], r"--resume: checkpoint {ckpt}/16: damaged, cannot be read \(JSONDecodeError: .*\); expected a complete checkpoint"),
    "--resume, checkpoint config garbled": (lambda s: (s / "config" / "metadata").write_bytes(b"\x00" * 64), [], r"--resume: checkpoint {ckpt}/16: cannot read its config \(.*\); expected a complete checkpoint"),
    "--resume, checkpoint folder is a file": ("file", [], r"--resume: {ckpt} is not a folder; expected the Orbax checkpoints of baseline"),
    "--resume on other data": (other_data, ["--data", "{tmp}/other.pt"], r"--resume: checkpoint {ckpt}/16 was trained on other data \(fingerprint sha256:\w+\.\.\.\) than {tmp}/other.pt \(sha256:\w+\.\.\.\); expected the same --data"),
}
assert len(DATA_CASES) + len(ARG_CASES) + len(RESUME_CASES) >= 25


@pytest.fixture(scope="module")
def run_py():
    import jax

    jax.devices()  # start JAX before output is captured
    return load_script("run")


def snapshot(path: pathlib.Path):
    """Every entry under path with its size and modification time (None: path absent)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, None if p.is_dir() else p.stat().st_mtime_ns)
            for p in path.rglob("*")}


def prepare(case: str, tmp: pathlib.Path, data_folder, straight):
    """-> (argv, expected-message regex, out folder, marker file that must not appear)."""
    out, marker = tmp / "out", tmp / "MARKER"
    fill = dict(tmp=tmp, out=out, data=data_folder, ckpt=out / "checkpoints" / "baseline")
    (tmp / "a_file").write_text("not a folder")
    if case in DATA_CASES:
        make, extra, message = DATA_CASES[case]
        fill["data"] = {"folder": tmp / "data", "missing": tmp / "nope.pt"}.get(make, tmp / "tokenized_data.pt")
        if make == "folder":
            fill["data"].mkdir()
            (fill["data"] / "tokenized.pt").write_bytes(b"")  # a near miss, not a data file
        elif make == "payload":
            torch.save([torch.arange(40), _WouldRunCode(marker)], fill["data"])
        elif make != "missing":
            make(fill["data"])
        argv = ["--experiments", "baseline", *TINY, "--data", "{data}", "--out", "{out}", *extra]
    elif case in ARG_CASES:
        extra, message = ARG_CASES[case]
        argv = ([] if "--out" in extra else ["--out", "{out}"]) + extra
    else:
        damage, extra, message = RESUME_CASES[case]
        shutil.copytree(straight / "checkpoints", out / "checkpoints")
        if damage == "file":
            shutil.rmtree(fill["ckpt"])
            fill["ckpt"].write_text("not a checkpoint")
        elif damage is not None:
            damage(fill["ckpt"] / "16")
        argv = [*base_args("{data}"), "--out", "{out}", "--resume", *extra]
    argv = [a.format(**fill) for a in argv]
    message = message.format(**{k: re.escape(str(v)) for k, v in fill.items()})
    return argv, message, out, marker


ALL_CASES = [*DATA_CASES, *ARG_CASES, *RESUME_CASES]


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, data_folder, straight, run_py, capfd):
    argv, message, out, marker = prepare(case, tmp_path, data_folder, straight)
    before = snapshot(out)
    capfd.readouterr()
    code = run_py.main(argv)  # any exception fails the test: that would be a traceback
    err = capfd.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("run.py: error: "), lines[0]
    assert re.search(message, lines[0]), f"\n{lines[0]}\ndoes not match\n{message}"
    assert re.search(r"expected|must|valid", lines[0]), "the message should say what was expected"
    assert snapshot(out) == before, "something was written under the output folder"
    assert not marker.exists(), "the .pt payload ran"


@pytest.mark.parametrize("case", ["pickle that would run code", "--out where nothing can be created",
                                  "--resume, checkpoint state damaged"])
def test_bad_input_in_a_subprocess(case, tmp_path, data_folder, straight):
    """The real process: exit status 2 and one line on stderr, also once the interpreter exits
    (where a failed tensorstore read used to print dozens of tracebacks)."""
    argv, message, out, marker = prepare(case, tmp_path, data_folder, straight)
    before = snapshot(out)
    r = run_script("run.py", *argv)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), r.stderr[-3000:]
    assert snapshot(out) == before and not marker.exists()


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("when", ["after checkpoint 2", "while a checkpoint is being written", "between checkpoints"])
def test_kill_9_then_resume_equals_the_straight_run(when, tmp_path, data_folder, straight):
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "baseline"
    args = [*base_args(data_folder), "--out", out]
    job = Started(args, tmp_path / "killed.log")
    if when == "after checkpoint 2":
        job.wait_for("checkpoint 2", lambda: (ckpt / "2").is_dir())
    elif when == "while a checkpoint is being written":
        job.wait_for("a save at step 6 or later", lambda: saving_step(ckpt) >= 6)
    else:
        job.wait_for("checkpoint 10", lambda: (ckpt / "10").is_dir())
        time.sleep(random.uniform(0.0, 0.1))  # somewhere in steps 11 and 12
    job.proc.kill()
    assert job.finish() == -signal.SIGKILL, "run.py ended before the kill: nothing was tested"
    steps = committed_steps(ckpt)
    assert steps and steps[-1] < STEPS, steps
    if when == "while a checkpoint is being written":
        # Whether or not the kill caught the save before its rename, leave an uncommitted, broken
        # later step as a save cut short would: resume must not take it.
        fake = ckpt / f"{steps[-1] + 2}{ORBAX_TMP}-1"
        shutil.copytree(ckpt / str(steps[-1]), fake)
        (fake / "commit_success.txt").unlink()
        damage_state_data(fake)
    r = run_script("run.py", *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"baseline: resuming at step {steps[-1]} from " in r.stderr
    assert metrics(out) == metrics(straight)
    assert committed_steps(ckpt)[-1] == STEPS
    assert not [p for p in ckpt.iterdir() if ORBAX_TMP in p.name], "uncommitted saves were not cleaned up"


def test_sigterm_saves_and_stops_every_running_experiment_then_resume_continues(tmp_path, data_folder, straight):
    out = tmp_path / "out"
    # baseline and lr_1e-3 train at the same time on devices 1 and 2; n_layers_1 waits for device 1.
    args = [*base_args(data_folder, steps=200, experiments="baseline,lr_1e-3,n_layers_1"),
            "--devices", "1,2,1", "--out", out]
    job = Started(args, tmp_path / "run.log")
    job.wait_for("both progress bars", lambda: "baseline [cpu:1]" in job.text() and "lr_1e-3 [cpu:2]" in job.text())
    job.proc.send_signal(signal.SIGTERM)  # most likely while the first step compiles: before any block ends
    assert job.finish() == 130, job.text()[-3000:]
    log = job.text()
    assert "run.py: SIGTERM: saving checkpoints and stopping" in log and "Traceback" not in log, log[-3000:]
    table = results(out)
    assert table["n_layers_1"]["status"] == "stopped before start"
    for name in ("baseline", "lr_1e-3"):
        m = re.fullmatch(r"stopped at step (\d+)", table[name]["status"])
        assert m, table[name]["status"]
        k = int(m.group(1))
        assert k < 200 and k == int(table[name]["steps"])
        assert committed_steps(out / "checkpoints" / name)[-1] == k  # saved where it stopped
        assert len(metrics(out, name)) == k
        assert (out / f"loss_curve_{name}.png").is_file() and (out / f"mini_gpt_{name}.pt").is_file()
    assert not (out / "metrics_n_layers_1.csv").exists() and not (out / "checkpoints" / "n_layers_1").exists()
    assert_outputs_whole(out)

    r = run_script("run.py", *base_args(data_folder), "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"baseline: resuming at step {table['baseline']['steps']} from " in r.stderr
    assert metrics(out) == metrics(straight)


def test_second_sigint_aborts_at_once_and_leaves_only_whole_files(tmp_path, data_folder):
    from minigpt_jax import checkpoint
    from minigpt_jax.config import experiment_config

    out = tmp_path / "out"
    job = Started([*base_args(data_folder, steps=200), "--out", out], tmp_path / "run.log")
    job.wait_for("checkpoint 2", lambda: (out / "checkpoints" / "baseline" / "2").is_dir())
    job.proc.send_signal(signal.SIGINT)
    job.wait_for("the first signal's notice", lambda: "saving checkpoints and stopping" in job.text())
    job.proc.send_signal(signal.SIGINT)
    assert job.finish(timeout=60) == 130
    log = job.text()
    assert "run.py: aborted; the checkpoints saved so far are kept" in log and "Traceback" not in log, log[-3000:]
    # What exists is whole, wherever the abort landed, and --resume accepts it.
    assert_outputs_whole(out, aborted=True)
    committed = committed_steps(out / "checkpoints" / "baseline")
    assert len(metrics(out)) >= committed[-1]  # flushed before each checkpoint is saved
    overrides = dict(s.split("=") for s in TINY[1::2])
    config = experiment_config("baseline", {k: int(v) for k, v in overrides.items()})
    checkpoint.check_resumable(out, {"baseline": config})  # reads the latest checkpoint in full


def test_nan_stops_that_experiment_keeps_its_last_good_checkpoint_and_the_others_finish(tmp_path, data_folder):
    """lr 1 with weight decay 30 multiplies baseline's weights by -29 every step, so its loss
    overflows within a few steps; lr_1e-3 (lr 0.001, the same decay) trains normally."""
    import jax

    from minigpt_jax import checkpoint

    out = tmp_path / "out"
    r = run_script("run.py", *base_args(data_folder, steps=10, experiments="baseline,lr_1e-3"),
                   "--devices", "1,2", "--set", "lr=1", "--set", "weight_decay=30", "--out", out)
    assert r.returncode == 1, r.stderr[-3000:]  # one experiment failed
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    m = re.search(r"baseline +failed: baseline: non-finite loss at step (\d+)", r.stderr)
    assert m, r.stderr[-3000:]
    k = int(m.group(1))
    table = results(out)
    assert table["baseline"]["status"] == f"failed: baseline: non-finite loss at step {k}"
    assert f"failed: baseline: non-finite loss at step {k}" in (out / "results_table.txt").read_text()
    assert table["lr_1e-3"]["status"] == "ok" and table["lr_1e-3"]["steps"] == "10"

    # baseline: the steps before the diverging one and its last good checkpoint are kept, finite.
    rows = metrics(out, "baseline")
    good = committed_steps(out / "checkpoints" / "baseline")
    assert good, "the loss diverged before the first checkpoint: lower weight_decay in this test"
    assert good[-1] <= len(rows) == k - 1
    assert all(np.isfinite(float(row[2])) for row in rows)
    mngr = checkpoint.manager(out / "checkpoints" / "baseline")
    state, _ = checkpoint.restore(mngr, good[-1], checkpoint.read_config(mngr, good[-1]))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))
    assert not (out / "mini_gpt_baseline.pt").exists()

    # lr_1e-3: complete.
    assert len(metrics(out, "lr_1e-3")) == 10 and committed_steps(out / "checkpoints" / "lr_1e-3")[-1] == 10
    for f in ("loss_curve_lr_1e-3.png", "perplexity_curve_lr_1e-3.png", "mini_gpt_lr_1e-3.pt",
              "loss_curves.png", "results_table.txt"):
        assert (out / f).is_file(), f
    assert_outputs_whole(out)


def test_kill_9_a_stack_of_seeds_then_resume_equals_the_straight_run(tmp_path, data_folder):
    """--seeds 2 trains the seeds as one stack: killed after a checkpoint, --resume continues
    both seeds from it, exactly."""
    seeded = [*base_args(data_folder, steps=8), "--seeds", "2"]
    r = run_script("run.py", *seeded, "--out", tmp_path / "straight")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    job = Started([*seeded, "--out", out], tmp_path / "killed.log")
    job.wait_for("checkpoint 4", lambda: (out / "checkpoints" / "baseline_seed43" / "4").is_dir())
    job.proc.kill()
    assert job.finish() == -signal.SIGKILL, "run.py ended before the kill: nothing was tested"
    r = run_script("run.py", *seeded, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "baseline_seed42: resuming at step" in r.stderr
    for name in ("baseline_seed42", "baseline_seed43"):
        assert metrics(out, name) == metrics(tmp_path / "straight", name)
    assert metrics(out, "baseline_seed42") != metrics(out, "baseline_seed43")
