"""Runs grouped into experiments over seeds, and what the numbers support about them.

- A run belongs to the experiment `Result.experiment` names ("" means its own
  name: one seed); its seed is `config.seed`. Seed i of every experiment sees the
  same data order and, with a fixed data seed, the same held-out segments, so
  experiments are compared seed by seed (`stats.paired`) with a reference: the
  one the caller names, else `baseline` where it ran, else the first experiment.
- The final validation loss is the end-of-run held-out evaluation
  (`Result.final_eval`, else the last evaluation); the final train loss is the
  mean of the last smoothing window of the plotted curve (`final_train`).
- Two single runs are compared on held-out segments: paired per segment where
  both evaluated the same ones (`same_segments`), else unpaired.
- An lr sweep is three or more runs of one shape (configs equal but for lr and
  seed) at distinct learning rates: its LR sensitivity (`stats.lr_sensitivity`)
  is computed per seed and summarised over seeds. The loss at initialisation is
  the first step's training loss (the loss of the initial parameters on the first
  batch: no evaluation precedes the first step).
Pure: numbers from Results, no files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from minigpt_jax import data, plots, stats

MIN_LRS = 3  # learning rates that make a sweep (two are a comparison, which `compare` gives)


def experiment(r) -> str:
    """The experiment a run belongs to."""
    return getattr(r, "experiment", "") or r.name


def groups(results: Sequence) -> dict[str, list]:
    """Experiment -> its runs, in the order experiments first appear, runs sorted by seed."""
    out: dict[str, list] = {}
    for r in results:
        out.setdefault(experiment(r), []).append(r)
    return {k: sorted(v, key=lambda r: r.config.seed) for k, v in out.items()}


def several(results: Sequence) -> bool:
    """Whether any experiment ran more than one seed."""
    return any(len(rs) > 1 for rs in groups(results).values())


def curves(results: Sequence) -> dict[str, list[tuple]]:
    """Experiment -> [(rows, val_rows) of each seed with rows]: what `plots.plot_comparison`
    and `plots.plot_seeds` draw (one seed: as a single run)."""
    out = {e: [(r.rows, r.val_rows) for r in rs if r.rows] for e, rs in groups(results).items()}
    return {e: c for e, c in out.items() if c}


def final_val(r) -> float | None:
    if r.final_eval is not None:
        return r.final_eval.loss
    return r.val_rows[-1]["val_loss"] if r.val_rows else None


def final_train(rows: Sequence) -> float | None:
    """The mean of the last smoothing window: the end of the plotted curve, not one noisy
    batch; None without rows."""
    return float(plots.smooth([r["loss"] for r in rows])[-1]) if rows else None


def reference(results: Sequence, name: str | None = None) -> str | None:
    """The experiment every other is compared with: `name`, else `baseline` where it ran,
    else the first; None without results."""
    names = list(groups(results))
    if name is not None:
        if name not in names:
            raise ValueError(f"reference experiment {name!r} is not in the run; ran: "
                             + ", ".join(names))
        return name
    return "baseline" if "baseline" in names else (names[0] if names else None)


def _by_seed(runs: Sequence, value) -> dict[int, float]:
    out = {}
    for r in runs:
        v = value(r)
        out[r.config.seed] = math.nan if v is None else float(v)
    return out


def compare(runs: Sequence, reference_runs: Sequence, value=final_val) -> stats.Paired:
    """value(run) - value(reference's run) seed by seed, over the seeds both ran."""
    a, b = _by_seed(runs, value), _by_seed(reference_runs, value)
    common = sorted(set(a) & set(b))
    return stats.paired([a[s] for s in common], [b[s] for s in common])


@dataclasses.dataclass(frozen=True)
class ExperimentStats:
    name: str
    runs: tuple  # its runs, by seed
    val: stats.Summary  # final validation loss over seeds
    train: stats.Summary  # smoothed final train loss over seeds
    vs_reference: stats.Paired | None  # None for the reference itself

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r.config.seed for r in self.runs)


