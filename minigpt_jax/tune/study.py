"""The study and where it lives: samplers, pruners, storages (SQLite, any RDB URL, a journal
file) with heartbeats, the study's record of its setting, and the trial budget that concurrent
workers share (docs/tuning.md, Storages)."""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from minigpt_jax.tune.space import TuneError

SAMPLERS = ("tpe", "qmc", "random")
PRUNERS = ("median", "hyperband", "none")


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
def quiet():
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
        with quiet():
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
        return bool(trial.user_attrs.get("failed"))
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def surplus(trials: Sequence, number: int, n_trials: int) -> bool:
    """Whether running trial `number` would pass the study's total: the trials that count,
    less those still running with a higher number (each worker decides by the same order, so
    two that asked at once do not both run the last trial)."""
    from optuna.trial import TrialState

    before = [t for t in trials if t.number != number and counts(t)
              and not (t.state == TrialState.RUNNING and t.number > number)]
    return len(before) >= n_trials


