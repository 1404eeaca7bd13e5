"""Hyperparameter search (minigpt_jax/tune.py, scripts/tune.py): the space and every refusal in
process; studies to the end, shared by two workers on SQLite, a journal file and a real
PostgreSQL server, and a worker killed mid-trial, in subprocesses on a tiny model."""

import contextlib
import csv
import glob
import os
import pathlib
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import types

import pytest
import sqlalchemy
from conftest import load_script, run_script, start_script

optuna = pytest.importorskip("optuna")

from minigpt_jax import tune  # noqa: E402

TINY = {"embed_dim": 16, "n_heads": 2, "n_layers": 1, "seq_len": 32, "batch_size": 4,
        "eval_every": 2, "eval_batches": 2, "eval_final_batches": 4}
SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
COMPLETE, PRUNED, RUNNING, FAIL, WAITING = (optuna.trial.TrialState[s] for s in (
    "COMPLETE", "PRUNED", "RUNNING", "FAIL", "WAITING"))


# --- the space, in process ---------------------------------------------------

def test_space_parses_ranges_log_ranges_and_choices():
    space = tune.parse_space(["lr=log:1e-4:3e-3", "batch_size=16,32", "dropout=0:0.2",
                              "n_layers=1:3"], "baseline", {})
    assert space["lr"] == tune.Param("lr", "float", 1e-4, 3e-3, log=True)
    assert space["batch_size"] == tune.Param("batch_size", "categorical", choices=(16, 32))
    assert space["dropout"] == tune.Param("dropout", "float", 0.0, 0.2)
    assert space["n_layers"] == tune.Param("n_layers", "int", 1, 3)
    assert space["lr"].spec() == "log:0.0001:0.003"


@pytest.mark.parametrize("item, facts", [
    ("depth=1:2", ["unknown config key 'depth'", "valid keys"]),
    ("lr=1e-3", ["expected LOW:HIGH"]),
    ("lr=1:2:3", ["expected LOW:HIGH"]),
    ("lr=abc:1", ["lr='abc'", "expected float"]),
    ("lr=3e-3:1e-4", ["low 0.003 must be below high 0.0001"]),
    ("lr=log:0:1e-3", ["log range must be above 0"]),
    ("dropout=0:1.5", ["dropout=1.5", "[0, 1)"]),
    ("n_heads=3,5", ["embed_dim=128", "divisible by n_heads=3"]),
    ("batch_size=16,16", ["given twice"]),
    ("activation=0:1", ["numeric field"]),
    ("lr=", ["expected key=log:LOW:HIGH"]),
])
def test_space_refuses_in_one_line(item, facts):
    with pytest.raises(tune.TuneError) as e:
        tune.parse_space([item], "baseline", {})
    assert "\n" not in str(e.value) and item.partition("=")[0] in str(e.value)
    for fact in facts:
        assert fact in str(e.value)


def test_space_refuses_a_key_the_base_or_set_fixes():
    with pytest.raises(tune.TuneError, match="experiment lr_1e-3 sets lr itself"):
        tune.parse_space(["lr=log:1e-4:1e-2"], "lr_1e-3", {})
    with pytest.raises(tune.TuneError, match="also given by --set"):
        tune.parse_space(["lr=log:1e-4:1e-2"], "baseline", {"lr": 1e-3})
    with pytest.raises(tune.TuneError, match="given twice"):
        tune.parse_space(["lr=log:1e-4:1e-2", "lr=1e-4:1e-3"], "baseline", {})


def fake(number, state, **user_attrs):
    return types.SimpleNamespace(number=number, state=state, user_attrs=user_attrs)


def test_budget_counts_finished_and_running_and_orders_concurrent_askers():
    trials = [fake(0, COMPLETE), fake(1, PRUNED), fake(2, FAIL),  # 2: a dead worker's, retried
              fake(3, FAIL, failed="embed_dim=..."), fake(4, RUNNING), fake(5, RUNNING)]
    assert [tune.counts(t) for t in trials] == [True, True, False, True, True, True]
    # trials 4 and 5 asked at once for the budget's last place: the lower number runs
    assert not tune.surplus(trials, 4, n_trials=4)
    assert tune.surplus(trials, 5, n_trials=4)
    assert not tune.surplus(trials, 5, n_trials=5)


# --- bad input on the command line: one line, exit 2, nothing trained -------

