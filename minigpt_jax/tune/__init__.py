"""Hyperparameter search with Optuna: the space (space.py), the study and its storage
(study.py), the worker that runs its trials (worker.py), the study's outputs (outputs.py).

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

from minigpt_jax.tune.space import Param, TuneError, parse_enqueue, parse_param, parse_space
from minigpt_jax.tune.study import (
                                    PRUNERS,
                                    SAMPLERS,
                                    counts,
                                    make_pruner,
                                    make_sampler,
                                    open_storage,
                                    open_study,
                                    surplus,
)
from minigpt_jax.tune.worker import TRIALS, Job, PruneWriter, run_trial, work

__all__ = ["PRUNERS", "SAMPLERS", "TRIALS", "Job", "Param", "PruneWriter", "TuneError", "counts",
           "make_pruner", "make_sampler", "open_storage", "open_study", "parse_enqueue",
           "parse_param", "parse_space", "run_trial", "surplus", "work"]