def experiment_stats(results: Sequence, reference_name: str | None = None
                     ) -> list[ExperimentStats]:
    """One entry per experiment: its spread over seeds and its paired difference from the
    reference (`reference`)."""
    by = groups(results)
    ref = reference(results, reference_name)
    out = []
    for name, runs in by.items():
        val = stats.summary([final_val(r) for r in runs])
        train = stats.summary([final_train(r.rows) for r in runs])
        vs = None if name == ref else compare(runs, by[ref])
        out.append(ExperimentStats(name, tuple(runs), val, train, vs))
    return out


def same_segments(a, b) -> bool:
    """Whether runs a and b evaluated the same held-out segments in the same order at the end:
    the same held-out set (`data.prepare_key`, which holds the data seed that also draws the
    final sample), the same final sample (eval_final_batches x batch_size rows, or every
    segment for both), and equal per-segment label counts."""
    ea, eb = a.final_eval, b.final_eval
    if ea is None or eb is None or ea.per_segment is None or eb.per_segment is None:
        return False
    if data.prepare_key(a.config) != data.prepare_key(b.config):
        return False

    def rows(r, e):  # rows asked for, None for all; more than evaluated means all were
        n = r.config.eval_final_batches * r.config.batch_size
        return None if n == 0 or n > e.segments else n

    return (rows(a, ea) == rows(b, eb) and ea.per_segment.shape == eb.per_segment.shape
            and np.array_equal(ea.per_segment[:, 1], eb.per_segment[:, 1]))


def heldout(a, b) -> tuple[stats.Paired, bool]:
    """Final validation loss of run a minus run b over held-out segments, and whether it is
    paired (`same_segments`) or from two unpaired standard errors."""
    ea, eb = a.final_eval, b.final_eval
    if ea is None or eb is None:
        va, vb = final_val(a), final_val(b)
        diff = math.nan if va is None or vb is None else va - vb
        return stats.Paired(0, diff, math.nan, math.nan, math.nan,
                            "no standard error to test it against"), False
    if not same_segments(a, b):
        return stats.unpaired(ea.loss, ea.stderr, eb.loss, eb.stderr), False
    return stats.segment_paired(ea.per_segment[:, 0], eb.per_segment[:, 0],
                                ea.per_segment[:, 1]), True


# --- LR sensitivity --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sensitivity:
    experiments: tuple[str, ...]  # the sweep's experiments, by lr
    lrs: tuple[float, ...]
    per_seed: dict  # seed -> LR sensitivity of that seed's sweep
    summary: stats.Summary  # over seeds
    best_lr: float  # lowest mean final validation loss over seeds


def _shape_key(c) -> tuple:
    d = c.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in d.items() if k not in ("lr", "seed")))


def lr_sweeps(results: Sequence) -> list[Sensitivity]:
    """The LR sensitivity of every shape swept over MIN_LRS or more learning rates; seeds
    that lack one of the shape's lrs (or its first step) are left out."""
    shapes: dict[tuple, list] = {}
    for r in results:
        shapes.setdefault(_shape_key(r.config), []).append(r)
    out = []
    for runs in shapes.values():
        lrs = sorted({r.config.lr for r in runs})
        if len(lrs) < MIN_LRS:
            continue
        per_seed = {}
        for seed in sorted({r.config.seed for r in runs}):
            at = {r.config.lr: r for r in runs if r.config.seed == seed and r.rows}
            if sorted(at) == lrs:
                per_seed[seed] = stats.lr_sensitivity([at[lr].rows[0]["loss"] for lr in lrs],
                                                      [final_val(at[lr]) for lr in lrs])
        if not per_seed:
            continue
        means = np.array([stats.summary([_nan(final_val(r)) for r in runs
                                         if r.config.lr == lr]).mean for lr in lrs])
        best = lrs[int(np.nanargmin(means))] if np.isfinite(means).any() else math.nan
        names = tuple(dict.fromkeys(experiment(r) for lr in lrs for r in runs
                                    if r.config.lr == lr))
        out.append(Sensitivity(names, tuple(lrs), per_seed,
                               stats.summary(list(per_seed.values())), best))
    return out


def _nan(v) -> float:
    return math.nan if v is None or not math.isfinite(v) else float(v)
