"""A scaling-law study: train a grid of shapes x token budgets, fit L(N, D) = E + A/N^alpha +
B/D^beta with bootstrap intervals, check a held-out prediction, state the compute-optimal size
(docs/scaling.md).

Examples:
  python scripts/scaling.py --widths 16,32,64 --depths 1,2 --tokens 10k,20k,40k,80k
  python scripts/scaling.py --widths 64,128,256 --depths 2,4 --tokens 0.1ep,0.3ep,1ep
  python scripts/scaling.py --widths 32,64,128 --tokens 20k,40k,80k --tune-lr 3e-4,1e-3,3e-3
  python scripts/scaling.py --fit other_runs.csv --out outcome/fit  # N, D, loss; trains nothing

Writes under --out: runs/<shape>_lr<lr>/ (ordinary run folders), scaling_table.{csv,txt},
scaling_fit.json, scaling_*.png and the "Scaling law" section of report.md. Re-running trains
only what is missing. Exit codes: 0 done; 2 bad input (one line; nothing trained).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from minigpt_jax import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("scaling.py", __doc__)
    add = p.add_argument
    add("--widths", default="16,32,64", help="embed_dim of each shape, comma-separated")
    add("--depths", default="1,2", help="n_layers of each shape, comma-separated")
    add("--heads", default="4", help="n_heads of every shape; every width must divide by it")
    add("--tokens", default="10k,20k,40k", help="token budgets per shape: counts with k, M or G"
        " (1M) or fractions of an epoch (0.5ep); training label tokens")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", help="one constant lr for every shape (default: the config's, 5e-4)")
    lr.add_argument("--tune-lr", metavar="LRS", help="comma-separated lrs swept per shape over the"
                    " smallest budget; each shape trains with its best")
    add("--count", default="nonembed", help="N in the fit: nonembed (default: the vocabulary"
        " matrices are most parameters at these widths and do not grow with depth) or all")
    add("--fit", metavar="TABLE.csv", help="fit a table's columns N, D, loss (C if present)"
        " instead of training")
    add("--data", help="training data, as run.py --data (default: the embedded corpus)")
    add("--out", default="outcome/scaling", help="output folder (default: outcome/scaling)")
    add("--devices", help="indices into jax.devices() for the runs, as run.py --devices")
    cli.add_overrides(p, "config override for every run, repeatable (e.g. --set batch_size=16)")
    add("--seed", help="shorthand for --set seed=S (initialisation, data order, dropout)")
    add("--resamples", default="200", help="bootstrap resamples for the intervals (default 200)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from minigpt_jax import config as cfg
    from minigpt_jax import runner, scaling
    from minigpt_jax import scaling_law as law

    try:
        resamples = runner.positive_int("--resamples", args.resamples)
        if args.fit is not None:
            runner.check_out_dir(pathlib.Path(args.out))
            cols = law.read_table(args.fit)
            rows = [dict(zip(cols, v)) for v in zip(*cols.values())]
            summary = scaling.analyse(rows, args.out, "given", resamples)
        else:
            overrides = cfg.parse_overrides(args.overrides)
            if args.seed is not None:
                overrides["seed"] = cfg.parse_value("seed", args.seed)
            heads = runner.positive_int("--heads", args.heads)
            tune = ([cfg.parse_value("lr", t) for t in args.tune_lr.split(",")]
                    if args.tune_lr else [])
            study = scaling.Study(
                scaling.shapes(scaling.int_list("--widths", args.widths),
                               scaling.int_list("--depths", args.depths), heads),
                scaling.budgets(args.tokens),
                lr=cfg.parse_value("lr", args.lr) if args.lr else None, tune_lrs=tuple(tune),
                count=args.count, overrides=overrides, resamples=resamples)
            devices = None
            if args.devices is not None:
                from minigpt_jax import placement

                devices = placement.device_indices(args.devices)
            summary = scaling.run_study(study, args.out, data=args.data, devices=devices)
    except ValueError as e:  # ScalingError, FitError, RunError, ConfigError, DataError...
        return cli.error("scaling.py", str(e))
    print(f"scaling.py: alpha {summary['alpha']['value']:.3g}, beta {summary['beta']['value']:.3g};"
          f" report in {args.out}/report.md", file=sys.stderr)
    for w in summary["warnings"]:
        print(f"scaling.py: warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code) if code == 2 else sys.exit(code)
