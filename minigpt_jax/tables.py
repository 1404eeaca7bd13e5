"""The results table (results_table.txt and .csv) and the one cell formatter for its numbers.

- One row per experiment (`row(result)`): the PyTorch project's three columns first
  (experiment, final_loss, final_perplexity: the last step's loss and its exp), then
  ours. tokens/s is training throughput, without compilation (its own column).
- CSV with raw numbers (empty when missing) for machines, TXT with fixed-width
  aligned columns ("-" when missing) for people; both written atomically.
- `cell(value, kind)` formats a number for people: the TXT table and report.md use it.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from minigpt_jax.config import num_params
from minigpt_jax.files import atomic_write_bytes
from minigpt_jax.plots import smooth

# Results table: field (CSV header), TXT header, kind (sets format and alignment).
# The first three are the PyTorch project's table (final = the last step's loss and its exp).
RESULT_COLUMNS = (
    ("experiment", "experiment", "text"),
    ("final_loss", "final loss", "loss"),
    ("final_perplexity", "final ppl", "ppl"),
    ("overrides", "overrides", "text"),
    ("parameters", "params", "int"),
    ("device", "device", "text"),
    ("steps", "steps", "int"),
    ("tokens", "tokens", "int"),
    ("train_loss", "smoothed loss", "loss"),
    ("train_perplexity", "smoothed ppl", "ppl"),
    ("val_loss", "val loss", "loss"),
    ("val_perplexity", "val ppl", "ppl"),
    ("val_stderr", "val ±se", "loss"),
    ("val_tokens", "val tokens", "int"),
    ("wall_seconds", "wall s", "seconds"),
    ("compile_seconds", "compile s", "seconds"),
    ("tokens_per_second", "tokens/s", "rate"),
    ("status", "status", "text"),
)
RESULT_FIELDS = tuple(c[0] for c in RESULT_COLUMNS)
TXT_TEXT_MAX = 60  # characters of a text cell in the TXT table (the CSV keeps all)


def csv_text(rows: list[dict], fields: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: pathlib.Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    atomic_write_bytes(path, csv_text(rows, fields).encode())


# --- results table -----------------------------------------------------------

def _missing(v) -> bool:
    if isinstance(v, numbers.Real):
        return math.isnan(v)
    return v is None or (isinstance(v, str) and not v.strip())


def _text(v) -> str:
    if isinstance(v, Mapping):
        v = " ".join(f"{k}={x}" for k, x in v.items())
    return " ".join(str(v).split())  # one line: an exception message may hold newlines


def cell(v, kind: str, for_csv: bool = False) -> str:
    """One value as the tables show it: for people ("-" when missing), or raw for the CSV."""
    if _missing(v):
        return "" if for_csv else "-"
    if kind == "text":
        s = _text(v)
        return s if for_csv or len(s) <= TXT_TEXT_MAX else s[:TXT_TEXT_MAX - 3] + "..."
    if not math.isfinite(float(v)):  # a diverged run: say so rather than crash on int(inf)
        return repr(float(v)) if for_csv else str(float(v))
    if for_csv:
        return str(int(v)) if kind == "int" else repr(float(v))
    return number(v, FORMATS[kind])


FORMATS = {"int": ",d", "loss": ".4f", "ppl": ",.2f", "seconds": ",.1f", "rate": ",.0f"}


def number(v, fmt: str) -> str:
    """A number in fmt for people; a diverged run's huge values in scientific notation; "-" when
    missing or not finite."""
    if v is None or not math.isfinite(float(v)):
        return "-"
    if fmt.endswith("d"):
        return format(int(v), fmt)
    return format(float(v), ".3e" if abs(float(v)) >= 1e9 else fmt)


def _complete(result: Mapping) -> dict:
    unknown = set(result) - set(RESULT_FIELDS)
    if unknown:
        raise ValueError(f"unknown result keys {sorted(unknown)}; valid: {', '.join(RESULT_FIELDS)}")
    return {f: result.get(f) for f in RESULT_FIELDS}


def results_txt(results: Sequence[Mapping], title: str = "MiniGPT experiment results") -> str:
    """Fixed-width table: text left-aligned, numbers right-aligned, "-" where missing."""
    rows = [_complete(r) for r in results]
    table = [[h for _, h, _ in RESULT_COLUMNS]]
    table += [[cell(r[f], kind, for_csv=False) for f, _, kind in RESULT_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(RESULT_COLUMNS))]

    def line(cells):
        return "  ".join(c.ljust(w) if kind == "text" else c.rjust(w)
                         for c, w, (_, _, kind) in zip(cells, widths, RESULT_COLUMNS)).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([title, line(table[0]), rule, *map(line, table[1:])]) + "\n"


def write_results_table(out_dir: pathlib.Path, results: Sequence[Mapping],
                        title: str = "MiniGPT experiment results") -> list[pathlib.Path]:
    """Write results_table.txt and results_table.csv; one result dict per experiment.

    Keys are RESULT_FIELDS: unknown keys are an error (a misspelt key would
    otherwise leave its column silently empty); missing, None or NaN values
    render as "" in the CSV and "-" in the TXT.
    """
    out_dir = pathlib.Path(out_dir)
    rows = [_complete(r) for r in results]
    csv_rows = [{f: cell(r[f], kind, for_csv=True) for f, _, kind in RESULT_COLUMNS} for r in rows]
    txt, csv_path = out_dir / "results_table.txt", out_dir / "results_table.csv"
    atomic_write_bytes(txt, results_txt(results, title).encode())
    write_csv(csv_path, csv_rows, RESULT_FIELDS)
    return [txt, csv_path]


def row(result) -> dict:
    """A loop.Result as one row of the table (keys: RESULT_FIELDS)."""
    rows, last = result.rows, (result.rows[-1] if result.rows else {})
    val = result.val_rows[-1] if result.val_rows else {}
    final = result.final_eval
    # the mean of the last smoothing window: the end of the plotted curve, not one noisy batch
    loss = float(smooth([r["loss"] for r in rows])[-1]) if rows else None
    with np.errstate(over="ignore"):
        ppl = float(np.exp(loss)) if loss is not None else None
    elapsed = last.get("elapsed")  # training time, compilation excluded (loop.py)
    out = {
        "experiment": result.name,
        "final_loss": last.get("loss"),  # the PyTorch project's column: the last step's loss
        "final_perplexity": last.get("perplexity"),
        "overrides": result.overrides,
        "parameters": num_params(result.config),
        "device": result.device,
        "steps": result.steps,
        "tokens": result.tokens,
        "train_loss": loss,
        "train_perplexity": ppl,
        "val_loss": val.get("val_loss"),
        "val_perplexity": val.get("val_perplexity"),
        "val_stderr": final.stderr if final is not None else None,
        "val_tokens": final.tokens if final is not None else None,
        "wall_seconds": round(result.seconds, 2),
        "compile_seconds": round(result.phases["compile"], 2) if "compile" in result.phases else None,
        "tokens_per_second": round(result.tokens / elapsed, 1) if elapsed else None,
        "status": result.status,
    }
    # A diverging run's losses overflow exp(); an infinite cell is left empty ("-"), as NaN is.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}
