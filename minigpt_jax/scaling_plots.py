"""The scaling study's pictures (Agg figures, written by plots.write_figures):

- scaling_loss_vs_tokens.png: held-out loss against tokens, one colour per model size, the
  runs' evaluations as points and the fitted law as a line;
- scaling_loss_vs_params.png: loss against N at each token budget, measured and fitted;
- scaling_isoloss.png: contours of the fitted L over (N, D), the runs marked, and the
  compute-optimal frontier N*(C), D*(C).
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.figure import Figure

from minigpt_jax import plots
from minigpt_jax import scaling_law as law


def _constants(s: dict) -> list[float]:
    return [s[k]["value"] for k in law.NAMES]


def tokens_figure(rows, key, s, curves) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    sizes = sorted({r[key] for r in rows})
    colours = [f"C{i % 10}" for i in range(len(sizes))]
    D = np.array([r["D"] for r in rows])
    grid = np.geomspace(D.min() / 2, D.max() * 2, 100)
    for n, colour in zip(sizes, colours):
        shape = next(r.get("shape", f"N={n:.3g}") for r in rows if r[key] == n)
        t, losses = curves.get(shape, ([], []))
        ax.plot(t, losses, ".", color=colour, alpha=0.4)
        pts = [r for r in rows if r[key] == n]
        ax.plot([r["D"] for r in pts], [r["loss"] for r in pts], "o", color=colour,
                label=f"{shape} (N={n:.3g})")
        ax.plot(grid, law.loss(_constants(s), n, grid), "-", color=colour)
    return _finish(fig, ax, "training tokens D",
                   "Loss against tokens: runs (points) and the fitted law (lines)")


def params_figure(rows, key, s) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    steps = sorted({r.get("step", r["D"]) for r in rows})
    N = np.array([r[key] for r in rows])
    grid = np.geomspace(N.min() / 2, N.max() * 2, 100)
    for i, step in enumerate(steps):
        pts = [r for r in rows if r.get("step", r["D"]) == step]
        d = float(np.median([r["D"] for r in pts]))
        ax.plot([r[key] for r in pts], [r["loss"] for r in pts], "o", color=f"C{i % 10}",
                label=f"D = {d:.3g}")
        ax.plot(grid, law.loss(_constants(s), grid, d), "-", color=f"C{i % 10}")
    return _finish(fig, ax, f"N ({key})",
                   "Loss against model size at each budget: runs and the fitted law")


def _finish(fig: Figure, ax, xlabel: str, title: str) -> Figure:
    """A loss-against-x figure's log x axis, labels and legend."""
    ax.set(xscale="log", xlabel=xlabel, ylabel="held-out loss (nats)", title=title)
    ax.legend(fontsize="small")
    return fig


def isoloss_figure(rows, key, s) -> Figure:
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    N = np.array([r[key] for r in rows])
    D = np.array([r["D"] for r in rows])
    opt = s["optimal"]
    n_lo, n_hi = min(N.min(), *(o["N"] for o in opt)) / 3, max(N.max(), *(o["N"] for o in opt)) * 3
    d_lo, d_hi = min(D.min(), *(o["D"] for o in opt)) / 3, max(D.max(), *(o["D"] for o in opt)) * 3
    gn, gd = np.meshgrid(np.geomspace(n_lo, n_hi, 120), np.geomspace(d_lo, d_hi, 120))
    L = law.loss(_constants(s), gn.ravel(), gd.ravel()).reshape(gn.shape)
    measured = [r["loss"] for r in rows]  # levels around the runs' losses, not the far corner's
    levels = np.linspace(min(measured) * 0.95, max(measured) * 1.05, 10)
    cs = ax.contour(gn, gd, L, levels=levels, cmap="viridis")
    ax.clabel(cs, fontsize="x-small", fmt="%.2f")
    ax.scatter(N, D, c="k", s=14, label="runs", zorder=3)
    f = s["flops_per_token"]
    Cs = np.geomspace(min(o["C"] for o in opt) / 10, max(o["C"] for o in opt), 40)
    front = np.array([law.optimal(_constants(s), C, (f["log_c0"], f["c1"])) for C in Cs])
    ax.plot(front[:, 0], front[:, 1], "r-", label="compute-optimal N*(C), D*(C)")
    ax.plot([o["N"] for o in opt], [o["D"] for o in opt], "r^", label="reported budgets")
    ax.set(xscale="log", yscale="log", xlim=(n_lo, n_hi), ylim=(d_lo, d_hi),
           xlabel=f"N ({key})", ylabel="training tokens D",
           title="Iso-loss contours of the fitted law")
    ax.legend(fontsize="small")
    return fig


def plot(out: pathlib.Path, rows: list[dict], key: str, s: dict, curves: dict) -> list[str]:
    """Write the three figures into `out` -> their file names."""
    figures = {"scaling_loss_vs_tokens.png": tokens_figure(rows, key, s, curves),
               "scaling_loss_vs_params.png": params_figure(rows, key, s),
               "scaling_isoloss.png": isoloss_figure(rows, key, s)}
    return [p.name for p in plots.write_figures(out, figures)]
