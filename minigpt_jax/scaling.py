"""A scaling-law study: a grid of shapes and token budgets, trained through `runner.run`, then
the law fitted, checked and drawn (docs/scaling.md).

    from minigpt_jax import scaling
    study = scaling.Study(scaling.shapes([16, 32, 64], [1, 2]), scaling.budgets("20k,40k,80k"))
    scaling.run_study(study, out="outcome/scaling")

- Every point is an ordinary run folder, `<out>/runs/<shape>_lr<lr>/` (runner.run's outputs).
  With a constant learning rate (the default) one run per shape gives every budget: the
  budgets are rounded to multiples of one evaluation interval, eval_every is set to it and the
  run stops at the largest, so each budget's loss is the held-out evaluation at its step
  (metrics_baseline_val.csv; the largest budget's is the final evaluation). A decaying
  schedule (lr_schedule=cosine) shapes every loss by the schedule's length, so each budget is
  its own run, `<shape>_lr<lr>_s<steps>/`, its loss the final evaluation.
- `--tune-lr`: each shape's lr is the one of lowest final held-out loss over a sweep run for
  the smallest budget's steps, in `<out>/lr/<shape>/`.
- Resumable: a run whose evaluation at its last step is on disk is not run again; one cut
  short resumes from its checkpoint (runner.run(resume=True)).
- D is the label tokens seen at the evaluation (the runs' own count); C is training FLOPs per
  token position (scaling_law.flops_per_token) x the positions trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from minigpt_jax import config as cfg
from minigpt_jax import metrics, report, runner
from minigpt_jax import scaling_law as law
from minigpt_jax.files import atomic_write_bytes

COUNTS = ("nonembed", "all")
EVALS_PER_SMALLEST = 2  # evaluations up to the smallest budget: the curves' resolution
SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}


class ScalingError(ValueError):
    """A study that cannot run as given; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Shape:
    width: int
    depth: int
    heads: int

    @property
    def name(self) -> str:
        return f"w{self.width}_d{self.depth}"

    def overrides(self) -> dict:
        return {"embed_dim": self.width, "n_layers": self.depth, "n_heads": self.heads}


@dataclasses.dataclass(frozen=True)
class Study:
    """A grid: shapes x token budgets (texts: '20k' tokens or '0.5ep' of an epoch)."""

    shapes: tuple[Shape, ...]
    budgets: tuple[str, ...]
    lr: float | None = None  # one lr for every shape; None: the config's
    tune_lrs: tuple[float, ...] = ()  # a sweep per shape instead
    count: str = "nonembed"
    overrides: dict = dataclasses.field(default_factory=dict)  # --set, for every run
    resamples: int = 200
    seed: int = 0  # the bootstrap's


def int_list(flag: str, text: str) -> list[int]:
    """'16,32' -> [16, 32]; ScalingError for anything else."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ScalingError(f"{flag} is empty; expected comma-separated positive integers")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ScalingError(f"{flag} {text!r}: expected comma-separated positive integers") from None
    if min(values) <= 0:
        raise ScalingError(f"{flag} {text!r}: expected positive integers")
    return values


def shapes(widths: Sequence[int], depths: Sequence[int], heads: int = cfg.BASELINE.n_heads
           ) -> tuple[Shape, ...]:
    """The grid widths x depths, heads each; ScalingError for an empty grid, a duplicate, or a
    width that does not divide into the heads."""
    if not widths or not depths:
        raise ScalingError("the grid is empty; expected at least one width and one depth")
    for flag, xs in (("--widths", widths), ("--depths", depths)):
        dupes = sorted({x for x in xs if list(xs).count(x) > 1})
        if dupes:
            raise ScalingError(f"{flag}: {dupes[0]} given twice; expected each shape once")
    bad = [w for w in widths if w % heads]
    if bad:
        raise ScalingError(f"--widths {bad[0]}: not divisible by --heads {heads}; expected widths"
                           f" that are multiples of {heads}")
    return tuple(Shape(w, d, heads) for w in widths for d in depths)


def budgets(text: str) -> tuple[str, ...]:
    """'20k,40k,0.5ep' -> its parts, each checked: a number of tokens with k, M or G, or a
    fraction of an epoch ('ep')."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise ScalingError("--tokens is empty; expected budgets such as 1M,4M or 0.25ep,1ep")
    for p in parts:
        if not re.fullmatch(r"\d+(\.\d+)?(e\d+)?([kMG]|ep)?", p) or float(_number(p)) <= 0:
            raise ScalingError(f"--tokens {p!r}: expected a positive token count (1M, 250k, 2e6)"
                               " or a fraction of an epoch (0.5ep)")
    return parts


