"""The worker: one trial as one run (runner.run) pruned from its evaluations, and the loop
that runs trials until the study holds its total (docs/tuning.md, Pruners)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from minigpt_jax import config as cfg
from minigpt_jax import metrics
from minigpt_jax.tune.study import counts, quiet, surplus

TRIALS = "trials"  # <out>/trials/<number>/: one run folder per trial
MARKS = ("failed", "interrupted", "steps", "pruned_at")  # how a trial ended (its user attrs)


class PruneWriter(metrics.Writer):
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

    for key in MARKS:  # a retry carries its original's attrs (Optuna copies them): not its own
        if trial.user_attrs.get(key) is not None:
            trial.set_user_attr(key, None)
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
    with quiet():
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
        with quiet():
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
        with quiet():
            trial = study.ask()
        if surplus(study.get_trials(deepcopy=False), trial.number, n_trials):
            study._storage.set_trial_state_values(trial._trial_id,
                                                  optuna.trial.TrialState.WAITING)
            continue  # unrun, for a later --trials; wait above for the trials still running
        t = time.perf_counter()
        with get_heartbeat_thread(trial._trial_id, study._storage):
            state = run_trial(study, trial, job, stop)
        ran += 1
        log(f"tune: trial {trial.number} {state} in {time.perf_counter() - t:.1f} s")
    return ran
