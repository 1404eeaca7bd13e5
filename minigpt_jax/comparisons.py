"""report.md's comparisons: which experiment trained better, said only as far as the numbers go.

- Every sentence that orders two experiments carries its 95% interval and
  p-value, or says that the difference is within the noise (and, over seeds,
  roughly how many seeds would resolve it: `stats.seeds_to_resolve`), or that it
  cannot be tested and why (`verdict`, the one place the wording is chosen).
- Several seeds: experiments are ranked by their mean final validation loss and
  compared seed by seed (`seeds.experiment_stats`); a table of each experiment's
  spread over seeds and, where the runs include an lr sweep, its LR sensitivity
  (`section`).
- One seed: runs are ranked by final validation loss against the held-out
  sample's noise, paired per segment where both runs evaluated the same
  segments (`seeds.heldout`); that says nothing of the seed-to-seed spread, and
  the page says so.
"""

from __future__ import annotations

import math
import pathlib
import urllib.parse
from collections.abc import Mapping, Sequence

from minigpt_jax import seeds, stats, tables

_f = tables.number


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _interval(d: stats.Paired) -> str:
    return f"95% CI {d.mean - d.ci95:+.4f} to {d.mean + d.ci95:+.4f}"


def _difference(a: str, b: str, d: stats.Paired) -> str:
    return f"{a} − {b}: {_interval(d)}"


def verdict(a: str, b: str, d: stats.Paired, what: str = "final validation loss",
            over: str = "seeds") -> str:
    """One sentence on a minus b (`d`), chosen by the numbers: a significant difference with
    its interval and p-value; one within the noise, with the seeds that would resolve it
    (over seeds) or the held-out segments it was measured on; or why no test was made."""
    if not math.isfinite(d.mean):
        return f"`{a}` and `{b}` cannot be compared: {d.why_not or 'a loss is missing'}."
    if not d.made:
        return (f"`{a}` is {abs(d.mean):.4f} {'below' if d.mean < 0 else 'above'} `{b}` in"
                f" {what}, untested: {d.why_not}.")
    paired = (f"{d.n} paired seeds" if over == "seeds" else
              f"{d.n:,} held-out segments, paired" if d.n else
              "two unpaired standard errors: different held-out segments")
    numbers = f"{_difference(a, b, d)}, {p_text(d.p)}; {paired}"
    if d.significant:
        side = "lower (better)" if d.mean < 0 else "higher (worse)"
        return f"`{a}` is {side} than `{b}` by {abs(d.mean):.4f} in {what} ({numbers})."
    head = f"`{a}` and `{b}` differ by {d.mean:+.4f} in {what} ({numbers}): within the"
    if over != "seeds":
        return f"{head} held-out sample's noise."
    n = stats.seeds_to_resolve(d.mean, d.std)
    more = (f"about {n} seeds would resolve a difference this size" if n is not None
            else f"more than {stats.MAX_SEEDS} seeds would be needed to resolve it")
    return (f"{head} seeds' noise; {more} ({stats.POWER:.0%} power at p < {stats.ALPHA},"
            " from the observed spread).")


ONE_SEED = ("Each experiment ran one seed: these intervals are the held-out sample's noise only;"
            " how much of each gap another seed would erase is not measured (run with --seeds 3"
            " or more to measure it).")


def ranking(results: Sequence, rows: Mapping[str, dict], reference: str | None = None
            ) -> list[str]:
    """The validation ranking's sentences: over seeds where an experiment ran several, else
    run by run against the held-out noise."""
    if seeds.several(results):
        return _ranking_over_seeds(results, reference)
    ranked = sorted((r for r in results if rows[r.name]["val_loss"] is not None),
                    key=lambda r: rows[r.name]["val_loss"])
    if not ranked:
        return []
    best, b = ranked[0], rows[ranked[0].name]
    fe = best.final_eval
    over = (f" over {fe.tokens:,} held-out label tokens ({fe.segments:,} segments), standard"
            f" error {_f(fe.stderr, '.4f')}" if fe is not None else "")
    notes = [f"`{best.name}` reached the lowest validation loss, {b['val_loss']:.4f}"
             f" (perplexity {_f(b['val_perplexity'], ',.2f')}){over}."]  # diverged: "-"
    if len(ranked) == 1:
        return notes
    order, said = [f"`{best.name}`"], []
    for prev, r in zip(ranked, ranked[1:]):
        d, _ = seeds.heldout(prev, r)
        order.append(("< " if d.significant else "≈ ") + f"`{r.name}`")
        said.append(verdict(prev.name, r.name, d, over="held-out segments"))
    notes.append("Ranking by final validation loss (≈: not resolved by the held-out sample,"
                 " p ≥ 0.05 or untested):"
                 f" {' '.join(order)}. " + " ".join(said))
    return notes + [ONE_SEED]


