"""outcome/report.md: the seed report's four sections, filled from the run's own numbers.

- 1 Model (the parameter tree as built, and each experiment's parameter count
  split), 2 Data (the Prepared statistics), 3 Training setup and experiments
  (settings all share, then what differs per experiment), 4 Results (the
  results table, the plots, observations).
- Pure: the page is a function of the Results, the Prepared data and a few
  facts about the invocation (`report_text`); `write_report` writes it
  atomically, with an HTML rendering beside it when markdown-it-py (which flax
  already brings, through rich) is importable.
- Every Result is one row whatever its name, so failed and stopped
  experiments, sweeps and stacked variants appear without being named here.
  The numbers in the tables are `tables.row(result)`, the same values as
  results_table.csv.
- Observations are computed, never written by hand: the validation ranking and
  margins, failures and stops, losses that ended above their start, and the
  train loss of every experiment at the most tokens all of them reached (the
  smoothed curve of the comparison plot, interpolated). Every sentence that
  compares experiments, and the over-seeds and LR sensitivity tables, are
  `comparisons`' (its interval and p-value, or why the numbers cannot order them).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import urllib.parse
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from minigpt_jax import comparisons, data, files, model, optim, plots, seeds, tables
from minigpt_jax.config import Config, num_params

FILE = "report.md"
PHASES = ("data", "segment", "compile", "train", "final_eval", "outputs")  # Result.phases keys
_BLOCK_ORDER = ("ln1", "attn.qkv", "attn.proj", "ln2", "ffn.fc1", "ffn.fc2")  # forward order


# --- formatting ----------------------------------------------------------------------------

def _n(v) -> str:
    return tables.number(v, ",d")


_f = tables.number


_table = tables.markdown


def _link(file: str) -> str:
    return urllib.parse.quote(file)


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


# --- 1 model ---------------------------------------------------------------------------------

def parameter_shapes(c: Config) -> dict[str, dict[str, tuple]]:
    """{module path: {parameter: shape}} of MiniGPT(c) as built (shapes only, nothing computed),
    in forward order."""
    tree = jax.eval_shape(lambda: model.init_params(c, jax.random.PRNGKey(0)))
    modules: dict[str, dict[str, tuple]] = {}
    for path, leaf in flatten_dict(tree).items():
        modules.setdefault(".".join(path[:-1]), {})[path[-1]] = tuple(leaf.shape)

    def rank(m: str):
        top, _, rest = m.partition(".")
        if top.startswith("layers_") and top[7:].isdigit():
            inner = _BLOCK_ORDER.index(rest) if rest in _BLOCK_ORDER else len(_BLOCK_ORDER)
            return (2, int(top[7:]), inner, rest)
        return ({"embed": 0, "pos": 1, "ln_f": 3, "head": 4}.get(top, 5), 0, 0, m)

    return {m: modules[m] for m in sorted(modules, key=rank)}


def parameter_split(c: Config) -> dict[str, int]:
    """Parameters by part: embedding (V x D), positional (seq_len x D), blocks, ln_f, head
    (D x V); their sum is config.num_params."""
    parts = {"embedding": 0, "positional": 0, "blocks": 0, "ln_f": 0, "head": 0}
    for m, params in parameter_shapes(c).items():
        top = m.partition(".")[0]
        part = {"embed": "embedding", "pos": "positional", "ln_f": "ln_f", "head": "head"}.get(
            top, "blocks")
        parts[part] += sum(math.prod(s) for s in params.values())
    return parts


def _arch_key(c: Config) -> tuple:
    return (c.vocab_size, c.seq_len, c.embed_dim, c.n_heads, c.n_layers, c.ffn_mult)


def model_section(results) -> str:
    archs: dict[tuple, list] = {}
    for r in results:
        archs.setdefault(_arch_key(r.config), []).append(r)
    out = ["## 1. Model", "",
           ("A decoder-only transformer: token embedding plus a learned positional table, pre-norm"
            " blocks (`x + attn(ln1(x))`, `x + ffn(ln2(x))`) under a causal mask, a final LayerNorm"
            " `ln_f` and an untied linear `head` to the vocabulary. Shapes as built by"
            " `minigpt_jax.model`; Dense kernels are (in, out), the transpose of PyTorch's"
            " weight."),
            ""]
    labels = [chr(ord("A") + i) if i < 26 else f"A{i}" for i in range(len(archs))]
    for label, (key, rs) in zip(labels, archs.items()):
        c = rs[0].config
        out.append(f"- **{label}**: {_names([r.name for r in rs])}: D {c.embed_dim}, {c.n_heads}"
                   f" heads of {c.head_dim}, {c.n_layers} layer{'s' * (c.n_layers != 1)},"
                   f" FFN {c.ffn_dim}, vocabulary {c.vocab_size:,}, {c.seq_len} positions")
    shapes = [parameter_shapes(rs[0].config) for rs in archs.values()]
    modules: list[str] = []
    for tree in shapes:  # module names with the layer index written i, in forward order
        for m in tree:
            top, dot, rest = m.partition(".")
            name = f"layers_i{dot}{rest}" if top.startswith("layers_") else m
            if name not in modules:
                modules.append(name)
    rows = []
    for m in modules:
        cells = []
        for tree, rs in zip(shapes, archs.values()):
            n = rs[0].config.n_layers if m.startswith("layers_i") else 1
            p = tree.get(m.replace("layers_i", "layers_0"))
            if p is None:
                cells.append("-")
                continue
            count = sum(math.prod(v) for v in p.values())
            text = ", ".join(f"{k} {v}" for k, v in p.items())
            cells.append(f"{text} = {n} x {count:,}" if n > 1 else f"{text} = {count:,}")
        rows.append([f"`{m}`", *cells])
    out += ["", "Layer list (`layers_i` is each of the n_layers blocks, i = 0..n_layers-1):", "",
            _table(["module", *labels], rows), ""]
    split_rows = []
    for r in results:
        s = parameter_split(r.config)
        split_rows.append([r.name, *(_n(v) for v in s.values()), _n(num_params(r.config))])
    out += ["Parameters per experiment (`ln_f` on its own line: the final LayerNorm, 2 x D):", "",
            _table(["experiment", "embedding", "positional", "blocks", "ln_f", "head", "total"],
                   split_rows, right=set(range(1, 7))), ""]
    return "\n".join(out)


# --- 2 data ----------------------------------------------------------------------------------

def data_section(results, prepared: Mapping[str, data.Prepared], source: str) -> str:
    out = ["## 2. Data", "", f"Source: {source}.", ""]
    groups: dict[int, list] = {}
    for r in results:
        if r.name in prepared:
            groups.setdefault(id(prepared[r.name]), []).append(r)
    for rs in groups.values():
        p, c = prepared[rs[0].name], rs[0].config
        if len(groups) > 1:
            out += [(f"### {_names([r.name for r in rs])} (seq_len {c.seq_len}, segmentation"
                     f" {c.segmentation}, val_fraction {c.val_fraction}, data_seed {c.data_seed})"), ""]
        rule = ("sequences of 32..128 tokens kept whole, longer ones cut into seq_len segments,"
                " shorter ones dropped" if c.segmentation == "pytorch"
                else "every token, in consecutive seq_len chunks")
        kept = len(p.train) + len(p.val)
        out += [
            f"- Sequences read: {p.sequences:,} ({p.tokens:,} tokens)",
            (f"- Segmentation ({c.segmentation}: {rule}; each segment truncated or PAD-filled to"
             f" {c.seq_len}): {kept:,} segments kept; {p.dropped_sequences:,} sequences dropped"
             f" whole, {p.dropped_tails:,} tails dropped, {p.dropped_tokens:,} tokens in no"
             " segment"),
            (f"- Held-out split (val_fraction {c.val_fraction}, by whole source sequence):"
             f" {p.held_out:,} sequences held out -> {len(p.val):,} validation and"
             f" {len(p.train):,} training segments"),
            (f"- Training labels (non-PAD targets): {p.label_tokens:,}; PAD share of the training"
             f" segments: {100 * p.pad_share:.1f}%"),
        ]
        batch_sizes = sorted({r.config.batch_size for r in rs})
        per = ", ".join(f"batch {b}: {data.steps_per_epoch(len(p.train), b):,}"
                        for b in batch_sizes)
        out += [f"- Steps per epoch: {per}", ""]
    return "\n".join(out)


# --- 3 training setup ------------------------------------------------------------------------

_OPTIM_FIELDS = ("lr", "weight_decay", "decay_params", "lr_schedule", "warmup_steps",
                 "min_lr_ratio", "grad_clip")


def optimizer_text(c: Config) -> str:
    sched = ("constant" if c.lr_schedule == "constant"
             else f"cosine down to {c.min_lr_ratio} x lr")
    warm = f", {c.warmup_steps} warmup steps" if c.warmup_steps else ", no warmup"
    clip = f", gradients clipped to global norm {c.grad_clip}" if c.grad_clip else ", no clipping"
    eps = f"{optim.EPS:.0e}".replace("e-0", "e-")
    return (f"AdamW (betas {optim.B1}, {optim.B2}, eps {eps}), learning rate {c.lr:g}"
            f" ({sched}{warm}), weight decay {c.weight_decay:g} on {c.decay_params} parameters"
            + clip)


def setup_section(results, run: Mapping[str, object]) -> str:
    out = ["## 3. Training setup and experiments", ""]
    opts: dict[str, list] = {}
    for r in results:
        opts.setdefault(optimizer_text(r.config), []).append(r.name)
    if len(opts) == 1:
        out.append(f"- Optimizer: {next(iter(opts))}")
    else:
        out += ["- Optimizer:"] + [f"  - {_names(n)}: {t}" for t, n in opts.items()]
    configs = [r.config.to_dict() for r in results]
    fields = list(configs[0]) if configs else []
    common = [f for f in fields if all(c[f] == configs[0][f] for c in configs)]
    differ = [f for f in fields if f not in common]
    if common:
        out.append("- Settings all experiments share: "
                   + ", ".join(f"{f} {configs[0][f]}" for f in common if f not in _OPTIM_FIELDS))
    out.append("- Loss: cross entropy over non-PAD labels, perplexity = exp(loss); validation"
               " every eval_every steps on a fixed sample of eval_batches held-out batches, and"
               " at the last step on a seeded sample of at most eval_final_batches batches (0:"
               " every held-out segment), reported with its standard error over segments")
    out += [f"- {k}: {v}" for k, v in run.items()]
    rows = []
    for r, c in zip(results, configs):
        row = tables.row(r)
        rows.append([r.name, row["overrides"] or "-", *(c[f] for f in differ), r.device,
                     _n(row["steps"]), _n(row["tokens"]), _f(row["wall_seconds"], ",.1f"),
                     _f(row["tokens_per_second"], ",.0f")])
    header = ["experiment", "overrides", *differ, "device", "steps", "tokens", "wall s", "tokens/s"]
    right = set(range(len(header) - 4, len(header)))
    phases = [[r.name, *(_f(r.phases.get(k), ",.1f") for k in PHASES)] for r in results]
    out += ["", ("Experiments (wall s: this invocation's time, training, evaluation and"
                 " checkpoints; tokens/s: label tokens over the training time, resumes"
                 " included):"), "",
            _table(header, rows, right), "",
            "Where the time went, per experiment (seconds; data and segmentation are shared by"
            " the experiments that read the same data):", "",
            _table(["experiment", *PHASES], phases, set(range(1, len(PHASES) + 1))), ""]
    return "\n".join(out)


# --- 4 results -------------------------------------------------------------------------------

def loss_at_tokens(results) -> tuple[int, dict[str, float]] | None:
    """(T, {name: smoothed train loss at T tokens}): T the most tokens every experiment with
    finite losses reached; the smoothed curve is the comparison plot's, interpolated."""
    curves = {}
    for r in results:
        tokens = np.array([row["tokens"] for row in r.rows], float)
        sm = plots.smooth([row["loss"] for row in r.rows])
        ok = np.isfinite(sm)
        if ok.sum() >= 2:
            curves[r.name] = (tokens[ok], sm[ok])
    if len(curves) < 2:
        return None
    t = min(x[-1] for x, _ in curves.values())
    return int(t), {n: float(np.interp(t, x, y)) for n, (x, y) in curves.items()}