@pytest.mark.parametrize("args, facts", [
    (["--space", "depth=1:2"], ["unknown config key 'depth'"]),
    (["--space", "lr=log:0:1"], ["log range must be above 0"]),
    (["--space", "lr=log:1e-4:1e-2", "--trials", "0"], ["--trials 0", "positive integer"]),
    (["--space", "lr=log:1e-4:1e-2", "--storage", "not a url"], ["not a database URL"]),
    (["--space", "lr=log:1e-4:1e-2", "--storage", "postgresql://nobody@127.0.0.1:9/none"],
     ["--storage postgresql://nobody@127.0.0.1:9/none: cannot open it"]),
    (["--space", "lr=log:1e-4:1e-2", "--storage", "journal:/no/such/folder/j.log"],
     ["folder /no/such/folder does not exist"]),
    (["--space", "lr=log:1e-4:1e-2", "--enqueue", "lr=-1"], ["--enqueue 'lr=-1'", "lr=-1.0"]),
    ([], ["no --space given"]),
])
def test_cli_refuses_bad_input(tmp_path, capsys, args, facts):
    out = tmp_path / "out"
    assert load_script("tune").main([*args, "--out", str(out), *SETS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tune.py: error: ") and "\n" not in err, err
    for fact in facts:
        assert fact in err
    assert not (out / tune.TRIALS).exists()


def test_cli_refuses_a_study_with_another_space(tmp_path, capsys):
    out = tmp_path / "out"
    storage = tune.open_storage(None, out)
    tune.open_study(storage, "tune", {"base": "baseline", "overrides": TINY, "max_steps": None,
                                      "space": {"lr": "log:0.0001:0.01"}}, None, None)
    assert load_script("tune").main(["--space", "lr=log:1e-4:1e-1", "--out", str(out), *SETS]) == 2
    err = capsys.readouterr().err.strip()
    assert "--study tune: exists with another space" in err and "\n" not in err
    assert not (out / tune.TRIALS).exists()


# --- studies in subprocesses -------------------------------------------------

@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    import random

    rng = random.Random(0)
    words = "the a cat dog ran over hill quick brown fox jumps lazy river stone tree".split()
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40))
                                for _ in range(300)))
    return path


def args_for(out, data, *extra, steps=6):
    return ["--space", "lr=log:1e-4:1e-2", "--data", str(data), "--text-docs", "block",
            "--out", str(out), "--max-steps", str(steps), *SETS, *map(str, extra)]


def tune_cmd(*args):
    r = run_script("tune.py", *args, devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def finished(study):
    return [t for t in study.get_trials() if tune.counts(t) and t.state != RUNNING]


@pytest.mark.slow
def test_study_prunes_a_hopeless_trial_and_its_best_command_reproduces(tmp_path, text_data):
    out = tmp_path / "study"
    tune_cmd(*args_for(out, text_data, "--trials", 2, "--prune-after", 1))
    # the same command continues the study; lr=100 diverges: pruned at its first evaluation
    r = tune_cmd(*args_for(out, text_data, "--trials", 3, "--prune-after", 1,
                           "--enqueue", "lr=100"))
    rows = read_rows(out / "tune_trials.csv")
    assert [row["number"] for row in rows] == ["0", "1", "2"]
    hopeless = rows[2]
    assert hopeless["params"] == "lr=100.0" and hopeless["state"] == "PRUNED"
    assert hopeless["pruned_at"] == str(TINY["eval_every"])
    assert int(hopeless["steps"]) < 6  # it stopped at the block after that evaluation
    assert (out / "trials" / "2" / "metrics_baseline.csv").exists()  # its folder keeps them
    assert list((out / "trials" / "2" / "checkpoints" / "baseline").iterdir())
    for name in ("history", "intermediate", "slice", "timeline"):
        assert (out / f"tune_{name}.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Hyperparameter search" in report and "PRUNED" in report
    assert "best trial again" in r.stderr
    # the best command, run as printed (into another folder), gives the best value again
    done = [row for row in rows if row["state"] == "COMPLETE"]
    best = min(done, key=lambda row: float(row["value"]))
    cmd = shlex.split((out / "tune_best_command.txt").read_text())
    assert cmd[:2] == ["python", "scripts/run.py"] and cmd[-2] == "--out"
    again = tmp_path / "again"
    rr = run_script("run.py", *cmd[2:-1], str(again), devices=2)
    assert rr.returncode == 0, rr.stderr[-3000:]
    (result,) = read_rows(again / "results_table.csv")
    assert float(result["val_loss"]) == pytest.approx(float(best["value"]), abs=1e-6)


def load_study(storage):
    if storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(storage[len("journal:"):]))
    return optuna.load_study(study_name="tune", storage=storage)


def check_shared(study, out, n):
    """Exactly n trials finished, each trained once in its own folder, two of them at once."""
    done = finished(study)
    assert len(done) == n, [(t.number, t.state) for t in study.get_trials()]
    assert not [t for t in study.get_trials() if t.state == RUNNING]
    folders = sorted(p.name for p in (out / "trials").iterdir())
    assert folders == sorted(str(t.number) for t in done)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in done)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials ran at once"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_study(tmp_path, text_data, kind):
    out = tmp_path / "study"
    storage = (f"sqlite:///{out}/study.db" if kind == "sqlite"
               else f"journal:{tmp_path}/journal.log")
    extra = [] if kind == "sqlite" else ["--storage", storage]
    tune_cmd(*args_for(out, text_data, "--trials", 4, "--devices", "0,1", *extra))
    check_shared(load_study(storage), out, 4)


