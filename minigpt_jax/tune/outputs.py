"""A study's outputs in its folder: the trials table, Optuna's matplotlib plots, the report.md
section, and the best trial as a ready run.py command.

- tune_trials.{txt,csv}: one row per trial (number, state, parameters, value, steps, pruned
  at, wall time, note); the CSV holds raw numbers, the TXT aligned cells (tables.cell).
- tune_*.png: optuna.visualization.matplotlib's optimization history, intermediate values
  (pruned trials visible), timeline (the workers side by side), slice, a contour for two or
  more parameters and the parameter importances (PED-ANOVA, which needs no scikit-learn)
  when at least two parameters and enough finished trials allow it.
"""

from __future__ import annotations

import math
import pathlib
import shlex
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from minigpt_jax import report, tables
from minigpt_jax.files import atomic_write_bytes

TRIAL_COLUMNS = (  # field (CSV header), TXT header, kind (tables.cell)
    ("number", "trial", "int"),
    ("state", "state", "text"),
    ("params", "parameters", "text"),
    ("value", "final val loss", "loss"),
    ("steps", "steps", "int"),
    ("pruned_at", "pruned at", "int"),
    ("wall_seconds", "wall s", "seconds"),
    ("note", "note", "text"),
)


def trial_rows(trials: Sequence) -> list[dict]:
    """Optuna's frozen trials -> one row each (the value of a pruned trial is its last
    reported evaluation, Optuna's rule)."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        wall = ((t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start else None)
        a = t.user_attrs
        note = a.get("failed") or (f"{a['interrupted']}; queued again" if a.get("interrupted")
                                   else "")
        if t.state.name == "PRUNED":
            note = "value: the last evaluation's loss"
        if "failed_trial" in t.system_attrs:
            note = "; ".join(filter(None, [f"retry of trial {t.system_attrs['failed_trial']}",
                                           note]))
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                     "value": t.value, "steps": a.get("steps"), "pruned_at": a.get("pruned_at"),
                     "wall_seconds": wall, "note": note})
    return rows


def trials_txt(rows: Sequence[Mapping]) -> str:
    """Fixed-width trials table: text left-aligned, numbers right-aligned, '-' where missing."""
    table = [[h for _, h, _ in TRIAL_COLUMNS]]
    table += [[tables.cell(r[f], kind) for f, _, kind in TRIAL_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(TRIAL_COLUMNS))]

    def line(cells):
        return "  ".join(c.ljust(w) if kind == "text" else c.rjust(w)
                         for c, w, (_, _, kind) in zip(cells, widths, TRIAL_COLUMNS)).rstrip()

    return "\n".join([line(table[0]), "-" * (sum(widths) + 2 * len(widths) - 2),
                      *map(line, table[1:])]) + "\n"


def write_trials_table(out: pathlib.Path, rows: Sequence[Mapping]) -> list[pathlib.Path]:
    txt, csv_path = out / "tune_trials.txt", out / "tune_trials.csv"
    atomic_write_bytes(txt, trials_txt(rows).encode())
    tables.write_csv(csv_path, [{f: tables.cell(r[f], k, for_csv=True) for f, _, k in TRIAL_COLUMNS}
                                for r in rows], tuple(f for f, _, _ in TRIAL_COLUMNS))
    return [txt, csv_path]


def best_command(params: Mapping[str, Any], base: str, overrides: Mapping[str, Any],
                 max_steps: int | None, data: Sequence[str], out: pathlib.Path) -> str:
    """The run.py command that trains the best trial again (same config, data and length:
    the same final validation loss). data: run.py's data flags (--data PATH ...)."""
    args = ["python", "scripts/run.py", "--only", base]
    for k, v in sorted({**overrides, **params}.items()):
        args += ["--set", f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"]
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    args += list(data)
    return shlex.join(args + ["--out", str(out / "best")])


def write_plots(out: pathlib.Path, study, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Optuna's matplotlib plots as tune_*.png -> (files written, one line per plot left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {"history": lambda: ovm.plot_optimization_history(study),
             "intermediate": lambda: ovm.plot_intermediate_values(study),
             "timeline": lambda: ovm.plot_timeline(study),
             "slice": lambda: ovm.plot_slice(study, params=list(names))}
    if len(names) >= 2:
        plots["contour"] = lambda: ovm.plot_contour(study, params=list(names)[:2])
        plots["importances"] = lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    values = [v for t in study.get_trials(deepcopy=False) for v in
              [*t.intermediate_values.values(), *([t.value] if t.value is not None else [])]]
    values = [v for v in values if math.isfinite(v)]
    spread = bool(values) and min(values) > 0 and max(values) > 20 * min(values)
    written, skipped = [], []
    for name, draw in plots.items():
        if not finished:
            skipped.append(f"{name}: no finished trial yet")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials for it
            skipped.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        if name in ("history", "intermediate") and spread:
            first.set_yscale("log")  # a diverged trial would flatten every other one
        fig = first.figure
        fig.set_size_inches(max(6.4, fig.get_size_inches()[0]), 4.8)
        fig.savefig(out / f"tune_{name}.png", dpi=100, bbox_inches="tight")  # legends outside
        plt.close(fig)
        written.append(f"tune_{name}.png")
    return written, skipped


def section(study, rows: Sequence[Mapping], n_trials: int, command: str | None,
            plots: Sequence[str], skipped: Sequence[str], setup: Mapping[str, Any]) -> str:
    """The report.md section: the study's setting, its states, the best trial and its command,
    the plots, the table."""
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines = [f"Study `{study.study_name}`: {n_trials} trials asked, "
             + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ".",
             "Base experiment `{base}`, fixed settings {fixed}, space {space}; sampler {sampler},"
             " pruner {pruner}; the objective is the final evaluation's validation loss, minimised"
             " (docs/tuning.md).".format(
                 base=setup["base"],
                 fixed=", ".join(f"`{k}={v}`" for k, v in setup["overrides"].items()) or "none",
                 space=", ".join(f"`{k}={v}`" for k, v in setup["space"].items()),
                 sampler=setup.get("sampler", "?"), pruner=setup.get("pruner", "?")), ""]
    best = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if best:
        b = min(best, key=lambda r: r["value"])
        lines += [f"Best: trial {b['number']}, final validation loss {b['value']:.4f} with "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in b["params"].items()) + ". Train it again with:", "",
                  f"    {command}", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""] if plots else []
    lines += [f"Not drawn: {s}." for s in skipped] + ([""] if skipped else [])
    lines += ["Trials (tune_trials.txt, tune_trials.csv; each trial's run folder"
              " trials/<number>/):",
              "", "```", trials_txt(rows).rstrip(), "```"]
    return "\n".join(lines)


def write_outputs(out: pathlib.Path, study, n_trials: int, data: Sequence[str] = ()
                  ) -> list[pathlib.Path]:
    """The trials table, the plots, the report section and the best command, from the study as
    it is now -> the files written. data: run.py's data flags, for the best command."""
    setup = {**study.user_attrs["setup"], **study.user_attrs.get("search", {})}
    rows = trial_rows(study.get_trials(deepcopy=False))
    paths = write_trials_table(out, rows)
    plots, skipped = write_plots(out, study, list(setup["space"]))
    command = None
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if done:
        best = min(done, key=lambda r: r["value"])
        command = best_command(best["params"], setup["base"], setup["overrides"],
                               setup["max_steps"], data, out)
        atomic_write_bytes(out / "tune_best_command.txt", (command + "\n").encode())
        paths.append(out / "tune_best_command.txt")
    paths.append(report.write_section(out, "Hyperparameter search",
                                      section(study, rows, n_trials, command, plots, skipped,
                                              setup)))
    return paths + [out / p for p in plots]
