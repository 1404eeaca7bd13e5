"""Hyperparameter search with Optuna: the space, the study, and the worker that runs its trials.

- A search space is `--space key=spec` over any Config field: `log:LOW:HIGH` (log-uniform),
  `LOW:HIGH` (uniform; integers for an int field), `V1,V2,...` (categorical). Each bound and
  value is checked against the base experiment's Config before anything runs (docs/tuning.md).
- Each trial is one ordinary run through `runner.run`, into `<out>/trials/<number>/`; its
  objective is the final validation loss (the bounded final evaluation, Result.final_eval).
- Pruning uses the evaluations the loop already makes: a metric writer reports each `val/loss`
  to the trial and, when the pruner says so, sets the run's stop event, so the run saves and
  stops at its next block boundary.
- The study lives in any storage Optuna takes (SQLite in the output folder by default,
  PostgreSQL or a journal file when shared). `--trials N` is the study's total: a worker asks
  for a trial only while fewer than N are finished or running, and gives back (to WAITING) one
  that another worker's earlier trial made surplus, so concurrent workers finish exactly N.
- Heartbeats (Optuna's, on RDB storages; trial system attrs on a journal): a trial whose worker
  died is failed by the next worker that looks and queued again with its parameters
  (RetryHeartbeatStaleTrialCallback). A worker that finds the budget taken waits for the
  trials still running, so a dead worker's trial is retried rather than lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from minigpt_jax import config as cfg

SAMPLERS = ("tpe", "qmc", "random")
PRUNERS = ("median", "hyperband", "none")
TRIALS = "trials"  # <out>/trials/<number>/: one run folder per trial


class TuneError(ValueError):
    """A study that cannot run as asked (a usage error); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched Config field: a range (low, high, log) or categorical choices."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def spec(self) -> str:
        """The space entry as the command line writes it (canonical, for the study's record)."""
        if self.kind == "categorical":
            return ",".join(map(str, self.choices))
        return ("log:" if self.log else "") + f"{self.low}:{self.high}"


def _config_of(base: str, overrides: Mapping[str, Any]) -> cfg.Config:
    return cfg.experiment_config(base, dict(overrides))


def _value(item: str, key: str, text: str):
    try:
        return cfg.parse_value(key, text)
    except cfg.ConfigError as e:
        raise TuneError(f"--space {item!r}: {e}") from None


def parse_param(item: str, base: str, overrides: Mapping[str, Any]) -> Param:
    """'lr=log:1e-4:3e-3' -> Param; TuneError naming the entry and what was expected."""
    key, sep, spec = (s.strip() for s in item.partition("="))
    if not sep or not key or not spec:
        raise TuneError(f"--space {item!r}: expected key=log:LOW:HIGH, key=LOW:HIGH or"
                        " key=V1,V2,..., e.g. --space lr=log:1e-4:3e-3")
    types = {f.name: f.type for f in dataclasses.fields(cfg.Config)}
    if key not in types:
        raise TuneError(f"--space {item!r}: unknown config key {key!r}; valid keys: "
                        + ", ".join(types))
    if key in cfg.EXPERIMENTS[base]:
        raise TuneError(f"--space {key}: experiment {base} sets {key} itself; expected a key it"
                        " leaves to the baseline")
    kind = types[key]
    if "," in spec:
        texts = [t.strip() for t in spec.split(",")]
        if not all(texts):
            raise TuneError(f"--space {item!r}: an empty value; expected V1,V2,...")
        choices = [_value(item, key, t) for t in texts]
        if len(set(choices)) < len(choices):
            raise TuneError(f"--space {item!r}: a value given twice; expected distinct values")
        param = Param(key, "categorical", choices=tuple(choices))
        values = choices
    else:
        log = spec.startswith("log:")
        parts = spec[4:].split(":") if log else spec.split(":")
        if len(parts) != 2 or kind == "str":
            what = "a numeric field" if kind == "str" else "LOW:HIGH or log:LOW:HIGH"
            raise TuneError(f"--space {item!r}: expected {what} (or V1,V2,... for choices)")
        low, high = (_value(item, key, p.strip()) for p in parts)
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise TuneError(f"--space {item!r}: low {low} must be below high {high}")
        if log and low <= 0:
            raise TuneError(f"--space {item!r}: a log range must be above 0; got low {low}")
        param = Param(key, kind, low, high, log)
        values = [low, high]
    for v in values:  # a range's ends, or each choice, must make a valid Config
        try:
            _config_of(base, {**overrides, key: v})
        except cfg.ConfigError as e:
            raise TuneError(f"--space {item!r}: {e}") from None
    return param


def parse_space(items: Sequence[str], base: str, overrides: Mapping[str, Any]) -> dict[str, Param]:
    """--space entries -> {field: Param}; TuneError on the first bad one."""
    if base not in cfg.EXPERIMENTS:
        raise TuneError(f"unknown experiment {base!r}; valid: {', '.join(cfg.EXPERIMENTS)}")
    if not items:
        raise TuneError("no --space given; expected at least one, e.g. --space lr=log:1e-4:3e-3")
    space: dict[str, Param] = {}
    for item in items:
        p = parse_param(item, base, overrides)
        if p.name in space:
            raise TuneError(f"--space {p.name} given twice; expected each key once")
        if p.name in overrides:
            raise TuneError(f"--space {p.name}: also given by --set; expected one of them")
        space[p.name] = p
    return space