def observations(results, stacked: bool = False, reference: str | None = None) -> list[str]:
    """Sentences computed from the numbers; those comparing experiments are comparisons'."""
    rows = {r.name: tables.row(r) for r in results}
    notes = []
    notes += comparisons.ranking(results, rows, reference)
    for r in results:
        if r.status != "ok":
            last = (f" after {r.steps:,} steps and {r.tokens:,} tokens" if r.rows
                    else " before its first step")
            notes.append(f"`{r.name}` did not finish: {r.status}{last}.")
        sm = plots.smooth([row["loss"] for row in r.rows])
        sm = sm[np.isfinite(sm)]
        if len(sm) >= 2 and sm[-1] > sm[0]:
            notes.append(f"`{r.name}` diverged: its smoothed train loss ended at"
                         f" {_f(sm[-1], '.4f')}, above its start, {_f(sm[0], '.4f')}.")
    notes += comparisons.at_tokens(results, loss_at_tokens(results))
    rates = sorted((row["tokens_per_second"], n) for n, row in rows.items()
                   if row["tokens_per_second"])
    # finished experiments only: a failed or stopped one's last evaluation predates its last step
    gaps = [(row["val_loss"] - row["train_loss"], n) for n, row in rows.items()
            if row["status"] == "ok" and None not in (row["val_loss"], row["train_loss"])]
    if gaps:
        notes.append("Validation minus smoothed train loss at the end (a large positive gap is"
                     " over-fitting): "
                     + ", ".join(f"`{n}` {g:+.4f}" for g, n in gaps) + ".")
    if len(rates) >= 2:
        devices = sorted({r.device for r in results})
        together = stacked or any(r.stacked > 1 for r in results)  # --stack, or seeds
        how = (f"all on {devices[0]}, those in one stack trained together (tokens/s: the"
               " stack's, shared)" if together and len(devices) == 1
               else f"all on {devices[0]}, one after another" if len(devices) == 1
               else f"on {len(devices)} devices, those on distinct devices at the same time,"
               " sharing the host")
        notes.append(f"Throughput ranged from {rates[0][0]:,.0f} tokens/s (`{rates[0][1]}`) to"
                     f" {rates[-1][0]:,.0f} (`{rates[-1][1]}`); {how}.")
    return notes or ["No experiment wrote a metric row: there is nothing to compare."]