def _number(text: str) -> str:
    return re.sub(r"([kMG]|ep)$", "", text)


def budget_steps(texts: Sequence[str], epoch_tokens: int, tokens_per_step: float,
                 max_epochs: int, constant: bool) -> tuple[list[int], int]:
    """Budgets -> (training steps, evaluation interval); with a constant lr the steps are
    multiples of the interval (the smallest budget over EVALS_PER_SMALLEST). ScalingError for
    a budget larger than the data or two that land on one step."""
    tokens = []
    for t in texts:
        unit = epoch_tokens if t.endswith("ep") else SUFFIX[re.sub(r"[\d.e]", "", t)]
        n = float(_number(t)) * unit
        if n > epoch_tokens * max_epochs:
            raise ScalingError(f"--tokens {t}: {n:,.0f} tokens is larger than the data"
                               f" ({epoch_tokens:,} training tokens x max_epochs={max_epochs});"
                               " expected a smaller budget, more data or --set max_epochs")
        tokens.append(n)
    steps = [max(1, round(n / tokens_per_step)) for n in tokens]
    every = max(1, min(steps) // EVALS_PER_SMALLEST)
    if constant:
        steps = [max(every, round(s / every) * every) for s in steps]
    for i, s in enumerate(steps):
        if s in steps[:i]:
            raise ScalingError(f"--tokens {texts[steps.index(s)]} and {texts[i]} both come to"
                               f" {s} steps; expected budgets at least one step apart")
    return steps, every


# --- the runs -------------------------------------------------------------------------------

def _done(folder: pathlib.Path, name: str, step: int) -> bool:
    path = folder / f"metrics_{name}_val.csv"
    return path.exists() and any(int(r["step"]) == step for r in metrics.read_csv(path))


def _train(folder: pathlib.Path, overrides: dict, steps: int, data, devices, sweeps=()) -> None:
    """One runner.run into its folder unless it already finished; its own record of what it
    was asked beside it, so a folder asked something else is refused, not mixed."""
    record = json.dumps({"overrides": overrides, "max_steps": steps,
                         "sweeps": [[k, [t for t, _ in v]] for k, v in sweeps]}, sort_keys=True)
    path = folder / "scaling_run.json"
    if path.exists() and path.read_text() != record:
        raise ScalingError(f"{folder} holds a run asked for other settings ({path.read_text()});"
                           " expected the same --set and --tokens, or another --out")
    names = [f"lr_{t}" for t, _ in sweeps[0][1]] if sweeps else ["baseline"]
    if all(_done(folder, n, steps) for n in names):
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, record.encode())
    results = runner.run(["baseline"], out=folder, overrides=overrides, sweeps=sweeps,
                         max_steps=steps, data=data, devices=devices, resume=True)
    for r in results:
        if r.status != "ok":
            tqdm.write(f"scaling: {folder.name}/{r.name} {r.status}", file=sys.stderr)


def _val_rows(folder: pathlib.Path, name: str = "baseline") -> dict[int, dict]:
    path = folder / f"metrics_{name}_val.csv"
    return {int(r["step"]): r for r in metrics.read_csv(path)} if path.exists() else {}


def tune_lr(study: Study, shape: Shape, out: pathlib.Path, steps: int, data, devices) -> float:
    """The swept lr of lowest final held-out loss for the shape, after `steps` steps."""
    texts = [f"{lr:g}" for lr in study.tune_lrs]
    folder = out / "lr" / shape.name
    sweeps = [("lr", [(t, lr) for t, lr in zip(texts, study.tune_lrs)])]
    _train(folder, {**study.overrides, **shape.overrides()}, steps, data, devices, sweeps)
    finals = {lr: float(_val_rows(folder, f"lr_{t}").get(steps, {}).get("val_loss", math.inf))
              for t, lr in zip(texts, study.tune_lrs)}
    best = min(finals, key=lambda lr: (not math.isfinite(finals[lr]), finals[lr]))
    tqdm.write(f"scaling: {shape.name} lr {best:g} (final held-out loss {finals[best]:.4f})",
               file=sys.stderr)
    return best


def _data_facts(study: Study, data) -> tuple[int, float, int, cfg.Config]:
    """The data's training label tokens per epoch, label tokens per step, max_epochs, config."""
    from minigpt_jax import data as data_mod

    c = cfg.BASELINE.replace(**study.overrides)
    seqs = runner.load_data(data, [c.vocab_size])
    prepared = data_mod.prepare(seqs, c)
    if not len(prepared.train):
        raise ScalingError("the data give no training segment; expected more data")
    per_step = c.batch_size * prepared.label_tokens / len(prepared.train)
    return prepared.label_tokens, per_step, c.max_epochs, c