def parse_enqueue(items: Sequence[str], space: Mapping[str, Param], base: str,
                  overrides: Mapping[str, Any]) -> list[dict]:
    """--enqueue 'lr=1e-3,dropout=0.1' -> [{'lr': 0.001, 'dropout': 0.1}]: points to try first.
    Every searched key must be given; each point must make a valid Config."""
    points = []
    for item in items:
        point = cfg.parse_overrides([p for p in item.split(",") if p.strip()])
        if set(point) != set(space):
            raise TuneError(f"--enqueue {item!r}: expected exactly the searched keys"
                            f" {', '.join(space)}")
        try:
            _config_of(base, {**overrides, **point})
        except cfg.ConfigError as e:
            raise TuneError(f"--enqueue {item!r}: {e}") from None
        points.append(point)
    return points


def make_sampler(name: str, seed: int):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        if name == "qmc":  # scrambled Sobol; its points follow the trial number across workers
            return optuna.samplers.QMCSampler(seed=seed, scramble=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise TuneError(f"--sampler {name!r}: expected one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, startup: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource="auto", max_resource="auto")
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TuneError(f"--pruner {name!r}: expected one of {', '.join(PRUNERS)}")


@contextlib.contextmanager
def _quiet():
    """Without Optuna's notes on features it calls experimental (heartbeat, stale trials) or on
    heartbeats outside Study.optimize: this worker is the loop that keeps them."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        yield


def open_storage(url: str | None, out: pathlib.Path, heartbeat: int = 60):
    """--storage URL (None: SQLite <out>/study.db; journal:PATH: a journal file) -> storage;
    TuneError (one line) when it is malformed, its driver is missing or it cannot be reached."""
    import optuna

    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith("journal:"):
        path = pathlib.Path(url[len("journal:"):]).expanduser()
        if not path.parent.is_dir():
            raise TuneError(f"--storage {url}: folder {path.parent} does not exist; expected"
                            " journal:PATH in an existing (shared) folder")
        from optuna.storages.journal import JournalFileBackend

        try:
            return _journal_with_heartbeat()(JournalFileBackend(str(path)), heartbeat)
        except OSError as e:
            raise TuneError(f"--storage {url}: {e.strerror}") from None
    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise TuneError(f"--storage {url!r}: not a database URL; expected e.g."
                        " sqlite:///study.db, postgresql://user@host/db or journal:PATH") from None
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with _quiet():
            return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    except ImportError as e:  # Optuna's message hides the module: its cause names it
        raise TuneError(f"--storage {url}: its driver is not installed"
                        f" ({e.__cause__ or e})") from None
    except Exception as e:  # sqlalchemy's OperationalError and the drivers' own: unreachable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneError(f"--storage {url}: cannot open it ({first})") from None


def _journal_with_heartbeat():
    """Optuna's JournalStorage with heartbeats kept as trial system attrs (Optuna gives only its
    RDB storage heartbeats), so a journal study retries a dead worker's trial as RDB ones do."""
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat

    class JournalHeartbeatStorage(optuna.storages.JournalStorage, BaseHeartbeat):
        def __init__(self, backend, interval: int):
            super().__init__(backend)
            self.interval = interval

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now, running = time.time(), (optuna.trial.TrialState.RUNNING,)
            return [t._trial_id for t in self.get_all_trials(study_id, False, states=running)
                    if now - t.system_attrs.get("heartbeat", t.datetime_start.timestamp())
                    > 2 * self.interval]

        def get_heartbeat_interval(self) -> int:
            return self.interval

        def get_heartbeat_stale_trial_callback(self):
            return optuna.storages.RetryHeartbeatStaleTrialCallback()

    return JournalHeartbeatStorage


def open_study(storage, name: str, record: Mapping[str, Any], sampler, pruner):
    """The study `name` in storage, created if new; TuneError when it exists with another
    search space, base, fixed settings or direction (`record`, kept in its user attrs)."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise TuneError(f"--study {name}: exists and maximizes; expected a study that minimizes"
                        " the validation loss (another --study name)")
    kept = study.user_attrs.get("setup")
    if kept is None:
        study.set_user_attr("setup", dict(record))
    elif kept != json.loads(json.dumps(dict(record))):
        diff = [k for k in record if kept.get(k) != json.loads(json.dumps(record[k]))]
        raise TuneError(f"--study {name}: exists with another {', '.join(diff)}"
                        f" ({', '.join(f'{k}={kept.get(k)}' for k in diff)}); expected the same"
                        " or another --study name")
    return study


# --- the trial budget --------------------------------------------------------

def counts(trial) -> bool:
    """Whether a trial counts toward --trials: finished, running, or failed by its own
    configuration or training (a worker that died or was stopped is retried instead)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return "failed" in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def surplus(trials: Sequence, number: int, n_trials: int) -> bool:
    """Whether running trial `number` would pass the study's total: the trials that count,
    less those still running with a higher number (each worker decides by the same order, so
    two that asked at once do not both run the last trial)."""
    from optuna.trial import TrialState

    before = [t for t in trials if t.number != number and counts(t)
              and not (t.state == TrialState.RUNNING and t.number > number)]
    return len(before) >= n_trials


# --- one trial ---------------------------------------------------------------

class PruneWriter:
    """A metric writer that reports each periodic `val/loss` to the trial and, when the pruner
    says so, sets `stop`: the run saves and stops at its next block boundary."""

    def __init__(self, trial, stop: threading.Event):
        self.trial, self.stop, self.pruned_at = trial, stop, None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if "val/loss" not in scalars or self.pruned_at is not None:
            return
        value = float(scalars["val/loss"])
        self.trial.report(value if math.isfinite(value) else float("inf"), step)
        if self.trial.should_prune():
            self.pruned_at = step
            self.stop.set()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Either(threading.Event):
    """Set when it is, or when `parent` is: one trial's stop that the user's stop also sets."""

    def __init__(self, parent: threading.Event):
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or self.parent.is_set()


@dataclasses.dataclass(frozen=True)
class Job:
    """What every trial shares: the base experiment, the fixed settings, runner.run's
    keyword arguments (data, devices, gpu_index, on_result...)."""

    base: str
    overrides: dict
    space: dict  # field -> Param
    out: pathlib.Path
    max_steps: int | None = None
    run_kwargs: dict = dataclasses.field(default_factory=dict)
    export: Callable | None = None  # export(folder, result) as each trial finishes (.pt)


def run_trial(study, trial, job: Job, user_stop: threading.Event) -> str:
    """Train one trial and tell the study how it ended -> its state's name."""
    import optuna

    from minigpt_jax import runner

    params = {name: p.suggest(trial) for name, p in job.space.items()}
    folder = job.out / TRIALS / str(trial.number)
    trial.set_user_attr("folder", str(folder))
    stop = _Either(user_stop)  # the pruner's stop, or the user's (a Ctrl-C)
    writer = PruneWriter(trial, stop)
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    kwargs = dict(job.run_kwargs)
    if job.export is not None:
        kwargs["on_result"] = lambda r: job.export(folder, r)
    try:
        (r,) = runner.run([job.base], out=folder, overrides={**job.overrides, **params},
                          max_steps=job.max_steps, writers=lambda e: [writer], stop=stop,
                          override_text=text, **kwargs)
    except cfg.ConfigError as e:  # this point of the space makes no valid run: the study goes on
        trial.set_user_attr("failed", str(e))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "FAIL"
    except BaseException as e:  # bad input (data, folder) or a bug: queued again, then raised
        _requeue(study, trial, f"{type(e).__name__}: {e}")
        raise
    trial.set_user_attr("steps", r.steps)
    if writer.pruned_at is not None and r.status.startswith("stopped"):
        trial.set_user_attr("pruned_at", writer.pruned_at)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return "PRUNED"
    if r.status.startswith("stopped"):  # the user's stop: failed here, queued again
        _requeue(study, trial, r.status)
        return "INTERRUPTED"
    if r.status != "ok" or r.final_eval is None or not math.isfinite(r.final_eval.loss):
        why = (r.status if r.status != "ok" else "no final evaluation (no held-out segments)"
               if r.final_eval is None else f"final validation loss {r.final_eval.loss}")
        trial.set_user_attr("failed", why)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "FAIL"
    study.tell(trial, r.final_eval.loss)
    return "COMPLETE"


def _requeue(study, trial, why: str) -> None:
    """Fail a trial that did not end by itself (a stop, bad input) and queue its parameters
    again, as Optuna's heartbeat does for a worker that died: it does not count."""
    import optuna

    trial.set_user_attr("interrupted", " ".join(why.split())[:200])
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    with _quiet():
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study._storage.get_trial(
            trial._trial_id))


def work(study, job: Job, n_trials: int, stop: threading.Event,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> int:
    """Run trials of the study until it holds n_trials that count and none runs (or a stop) ->
    the trials run here. Heartbeats mark this worker's trial alive; stale ones are retried."""
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread

    beat = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
    ran, said = 0, False
    while not stop.is_set():
        with _quiet():
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if sum(counts(t) for t in trials) >= n_trials:
            running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            if not running or not beat:  # without heartbeats a dead worker's trial stays RUNNING
                break
            if not said:  # the last trials run elsewhere: wait, and take any that fail stale
                log(f"tune: waiting for trial(s) {', '.join(map(str, running))} to finish")
                said = True
            stop.wait(beat)
            continue
        with _quiet():
            trial = study.ask()
        if surplus(study.get_trials(deepcopy=False), trial.number, n_trials):
            study._storage.set_trial_state_values(trial._trial_id,
                                                  optuna.trial.TrialState.WAITING)
            break
        t = time.perf_counter()
        with get_heartbeat_thread(trial._trial_id, study._storage):
            state = run_trial(study, trial, job, stop)
        ran += 1
        log(f"tune: trial {trial.number} {state} in {time.perf_counter() - t:.1f} s")
    return ran
