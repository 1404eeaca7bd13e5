"""Loss and perplexity plots: one pair per experiment and the comparison of all.

- Figures are `matplotlib.figure.Figure` drawn by the Agg canvas directly: no
  pyplot, so no global figure registry to close, no backend chosen at import, no
  display needed. Drawing (`*_figures`, testable) is apart from writing (`plot_*`);
  PNGs are rendered into memory and written atomically.
- Smoothing is a centred moving average over ~1/10 of the run: no lag, so a
  falling loss is not drawn late, as an EMA would draw it. The window shrinks at
  the steep start and is shifted inward at the flat end (see `smooth`).
  Perplexity is smoothed as exp(mean log ppl), so one bad batch does not dominate.
- The y range fits what follows the first 10% of each run (and every point
  below it): the first steps of a language model sit near ln(50257) = 10.8 nats
  and would squash the part worth reading. The cut is not hidden: a note above
  the plot says where the curves start. Single-batch spikes (1% each side) may
  leave the axes; smoothed lines and validation points never do after the head.
- Perplexity is on a log axis (it is exp(loss): the loss axis relabelled). The
  comparison plots put tokens seen on x, so runs with other batch sizes compare.
- Several seeds of an experiment (`seeds_figures`, and `comparison_figures` given
  a list of runs per experiment): the line is the mean over seeds of the smoothed
  curves (interpolated onto the first seed's x, over the range every seed
  covers), the band their minimum to maximum, and each validation point the mean
  with a bar from minimum to maximum; the legend says so. One seed: as above.
"""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from minigpt_jax.files import atomic_write_bytes

FIGSIZE = (8.0, 5.0)  # inches
DPI = 120  # 960 x 600 pixels
HEAD_FRACTION = 0.1  # share of each run allowed above the y range

# --- smoothing ---------------------------------------------------------------