def run_study(study: Study, out, data=None, devices=None) -> dict:
    """Train every missing point, then fit, check, draw and report (analyse) -> its summary."""
    out = pathlib.Path(out)
    if study.count not in COUNTS:
        raise ScalingError(f"--count {study.count!r}: expected one of {', '.join(COUNTS)}")
    if len(study.shapes) < 2 or len(study.budgets) < 2 or \
            len(study.shapes) * len(study.budgets) < law.MIN_POINTS:
        raise ScalingError(f"{len(study.shapes)} shape(s) x {len(study.budgets)} budget(s);"
                           f" expected at least two of each and {law.MIN_POINTS} points to fit")
    runner.check_out_dir(out)
    for s in study.shapes:  # the config's own checks, before any data or training
        cfg.BASELINE.replace(**{**study.overrides, **s.overrides()})
    epoch_tokens, per_step, epochs, base = _data_facts(study, data)
    constant = base.lr_schedule == "constant"
    steps, every = budget_steps(study.budgets, epoch_tokens, per_step, epochs, constant)
    rows = []
    for shape in tqdm(study.shapes, desc="scaling: shapes", unit="shape", file=sys.stderr):
        lr = (tune_lr(study, shape, out, min(steps), data, devices) if study.tune_lrs
              else study.lr if study.lr is not None else base.lr)
        ov = {**study.overrides, **shape.overrides(), "lr": lr}
        c = cfg.BASELINE.replace(**ov)
        runs = ([(f"{shape.name}_lr{lr:g}", steps, {"eval_every": every})]
                if constant else [(f"{shape.name}_lr{lr:g}_s{s}", [s], {}) for s in steps])
        for folder_name, at, extra in runs:
            folder = out / "runs" / folder_name
            _train(folder, {**ov, **extra}, max(at), data, devices)
            val = _val_rows(folder)
            rows += [_row(shape, c, lr, s, val.get(s), f"runs/{folder_name}") for s in at]
    return analyse(rows, out, study.count, study.resamples, study.seed,
                   curves=_curves(out, rows))


def _row(shape: Shape, c: cfg.Config, lr: float, step: int, val: dict | None, run: str) -> dict:
    tokens = float(val["tokens"]) if val else math.nan
    return {"shape": shape.name, "width": shape.width, "depth": shape.depth, "heads": shape.heads,
            "lr": lr, "step": step, "N": cfg.num_params(c), "N_nonembed":
            law.non_embedding_params(c), "D": tokens,
            "C": float(law.flops_per_token(c)) * step * c.batch_size * c.seq_len,
            "loss": float(val["val_loss"]) if val else math.nan, "run": run}


def _curves(out: pathlib.Path, rows: list[dict]) -> dict[str, tuple]:
    """shape -> (tokens, held-out losses) of every evaluation of its run(s)."""
    curves = {}
    for run in dict.fromkeys(r["run"] for r in rows):
        shape = next(r["shape"] for r in rows if r["run"] == run)
        val = sorted(_val_rows(out / run).items())
        t, losses = curves.get(shape, ([], []))
        curves[shape] = (t + [float(v["tokens"]) for _, v in val],
                         losses + [float(v["val_loss"]) for _, v in val])
    return curves


def analyse(rows: list[dict], out, count: str = "nonembed", resamples: int = 200, seed: int = 0,
            curves: dict | None = None) -> dict:
    """The table's rows -> scaling_table.csv/.txt, scaling_fit.json, the plots and the report
    section; FitError when the points cannot identify the law."""
    from minigpt_jax import scaling_plots, scaling_report

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scaling_report.write_table(out, rows)
    ok = [r for r in rows if math.isfinite(r["loss"]) and math.isfinite(r["D"])]
    key = "N_nonembed" if count == "nonembed" else "N"  # "given": a table's own N (--fit)
    tqdm.write(f"scaling: fitting {len(ok)} points, {resamples} bootstrap resamples (twice, with"
               " the held-out check)", file=sys.stderr)
    summary = law.analyse(ok, key, resamples, seed)
    summary["count"] = count
    summary["failed_points"] = len(rows) - len(ok)
    atomic_write_bytes(out / "scaling_fit.json", json.dumps(summary, indent=2).encode())
    figures = scaling_plots.plot(out, ok, key, summary, curves or {})
    report.write_section(out, "Scaling law", scaling_report.section(summary, rows, figures))
    return summary