def results_section(out_dir: pathlib.Path, results, stacked: bool = False,
                    reference: str | None = None) -> str:
    rows = []
    for r in results:
        row = tables.row(r)
        rows.append([r.name, row["status"], _n(row["steps"]), _n(row["tokens"]),
                     _f(row["final_loss"], ".4f"), _f(row["train_loss"], ".4f"),
                     _f(row["train_perplexity"], ",.2f"), _f(row["val_loss"], ".4f"),
                     _f(row["val_perplexity"], ",.2f")])
    out = ["## 4. Results", "",
           ("Final loss is the last step's; smoothed loss and perplexity are the mean of the last"
            " smoothing window (the end of the plotted curve); validation is the last evaluation."
            " The same numbers, unrounded, are in [results_table.csv](results_table.csv)."), "",
           _table(["experiment", "status", "steps", "tokens", "final loss", "smoothed loss",
                   "smoothed ppl", "val loss", "val ppl"], rows, right=set(range(2, 9))), "",
           comparisons.section(out_dir, results, reference),
           "### Observations", "", *[f"- {n}" for n in observations(results, stacked, reference)],
           ""]
    plots = [f for f in ("loss_curves.png", "perplexity_curves.png") if (out_dir / f).is_file()]
    if plots:
        out += ["### Comparison (x axis: label tokens seen)", ""]
        out += [f"![{f[:-4].replace('_', ' ')}]({_link(f)})" for f in plots] + [""]
    for r in results:
        if len(seeds.groups(results)[seeds.experiment(r)]) > 1:
            continue  # a seed of an experiment: its band is in Over seeds
        files = [f for f in (f"loss_curve_{r.name}.png", f"perplexity_curve_{r.name}.png")
                 if (out_dir / f).is_file()]
        out += [f"### {r.name}", ""]
        if not files:
            why = "the PNGs are missing" if r.rows else "no metric row was written"
            out += [f"No curves: {why} ({r.status}).", ""]
        out += [f"![{f[:-4]}]({_link(f)})" for f in files] + ([""] if files else [])
    return "\n".join(out)