def _ranking_over_seeds(results: Sequence, reference: str | None) -> list[str]:
    exps = [e for e in seeds.experiment_stats(results, reference) if e.val.n]
    if not exps:
        return []
    ref = seeds.reference(results, reference)
    ranked = sorted(exps, key=lambda e: e.val.mean)
    best = ranked[0]
    notes = [f"`{best.name}` reached the lowest mean final validation loss over {best.val.n}"
             f" seed{'s' * (best.val.n != 1)}, {best.val.mean:.4f}"
             + (f" ± {best.val.ci95:.4f} (95% CI, Student's t)."
                if math.isfinite(best.val.ci95) else ".")]
    runs = {e.name: e.runs for e in exps}
    order, said = [f"`{best.name}`"], []
    for prev, e in zip(ranked, ranked[1:]):
        d = seeds.compare(prev.runs, e.runs)
        order.append(("< " if d.significant else "≈ ") + f"`{e.name}`")
        said.append(verdict(prev.name, e.name, d))
    if len(ranked) > 1:
        notes.append("Ranking by mean final validation loss, neighbours compared seed by seed"
                     " (≈: not resolved, paired t-test p ≥ 0.05): " + " ".join(order) + ". "
                     + " ".join(said))
    said_pairs = {frozenset((a.name, b.name)) for a, b in zip(ranked, ranked[1:])}
    against = [verdict(e.name, ref, e.vs_reference) for e in exps
               if e.vs_reference is not None and ref in runs
               and frozenset((e.name, ref)) not in said_pairs]
    if against:
        notes.append(f"Against the reference, `{ref}` (the others): " + " ".join(against))
    return notes


def at_tokens(results: Sequence, equal: tuple[int, dict[str, float]] | None) -> list[str]:
    """The train losses at the most tokens every run reached (`report.loss_at_tokens`): the
    lowest against the runner-up, tested over seeds where there are several."""
    if not equal:
        return []
    t, losses = equal
    head = f"At {t:,} tokens seen (the most every run reached), the smoothed train loss was "
    if not seeds.several(results):
        order = sorted(losses, key=losses.get)
        return [head + ", ".join(f"`{n}` {_f(losses[n], '.4f')}" for n in order)
                + f": `{order[0]}` lowest, {_f(losses[order[-1]] - losses[order[0]], '.4f')}"
                f" below `{order[-1]}` (one seed per experiment: not tested against the spread"
                " between seeds)."]
    by = {e: [r for r in rs if r.name in losses] for e, rs in seeds.groups(results).items()}
    by = {e: rs for e, rs in by.items() if rs}
    mean = {e: sum(losses[r.name] for r in rs) / len(rs) for e, rs in by.items()}
    order = sorted(mean, key=mean.get)
    text = (head + "(mean over seeds) " + ", ".join(f"`{e}` {_f(mean[e], '.4f')}" for e in order)
            + f": `{order[0]}` lowest.")
    if len(order) > 1:
        d = seeds.compare(by[order[0]], by[order[1]], lambda r: losses[r.name])
        text += " " + verdict(order[0], order[1], d, f"train loss at {t:,} tokens")
    return [text]


def section(out_dir: pathlib.Path, results: Sequence, reference: str | None = None) -> str:
    """### Over seeds (several seeds: each experiment's spread and its paired difference from
    the reference, with its banded plots) and ### LR sensitivity (an lr sweep); "" when
    neither applies."""
    out = []
    if seeds.several(results):
        ref = seeds.reference(results, reference)
        rows = []
        for e in seeds.experiment_stats(results, reference):
            vs = e.vs_reference
            rows.append([e.name, str(e.val.n), _pm(e.val), _f(e.val.std, ".4f"), _pm(e.train),
                         "reference" if vs is None else _diff(vs),
                         "-" if vs is None or not vs.made else p_text(vs.p)])
        out += ["### Over seeds", "",
                (f"Final validation loss (the final evaluation, the same held-out sample for"
                 f" every seed) and smoothed final train loss: mean ± 95% interval (Student's t)"
                 f" over seeds; Δ: mean paired difference from `{ref}` seed by seed with its 95%"
                 " interval, p: paired t-test (scipy.stats.ttest_rel). The same numbers are the"
                 " summary rows of results_table.csv."), "",
                tables.markdown(["experiment", "seeds", "val loss", "val std",
                                 "smoothed train loss", "Δ val loss", "p"], rows,
                                set(range(1, 7))), ""]
        figs = [f"{stem}_curve_{n}.png" for n in seeds.groups(results)
                for stem in ("loss", "perplexity")]
        figs = [f for f in figs if (pathlib.Path(out_dir) / f).is_file()]
        if figs:
            out += [("Each experiment over its seeds (line: mean; band: min to max over seeds;"
                     " each seed's own curves are loss_curve_<run>.png where written):"), "",
                    *[f"![{f[:-4]}]({urllib.parse.quote(f)})" for f in figs], ""]
    sweeps = seeds.lr_sweeps(results)
    if sweeps:
        rows = [[", ".join(f"`{n}`" for n in s.experiments), " ".join(f"{lr:g}" for lr in s.lrs),
                 str(s.summary.n), _pm(s.summary), f"{s.best_lr:g}"] for s in sweeps]
        out += ["### LR sensitivity", "",
                ("Wortsman et al. (2023): the mean over the swept learning rates of min(loss at"
                 " initialisation, final validation loss at that lr) minus the sweep's best final"
                 " validation loss, per shape; lower is a shape less sensitive to its lr. The loss"
                 " at initialisation is the first step's training loss; a diverged lr counts as"
                 " it. Mean ± 95% interval over seeds (one seed: no interval)."), "",
                tables.markdown(["experiments", "lrs", "seeds", "LR sensitivity", "best lr"],
                                rows, {2, 3, 4}), ""]
    return "\n".join(out)


def _pm(s: stats.Summary) -> str:
    if not s.n:
        return "-"
    return f"{s.mean:.4f}" + (f" ± {s.ci95:.4f}" if math.isfinite(s.ci95) else "")


def _diff(d: stats.Paired) -> str:
    if not math.isfinite(d.mean):
        return "-"
    return f"{d.mean:+.4f}" + (f" ({_interval(d)})" if d.made else f" ({d.why_not})")


