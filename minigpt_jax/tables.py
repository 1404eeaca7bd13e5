"""The results table (results_table.txt and .csv) and the one cell formatter for its numbers.

- One row per experiment (`row(result)`): the PyTorch project's three columns first
  (experiment, final_loss, final_perplexity: the last step's loss and its exp), then
  ours. tokens/s is training throughput, without compilation (its own column).
- CSV with raw numbers (empty when missing) for machines, TXT with fixed-width
  aligned columns ("-" when missing) for people; both written atomically.
- `cell(value, kind)` formats a number for people: the TXT table and report.md use it.
- Several seeds (`write_results`): each run's row gains its `seed`, and each
  experiment one summary row (SUMMARY_COLUMNS: its spread over seeds and its
  paired difference from the reference, `seeds.experiment_stats`); in the TXT
  the summary rows are a second table. One seed per experiment: the table as
  before, byte for byte. An lr sweep adds its LR sensitivity (`seeds.lr_sweeps`)
  below the TXT tables and in lr_sensitivity.csv.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from minigpt_jax import seeds
from minigpt_jax.config import num_params
from minigpt_jax.files import atomic_write_bytes

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
SEED_COLUMN = ("seed", "seed", "int")  # per-run rows, with several seeds
# Summary rows (one per experiment, with several seeds): over its seeds, and against the reference
SUMMARY_COLUMNS = (
    ("seeds", "seeds", "int"),  # seeds with a finite final validation loss
    ("val_loss_mean", "val mean", "loss"),  # final validation loss (the final evaluation)
    ("val_loss_std", "val std", "loss"),  # sample standard deviation over seeds
    ("val_loss_ci95", "val ±ci95", "loss"),  # 95% interval half width of the mean (Student's t)
    ("train_loss_mean", "smoothed mean", "loss"),  # smoothed final train loss
    ("train_loss_std", "smoothed std", "loss"),
    ("train_loss_ci95", "smoothed ±ci95", "loss"),
    ("delta_val_loss", "Δ val", "delta"),  # mean over seeds of (this - reference), seed by seed
    ("delta_ci95", "Δ ±ci95", "loss"),  # its 95% interval half width
    ("p_value", "p", "p"),  # paired t-test (scipy.stats.ttest_rel); empty for the reference
)
SUMMARY_FIELDS = tuple(c[0] for c in SUMMARY_COLUMNS)
LR_COLUMNS = (  # lr_sensitivity.csv and the TXT's block: one row per swept shape
    ("experiments", "experiments", "text"),  # the sweep's experiments, by lr
    ("lrs", "lrs", "text"),
    ("seeds", "seeds", "int"),
    ("lr_sensitivity", "LR sensitivity", "loss"),  # mean over seeds (stats.lr_sensitivity)
    ("lr_sensitivity_std", "std", "loss"),
    ("lr_sensitivity_ci95", "±ci95", "loss"),
    ("best_lr", "best lr", "text"),  # lowest mean final validation loss
)
TXT_TEXT_MAX = 60  # characters of a text cell in the TXT table (the CSV keeps all)


def csv_text(rows: list[dict], fields: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: pathlib.Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    atomic_write_bytes(path, csv_text(rows, fields).encode())


def _md_cell(v) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return " ".join(str(v).split()).replace("|", "\\|") or "-"


def markdown(header: Sequence[str], rows: Sequence[Sequence], right=frozenset()) -> str:
    """A Markdown table (report.md's); columns whose index is in `right` right-aligned."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = [header, align, *[[_md_cell(c) for c in r] for r in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


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


FORMATS = {"int": ",d", "loss": ".4f", "ppl": ",.2f", "seconds": ",.1f", "rate": ",.0f",
           "delta": "+.4f", "p": ".3g"}


def number(v, fmt: str) -> str:
    """A number in fmt for people; a diverged run's huge values in scientific notation; "-" when
    missing or not finite."""
    if v is None or not math.isfinite(float(v)):
        return "-"
    if fmt.endswith("d"):
        return format(int(v), fmt)
    return format(float(v), ".3e" if abs(float(v)) >= 1e9 else fmt)


def _complete(result: Mapping, fields: tuple[str, ...] = RESULT_FIELDS) -> dict:
    unknown = set(result) - set(fields)
    if unknown:
        raise ValueError(f"unknown result keys {sorted(unknown)}; valid: {', '.join(fields)}")
    return {f: result.get(f) for f in fields}


def _columns(results: Sequence[Mapping]) -> tuple:
    """RESULT_COLUMNS, then the seed and summary columns where a row has them."""
    keys = set().union(*results) if results else set()
    several = bool(keys & ({SEED_COLUMN[0]} | set(SUMMARY_FIELDS)))
    return RESULT_COLUMNS + ((SEED_COLUMN, *SUMMARY_COLUMNS) if several else ())


def _txt(columns, rows: Sequence[Mapping]) -> list[str]:
    """Header, rule and rows: text left-aligned, numbers right-aligned, "-" where missing."""
    table = [[h for _, h, _ in columns]]
    table += [[cell(r.get(f), kind, for_csv=False) for f, _, kind in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]

    def line(cells):
        return "  ".join(c.ljust(w) if kind == "text" else c.rjust(w)
                         for c, w, (_, _, kind) in zip(cells, widths, columns)).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return [line(table[0]), rule, *map(line, table[1:])]


def results_txt(results: Sequence[Mapping], title: str = "MiniGPT experiment results",
                sweeps: Sequence[Mapping] = ()) -> str:
    """Fixed-width table of the runs; the summary rows, and the lr sweeps' rows, below it."""
    columns = _columns(results)
    fields = tuple(c[0] for c in columns)
    rows = [_complete(r, fields) for r in results]
    runs = [r for r in rows if r.get("seeds") is None]
    summary = [r for r in rows if r.get("seeds") is not None]
    several = len(columns) > len(RESULT_COLUMNS)
    out = [title, *_txt(RESULT_COLUMNS + ((SEED_COLUMN,) if several else ()), runs)]
    if summary:
        out += ["", ("Over seeds: mean, sample std and 95% interval (Student's t) of the final"
                     " validation and smoothed train losses; Δ: paired difference from the"
                     " reference seed by seed, p: paired t-test"),
                *_txt((RESULT_COLUMNS[0], *SUMMARY_COLUMNS), summary)]
    if sweeps:
        out += ["", ("LR sensitivity (Wortsman et al. 2023): mean over the swept lrs of"
                     " min(first-step loss, final validation loss) minus the best final"
                     " validation loss; spread over seeds"), *_txt(LR_COLUMNS, sweeps)]
    return "\n".join(out) + "\n"


def write_results_table(out_dir: pathlib.Path, results: Sequence[Mapping],
                        title: str = "MiniGPT experiment results",
                        sweeps: Sequence[Mapping] = ()) -> list[pathlib.Path]:
    """Write results_table.txt and results_table.csv; one result dict per row (`row`, or
    `table_rows` with several seeds), and lr_sensitivity.csv where `sweeps` (`sweep_rows`).

    Keys are RESULT_FIELDS (and the seed and SUMMARY_FIELDS): unknown keys are an error (a
    misspelt key would otherwise leave its column silently empty); missing, None or NaN
    values render as "" in the CSV and "-" in the TXT.
    """
    out_dir = pathlib.Path(out_dir)
    columns = _columns(results)
    fields = tuple(c[0] for c in columns)
    rows = [_complete(r, fields) for r in results]
    csv_rows = [{f: cell(r[f], kind, for_csv=True) for f, _, kind in columns} for r in rows]
    txt, csv_path = out_dir / "results_table.txt", out_dir / "results_table.csv"
    atomic_write_bytes(txt, results_txt(results, title, sweeps).encode())
    write_csv(csv_path, csv_rows, fields)
    paths = [txt, csv_path]
    if sweeps:
        paths.append(out_dir / "lr_sensitivity.csv")
        write_csv(paths[-1], [{f: cell(r.get(f), kind, for_csv=True) for f, _, kind in LR_COLUMNS}
                              for r in sweeps], tuple(c[0] for c in LR_COLUMNS))
    return paths


def write_results(out_dir: pathlib.Path, results: Sequence, reference: str | None = None,
                  title: str = "MiniGPT experiment results") -> list[pathlib.Path]:
    """The run's tables from its loop.Results: `table_rows` and `sweep_rows` written by
    `write_results_table`. reference: the experiment others are compared with (default
    `baseline` where it ran, else the first; `seeds.reference`)."""
    return write_results_table(out_dir, table_rows(results, reference), title,
                               sweep_rows(results))


def table_rows(results: Sequence, reference: str | None = None) -> list[dict]:
    """One `row` per run; with several seeds of an experiment, each with its seed, and one
    summary row per experiment after them (SUMMARY_FIELDS)."""
    rows = [row(r) for r in results]
    if not seeds.several(results):
        return rows
    for r, out in zip(results, rows):
        out["seed"] = r.config.seed
    for e in seeds.experiment_stats(results, reference):
        first = row(e.runs[0])
        ok = sum(r.status == "ok" for r in e.runs)
        vs = e.vs_reference
        rows.append({
            "experiment": e.name, "overrides": first["overrides"],
            "parameters": first["parameters"],
            "status": "ok" if ok == len(e.runs) else f"{ok} of {len(e.runs)} seeds ok",
            "seeds": e.val.n, "val_loss_mean": e.val.mean, "val_loss_std": e.val.std,
            "val_loss_ci95": e.val.ci95, "train_loss_mean": e.train.mean,
            "train_loss_std": e.train.std, "train_loss_ci95": e.train.ci95,
            "delta_val_loss": None if vs is None else vs.mean,
            "delta_ci95": None if vs is None else vs.ci95,
            "p_value": None if vs is None else vs.p,
        })
    return rows


def sweep_rows(results: Sequence) -> list[dict]:
    """One row (LR_COLUMNS) per shape swept over learning rates (`seeds.lr_sweeps`)."""
    return [{"experiments": " ".join(s.experiments), "lrs": " ".join(f"{lr:g}" for lr in s.lrs),
             "seeds": s.summary.n, "lr_sensitivity": s.summary.mean,
             "lr_sensitivity_std": s.summary.std, "lr_sensitivity_ci95": s.summary.ci95,
             "best_lr": f"{s.best_lr:g}"} for s in seeds.lr_sweeps(results)]


def row(result) -> dict:
    """A loop.Result as one row of the table (keys: RESULT_FIELDS)."""
    rows, last = result.rows, (result.rows[-1] if result.rows else {})
    val = result.val_rows[-1] if result.val_rows else {}
    final = result.final_eval
    loss = seeds.final_train(rows)
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