def mid_trial(args, number):
    """A worker started on args, once trial `number` has reported two evaluations to the study
    (the metrics files are flushed only at checkpoints: the storage is the live view)."""
    p = start_script("tune.py", *args, devices=2, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    db = pathlib.Path(args[args.index("--out") + 1]) / "study.db"
    deadline = time.monotonic() + 300
    while True:
        assert p.poll() is None and time.monotonic() < deadline, f"trial {number} never went"
        time.sleep(0.2)
        if not (db.parent / "trials" / str(number)).exists():  # the study's tables are made
            continue
        with contextlib.suppress(KeyError, optuna.exceptions.OptunaError, OSError,
                                 sqlalchemy.exc.OperationalError):  # a write in progress
            trials = load_study(f"sqlite:///{db}").get_trials()
            if len(trials) > number and len(trials[number].intermediate_values) >= 2:
                return p


@pytest.mark.slow
def test_a_stopped_and_a_killed_worker_lose_no_trial(tmp_path, text_data):
    """Ctrl-C: the trial stops at its next block, FAIL and queued again; kill -9: its heartbeat
    goes quiet and the next worker fails it and queues it again; the study still ends with 2."""
    out = tmp_path / "study"
    args = args_for(out, text_data, "--trials", 2, "--heartbeat", 1, steps=40)
    p = mid_trial(args, 0)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=300) == 130
    first, queued = load_study(f"sqlite:///{out}/study.db").get_trials()
    assert first.state == FAIL and first.user_attrs["interrupted"].startswith("stopped at step")
    assert queued.state == WAITING and queued.params == first.params
    p = mid_trial(args, 1)  # the queued trial, run again
    p.send_signal(signal.SIGKILL)
    p.wait()
    tune_cmd(*args)  # the same command again
    study = load_study(f"sqlite:///{out}/study.db")
    trials = study.get_trials()
    a = trials[1].user_attrs  # killed: nothing of how it ended, nor its original's marks
    assert trials[1].state == FAIL and not (a.get("failed") or a["interrupted"] or a["steps"])
    retry = [t for t in trials if t.system_attrs.get("retry_history") == [0, 1]]
    assert len(retry) == 1 and retry[0].params == first.params
    assert len(finished(study)) == 2 and retry[0].number in [t.number for t in finished(study)]