def default_window(n: int) -> int:
    """Odd smoothing window of about a tenth of an n-step run (1 below 20 steps)."""
    return 2 * (n // 20) + 1


def smooth(values: Sequence[float], window: int | None = None) -> np.ndarray:
    """Centred moving average over `window` steps (rounded up to odd; default ~n/10).

    At the start the window shrinks symmetrically (step 0 is its own value): the
    loss falls fastest there, and a window shifted inward would draw it too low.
    At the end the window keeps its width and is shifted inward: the curve is
    flat there, and the final value runs are compared by should be a full
    average, not one noisy batch. Non-finite values (a diverged step) are left
    out of every mean; a window with no finite value gives NaN.
    """
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n == 0:
        return y.copy()
    w = min(n, (default_window(n) if window is None else max(1, int(window))) | 1)
    ok = np.isfinite(y)
    total = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    i, h = np.arange(n), w // 2
    lo = np.where(i < h, 0, np.minimum(i - h, n - w))
    hi = np.where(i < h, 2 * i + 1, lo + w)
    k = count[hi] - count[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, (total[hi] - total[lo]) / k, np.nan)


# --- plots -------------------------------------------------------------------

_METRICS = (  # (file stem, train key, validation key, y label, log y)
    ("loss", "loss", "val_loss", "loss (nats per token)", False),
    ("perplexity", "perplexity", "val_perplexity", "perplexity (log scale)", True),
)
_VAL_MARKER = dict(ls="none", marker="o", ms=6, mec="black", mew=0.6, zorder=3)
_BAND = "band: min to max over seeds"


def _compact(v: float, _pos=None) -> str:
    """Tick label for token counts: 0, 500k, 1.2M, 3B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.0f}"


def _plain(v: float, _pos=None) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a)]


def _series(rows, val_rows, key: str, vkey: str, log: bool, x_key: str, window=None):
    """x, y, smoothed y, validation x, validation y; y in log space for a log axis."""
    def column(table, k, as_y=False):
        v = np.array([np.nan if r.get(k) is None else float(r[k]) for r in table])
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(v) if as_y and log else v
    y = column(rows, key, True)
    return column(rows, x_key), y, smooth(y, window), column(val_rows, x_key), column(val_rows, vkey, True)


def _over_seeds(runs, key: str, vkey: str, log: bool, x_key: str, window=None) -> dict:
    """Several runs' series on one x: the first run's x over the range all cover; per-step y,
    smoothed y and validation y as mean, min and max over runs (validation by index)."""
    series = [_series(rows, val_rows, key, vkey, log, x_key, window) for rows, val_rows in runs]
    x0 = series[0][0]
    x = x0[(x0 >= max(s[0][0] for s in series)) & (x0 <= min(s[0][-1] for s in series))]
    y = np.array([np.interp(x, s[0], s[1]) for s in series])
    sm = np.array([np.interp(x, s[0], s[2]) for s in series])
    nv = min(len(s[3]) for s in series)
    vx = np.array([s[3][:nv] for s in series]).mean(axis=0)
    vy = np.array([s[4][:nv] for s in series])
    with np.errstate(invalid="ignore"):
        return {"x": x, "y": y.mean(axis=0), "sm": sm.mean(axis=0), "lo": sm.min(axis=0),
                "hi": sm.max(axis=0), "vx": vx, "vy": vy.mean(axis=0), "vlo": vy.min(axis=0),
                "vhi": vy.max(axis=0), "bad": sum(int(np.sum(~np.isfinite(s[1]))) for s in series)}


def _draw_seeds(ax, b: dict, color: str, show, label: str, val_label: str | None) -> None:
    """The mean line, its min-max band, and validation means with min-max bars."""
    ax.plot(b["x"], show(b["sm"]), color=color, lw=1.8, label=label)
    ax.fill_between(b["x"], show(b["lo"]), show(b["hi"]), color=color, alpha=0.2, lw=0)
    if len(b["vx"]):
        m = show(b["vy"])
        ax.errorbar(b["vx"], m, yerr=[m - show(b["vlo"]), show(b["vhi"]) - m], color=color,
                    ecolor=color, elinewidth=1.2, capsize=3, label=val_label, **_VAL_MARKER)


def _head_end(x: np.ndarray) -> float:
    """x up to which a run may rise above the y range (nowhere if too short to smooth)."""
    return -math.inf if default_window(len(x)) == 1 else x[0] + HEAD_FRACTION * (x[-1] - x[0])


def _new_axes(title: str, xlabel: str, ylabel: str, log: bool):
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, loc="left", fontsize=12)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", alpha=0.35)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.2, 2.5, 4.0, 6.0, 7.0, 8.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=8)
        ax.grid(True, which="minor", axis="y", alpha=0.15)
    return fig, ax


def _set_y(ax, log: bool, tops: list, lows: list, start: float, n_bad: int) -> None:
    """y range over `tops` (upper end) and `lows` (lower end) plus 5%; note what it hides."""
    top, low = _finite(np.concatenate(tops)), _finite(np.concatenate(lows))
    lo = low.min() if low.size else 0.0
    hi = max(top.max() if top.size else (low.max() if low.size else 1.0), lo)
    pad = 0.05 * (hi - lo) if hi - lo > 1e-9 else 0.05 * max(abs(hi), 1.0)
    lo, hi = lo - pad, hi + pad
    ax.set_ylim(math.exp(lo) if log else lo, math.exp(hi) if log else hi)
    if log and hi - lo < math.log(2.5):  # too narrow for the labelled majors alone
        ax.yaxis.set_minor_formatter(FuncFormatter(_plain))
    notes = []
    if start > hi:
        notes.append(f"y axis cut: the curves start at {_plain(math.exp(start) if log else start)}")
    if n_bad:
        notes.append(f"{n_bad} non-finite steps not drawn")
    ax.set_title("; ".join(notes), loc="right", fontsize=8, color="0.4")


def experiment_figures(name: str, rows: Sequence[Mapping],
                       val_rows: Sequence[Mapping] = ()) -> dict[str, Figure]:
    """{file name: figure} of one experiment's loss and perplexity against step; {} if no rows.

    rows: one per step, keys step, tokens, loss, perplexity (others ignored).
    val_rows: keys step, tokens, val_loss, val_perplexity; may be empty.
    """
    if not rows:
        return {}
    window = default_window(len(rows))
    rate = float(rows[-1]["tokens"]) / max(float(rows[-1]["step"]), 1.0)
    figures = {}
    for stem, key, vkey, ylabel, log in _METRICS:
        steps, y, sm, vsteps, vy = _series(rows, val_rows, key, vkey, log, "step", window)
        show = np.exp if log else np.asarray
        fig, ax = _new_axes(f"{name}: {stem}", "step", ylabel, log)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        if window > 1:
            ax.plot(steps, show(y), color="C0", lw=0.7, alpha=0.35, label=f"train {stem}, per step")
            ax.plot(steps, show(sm), color="C0", lw=2.0,
                    label=f"train {stem}, centred moving average ({window} steps)")
        else:  # too few steps to smooth: the steps themselves are the main line
            ax.plot(steps, show(y), color="C0", lw=2.0, marker=".", label=f"train {stem}, per step")
        if len(val_rows):
            ax.plot(vsteps, show(vy), color="C1", label=f"validation {stem}", **_VAL_MARKER)
        if rate > 0:  # batches differ only in their few PAD labels, so tokens ~ rate * step
            top = ax.secondary_xaxis("top", functions=(lambda s: s * rate, lambda t: t / rate))
            top.set_xlabel("tokens seen")
            top.xaxis.set_major_formatter(FuncFormatter(_compact))
        ax.legend(loc="upper right")
        late, vlate = steps > _head_end(steps), vsteps > _head_end(steps)
        tail = _finite(y[late])
        _set_y(ax, log, [sm[late], vy[vlate], np.percentile(tail, [99]) if tail.size else tail],
               [sm, vy, np.percentile(_finite(y), [1]) if np.isfinite(y).any() else sm],
               np.max(_finite(sm), initial=-np.inf), int(np.sum(~np.isfinite(y))))
        figures[f"{stem}_curve_{name}.png"] = fig
    return figures


def comparison_figures(curves: Mapping[str, tuple | Sequence[tuple]]) -> dict[str, Figure]:
    """{file name: figure} of every experiment's loss and perplexity against tokens seen.

    curves: experiment name -> (rows, val_rows), keys as in experiment_figures, or a list of
    them (its seeds: drawn as their mean with a min-max band); the order sets the colours.
    Runs without rows are left out; {} if none has any.
    """
    curves = {n: runs for n, c in curves.items()
              if (runs := [r for r in ([c] if isinstance(c, tuple) else c) if len(r[0])])}
    banded = any(len(runs) > 1 for runs in curves.values())
    figures = {}
    for stem, key, vkey, ylabel, log in _METRICS if curves else ():
        show = np.exp if log else np.asarray
        fig, ax = _new_axes(f"{stem.capitalize()} of {len(curves)} experiments against tokens seen",
                            "tokens seen", ylabel, log)
        ax.xaxis.set_major_formatter(FuncFormatter(_compact))
        tops, lows, start, bad = [], [], -np.inf, 0
        for i, (name, runs) in enumerate(curves.items()):
            color = f"C{i % 10}"
            if len(runs) > 1:
                b = _over_seeds(runs, key, vkey, log, "tokens")
                _draw_seeds(ax, b, color, show, f"{name} ({len(runs)} seeds)", None)
                tokens, sm, vtokens, vy, vlo = b["x"], b["hi"], b["vx"], b["vhi"], b["vlo"]
                lows += [b["lo"], vlo]
                bad += b["bad"]
            else:
                (rows, val_rows), = runs
                tokens, y, sm, vtokens, vy = _series(rows, val_rows, key, vkey, log, "tokens")
                ax.plot(tokens, show(sm), color=color, lw=1.8, label=name)
                if len(val_rows):
                    ax.plot(vtokens, show(vy), color=color, **_VAL_MARKER)
                lows += [sm, vy]
                bad += int(np.sum(~np.isfinite(y)))
            tops += [sm[tokens > _head_end(tokens)], vy[vtokens > _head_end(tokens)]]
            start = max(start, np.max(_finite(sm), initial=-np.inf))
        ax.add_artist(ax.legend(loc="upper right", title="experiment", fontsize=9))
        what = "mean over seeds, " if banded else ""
        ax.legend(handles=[
            Line2D([], [], color="0.3", lw=1.8,
                   label=f"train, {what}centred moving average (~1/10 run)"),
            Line2D([], [], color="0.3", label=f"validation{' (bars: min to max)' * banded}",
                   **_VAL_MARKER),
            *([Patch(color="0.3", alpha=0.2, label=_BAND)] if banded else []),
        ], loc="upper center", fontsize=8)
        _set_y(ax, log, tops, lows, start, bad)
        figures[f"{stem}_curves.png"] = fig
    return figures


def seeds_figures(name: str, runs: Sequence[tuple]) -> dict[str, Figure]:
    """{file name: figure} of one experiment over its seeds against step: the mean per-step
    and smoothed train curves, the smoothed curves' min-max band, validation means with
    min-max bars. runs: (rows, val_rows) per seed; one run: `experiment_figures`."""
    runs = [r for r in runs if len(r[0])]
    if len(runs) <= 1:
        return experiment_figures(name, *runs[0]) if runs else {}
    window = min(default_window(len(rows)) for rows, _ in runs)
    figures = {}
    for stem, key, vkey, ylabel, log in _METRICS:
        show = np.exp if log else np.asarray
        b = _over_seeds(runs, key, vkey, log, "step", window)
        fig, ax = _new_axes(f"{name}: {stem}, {len(runs)} seeds", "step", ylabel, log)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        if window > 1:
            ax.plot(b["x"], show(b["y"]), color="C0", lw=0.7, alpha=0.35,
                    label=f"train {stem}, per step, mean of {len(runs)} seeds")
        line = (f"train {stem}, centred moving average ({window} steps), mean of seeds"
                if window > 1 else f"train {stem}, per step, mean of {len(runs)} seeds")
        _draw_seeds(ax, b, "C0", show, line, f"validation {stem}, mean (bars: min to max)")
        handles = ax.get_legend_handles_labels()[0]
        ax.legend(handles=[*handles, Patch(color="C0", alpha=0.2, label=_BAND)],
                  loc="upper right", fontsize=9)
        late, vlate = b["x"] > _head_end(b["x"]), b["vx"] > _head_end(b["x"])
        _set_y(ax, log, [b["hi"][late], b["vhi"][vlate]], [b["lo"], b["vlo"]],
               np.max(_finite(b["sm"]), initial=-np.inf), b["bad"])
        figures[f"{stem}_curve_{name}.png"] = fig
    return figures


def write_figures(out_dir: pathlib.Path, figures: Mapping[str, Figure]) -> list[pathlib.Path]:
    """Render each figure to PNG in memory with Agg, then write it atomically as out_dir/<file>."""
    paths = []
    for file_name, fig in figures.items():
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        paths.append(pathlib.Path(out_dir) / file_name)
        atomic_write_bytes(paths[-1], buf.getvalue())
    return paths


def plot_experiment(out_dir: pathlib.Path, name: str, rows: Sequence[Mapping],
                    val_rows: Sequence[Mapping] = ()) -> list[pathlib.Path]:
    """Write loss_curve_<name>.png and perplexity_curve_<name>.png; [] when rows is empty."""
    return write_figures(out_dir, experiment_figures(name, rows, val_rows))


def plot_comparison(out_dir: pathlib.Path, curves: Mapping[str, tuple | Sequence[tuple]]
                    ) -> list[pathlib.Path]:
    """Write loss_curves.png and perplexity_curves.png; [] when no experiment has rows.
    curves as in `comparison_figures` (a list of (rows, val_rows) per experiment: its seeds)."""
    return write_figures(out_dir, comparison_figures(curves))


def plot_seeds(out_dir: pathlib.Path, name: str, runs: Sequence[tuple]) -> list[pathlib.Path]:
    """Write loss_curve_<name>.png and perplexity_curve_<name>.png of an experiment over its
    seeds (`seeds_figures`); [] when no run has rows."""
    return write_figures(out_dir, seeds_figures(name, runs))
