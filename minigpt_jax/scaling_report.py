"""The scaling study's words: scaling_table.csv/.txt (every point) and the report's "Scaling law"
section (the constants with intervals, the held-out check, the frontier, the caveats)."""

from __future__ import annotations

import math
import pathlib

from minigpt_jax import tables
from minigpt_jax.files import atomic_write_bytes

COLUMNS = ("shape", "width", "depth", "heads", "lr", "step", "N", "N_nonembed", "D", "C", "loss",
           "run")


def _cell(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.4g}"
    return str(v)


def text_table(rows: list[dict], fields: tuple[str, ...]) -> str:
    """Aligned columns for people."""
    cells = [list(fields)] + [[_cell(r.get(k, "")) for k in fields] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(fields))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells) + "\n"


def write_table(out: pathlib.Path, rows: list[dict]) -> None:
    """scaling_table.csv (raw values) and scaling_table.txt (aligned) in `out`: the study's
    columns, or a table's own (--fit)."""
    fields = tuple(k for k in COLUMNS if any(k in r for r in rows)) or tuple(rows[0])
    tables.write_csv(out / "scaling_table.csv", [{k: r.get(k, "") for k in fields} for r in rows],
                     fields)
    atomic_write_bytes(out / "scaling_table.txt", text_table(rows, fields).encode())


def _g(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "-"


def section(s: dict, rows: list[dict], figures: list[str]) -> str:
    """The report section's markdown from scaling_law.analyse's summary."""
    n_label = {"nonembed": "non-embedding parameters (`--count nonembed`)",
               "all": "all parameters (`--count all`)", "given": "the table's N"}[s["count"]]
    out = [f"L(N, D) = E + A / N^alpha + B / D^beta, fitted to {s['points']} points"
           f" ({s['failed_points']} failed) with N = {n_label} and D ="
           " training tokens. Hoffmann et al. 2022's approach 3: Huber loss (delta 1e-3) of the"
           " log residuals, L-BFGS from a grid of starts; 95% percentile bootstrap over the"
           " runs (or the points, when the runs are too few: see the warnings). Table:"
           " scaling_table.csv; constants: scaling_fit.json.", "",
           "| constant | value | 95% interval |", "|---|---|---|"]
    out += [f"| {k} | {_g(s[k]['value'])} | [{_g(s[k]['low'])}, {_g(s[k]['high'])}] |"
            for k in ("E", "A", "alpha", "B", "beta")]
    out += [""] + [f"- Warning: {w}" for w in s["warnings"]]
    h = s["held_out"]
    out += ["", f"**Held-out check.** The law fitted without the largest model (N = {h['N']:,.0f})"
                " predicts its losses:", ""]
    if "refused" in h:
        out += [f"No prediction: {h['refused']}."]
    else:
        out += ["| D | predicted | 95% interval | measured |", "|---|---|---|---|"]
        out += [f"| {r['D']:,.0f} | {r['predicted']:.4f} | [{r['low']:.4f}, {r['high']:.4f}] |"
                f" {r['measured']:.4f} |" for r in h["rows"]]
        out += ["", f"{h['within']} of {len(h['rows'])} measured losses fall in the interval"
                    " (it holds the constants' uncertainty only, not the evaluation's noise)."]
    out += ["", "**Compute-optimal size.** N* and D* minimising the fitted L at compute C (FLOPs,"
                " with the runs' FLOPs per token as a power of N):", "",
            "| C (FLOPs) | N* | 95% interval | D* | 95% interval |", "|---|---|---|---|---|"]
    out += [f"| {o['C']:.3g} | {_g(o['N'])} | [{_g(o['N_low'])}, {_g(o['N_high'])}] |"
            f" {_g(o['D'])} | [{_g(o['D_low'])}, {_g(o['D_high'])}] |" for o in s["optimal"]]
    out += ["", "Caveats: with a constant lr a shape's budgets are points of one run, not"
                " independent runs; the largest budget's loss is the final evaluation's larger"
                " sample; an untuned lr biases the exponents (use `--tune-lr`); the law is"
                " extrapolated past 10x at its own risk.", ""]
    out += [f"![{f}]({f})" for f in figures]
    return "\n".join(out)