# --- the page --------------------------------------------------------------------------------

def source_text(seqs) -> str:
    """How the report names a `data.Sequences`: where it came from and its format."""
    fmt = {"rows": "padded rows, sample_dataset.pt format",
           "tokenized": "token sequences, tokenized_data.pt format"}.get(seqs.kind, seqs.kind)
    if seqs.source == "default corpus":
        fmt = "Python's own docs, GPT-2 BPE, embedded"
    return f"{seqs.source} ({fmt})"


def data_statistics(seqs, results) -> dict[str, data.Prepared]:
    """Experiment name -> its data.Prepared with the segments dropped (only their count is
    reported): a sweep over more data settings than `data.prepare` keeps does not hold every
    copy of the segments at once."""
    by_key: dict[tuple, data.Prepared] = {}
    for r in results:
        key = data.prepare_key(r.config)
        if key not in by_key:
            p = data.prepare(seqs, r.config)
            by_key[key] = dataclasses.replace(p, train=np.empty((len(p.train), 0), np.int32),
                                              val=np.empty((len(p.val), 0), np.int32))
    return {r.name: by_key[data.prepare_key(r.config)] for r in results}


def report_text(out_dir: pathlib.Path, results: Sequence, prepared: Mapping[str, data.Prepared],
                source: str, run: Mapping[str, object] | None = None,
                reference: str | None = None) -> str:
    """The page as Markdown; out_dir is only looked at for which plots exist."""
    out_dir = pathlib.Path(out_dir)
    ok = sum(r.status == "ok" for r in results)
    head = [(f"# MiniGPT report: {len(results)} experiment{'s' * (len(results) != 1)},"
             f" {ok} finished"), "",
            ("Written by `scripts/run.py` from this run's numbers; the per-step values are in"
             " `metrics_<name>.csv`, the results in `results_table.csv`."), ""]
    return "\n".join(head + [model_section(results), data_section(results, prepared, source),
                             setup_section(results, run or {}),
                             results_section(out_dir, results, (run or {}).get("Stacked") == "yes",
                                             reference)])