def postgres_bin() -> pathlib.Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob(
        "/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    return pathlib.Path(found).parent if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server of the machine's own installation, in a temporary folder, on a unix
    socket there; run as the postgres user where the tests run as root (it refuses root)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb) on this machine: apt-get install postgresql")
    as_user = []
    base = pathlib.Path(tempfile.mkdtemp(prefix="minigpt-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def pg(*cmd):
        subprocess.run([*as_user, str(bin_dir / cmd[0]), *cmd[1:]], check=True,
                       capture_output=True, timeout=120)

    data = base / "data"
    pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    pg("pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "-o",
       f"-k {base} -c listen_addresses='' -F", "start")
    try:
        yield f"postgresql://postgres@/postgres?host={base}"
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path, text_data, postgres):
    out = tmp_path / "study"
    tune_cmd(*args_for(out, text_data, "--trials", 3, "--devices", "0,1", "--storage", postgres))
    check_shared(load_study(postgres), out, 3)


def test_a_combination_that_fails_together_fails_its_trial_and_the_study_goes_on(tmp_path):
    """embed_dim=20 and n_heads=8 pass one by one, not together: that trial FAILs with the
    reason (before any training), and counts toward the study's total."""
    space = tune.parse_space(["embed_dim=16,20", "n_heads=4,8"], "baseline", {})
    study = optuna.create_study()
    study.enqueue_trial({"embed_dim": 20, "n_heads": 8})
    job = tune.Job("baseline", {}, space, tmp_path)
    assert tune.work(study, job, 1, tune.worker.threading.Event(), log=lambda s: None) == 1
    (trial,) = study.get_trials()
    assert trial.state == FAIL and "embed_dim=20: must be divisible by n_heads=8" in \
        trial.user_attrs["failed"]
    assert tune.counts(trial) and not (tmp_path / tune.TRIALS).exists()


def test_a_journal_trial_without_heartbeats_is_failed_and_queued_again(tmp_path):
    storage = tune.open_storage(f"journal:{tmp_path}/j.log", tmp_path, heartbeat=1)
    study = optuna.create_study(storage=storage)
    with tune.study.quiet():
        trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    storage.record_heartbeat(trial._trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == []  # alive
    storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time() - 10)  # gone quiet
    with tune.study.quiet():
        optuna.storages.fail_stale_trials(study)
    first, retry = study.get_trials()
    assert first.state == FAIL and retry.state == WAITING
    assert retry.params == first.params and retry.system_attrs["failed_trial"] == 0


def test_the_prune_writer_reports_evaluations_and_stops_a_worse_trial():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(1.0, 2)
    study.tell(first, 1.0)
    good, bad = (tune.PruneWriter(study.ask(), tune.worker.threading.Event()) for _ in "ab")
    good.write_scalars(2, {"val/loss": 0.5})  # better than the median: goes on
    bad.write_scalars(1, {"loss": 9.0})  # a training row: not an evaluation
    assert not bad.trial.storage.get_trial(bad.trial._trial_id).intermediate_values
    bad.write_scalars(2, {"val/loss": float("nan")})  # diverged: reported as inf, pruned
    assert not good.stop.is_set() and good.pruned_at is None
    assert bad.stop.is_set() and bad.pruned_at == 2
    assert bad.trial.storage.get_trial(bad.trial._trial_id).intermediate_values == {
        2: float("inf")}


def test_outputs_of_a_study_without_training(tmp_path):
    """The table, the plots (a contour and importances with two parameters), the report section
    and the best command, from a study of made-up trials."""
    from minigpt_jax.tune import outputs

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("setup", {"base": "baseline", "overrides": {"n_layers": 1},
                                  "max_steps": 6, "space": {"lr": "log:0.0001:0.01",
                                                            "dropout": "0.0:0.2"}})
    for i in range(12):
        t = study.ask()
        lr = t.suggest_float("lr", 1e-4, 1e-2, log=True)
        dropout = t.suggest_float("dropout", 0, 0.2)
        t.report(5.0 + dropout, 2)
        if i == 3:
            t.set_user_attr("pruned_at", 2)
            study.tell(t, state=PRUNED)
        else:
            study.tell(t, 5.0 + dropout - lr)
    paths = outputs.write_outputs(tmp_path, study, 12, ["--data", "d.txt"])
    rows = read_rows(tmp_path / "tune_trials.csv")
    assert len(rows) == 12 and rows[3]["state"] == "PRUNED" and rows[3]["pruned_at"] == "2"
    best = study.best_trial
    command = (tmp_path / "tune_best_command.txt").read_text().strip()
    assert command == shlex.join(
        ["python", "scripts/run.py", "--only", "baseline",
         "--set", f"dropout={best.params['dropout']!r}",
         "--set", f"lr={best.params['lr']!r}",
         "--set", "n_layers=1", "--max-steps", "6", "--data", "d.txt",
         "--out", str(tmp_path / "best")])
    for name in ("history", "intermediate", "slice", "contour", "importances"):
        assert tmp_path / f"tune_{name}.png" in paths
    report = (tmp_path / "report.md").read_text()
    assert f"Best: trial {best.number}, final validation loss {best.value:.4f}" in report
    assert "12 trials asked, 11 complete, 1 pruned" in report