def write_report(out_dir: pathlib.Path, results: Sequence, prepared: Mapping[str, data.Prepared],
                 source: str, run: Mapping[str, object] | None = None,
                 reference: str | None = None) -> pathlib.Path:
    """Write out_dir/report.md (and report.html where markdown-it-py is importable) atomically.

    results: loop.Result, one row each; prepared: experiment name -> its data.Prepared;
    source: the data's name and format (`source_text`); run: facts about the invocation
    (label -> value), listed in the training setup; reference: the experiment the others are
    compared with over seeds (`seeds.reference`: default `baseline`, else the first).
    """
    out_dir = pathlib.Path(out_dir)
    return _write_page(out_dir / FILE,
                       report_text(out_dir, results, prepared, source, run, reference))


def write_section(out_dir: pathlib.Path, heading: str, body: str) -> pathlib.Path:
    """Put `## heading` with `body` into out_dir/report.md: replace that section where the page
    has one (up to the next `## ` heading), else append it; a page that does not exist yet
    starts with it. Studies (seeds, tuning, scaling) add their sections this way."""
    path = pathlib.Path(out_dir) / FILE
    text = path.read_text() if path.exists() else "# MiniGPT report\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == f"## {heading}"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    return _write_page(path, text)


def _write_page(path: pathlib.Path, text: str) -> pathlib.Path:
    """report.md, and report.html beside it where markdown-it-py is importable, atomically."""
    files.atomic_write_bytes(path, text.encode())
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return path
    body = MarkdownIt("commonmark").enable("table").render(text)
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>MiniGPT report</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            f"</head><body>\n{body}</body></html>\n")
    files.atomic_write_bytes(path.with_suffix(".html"), page.encode())
    return path
