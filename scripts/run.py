"""Train the MiniGPT experiments and write their results under outcome/.

Examples:
  python scripts/run.py                                 # all five, default corpus
  python scripts/run.py --experiments baseline --max-steps 20
  python scripts/run.py --set seq_len=128 --set lr=3e-4
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from minigpt_jax import config as cfg  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiments", default=",".join(cfg.EXPERIMENTS),
                   help="comma-separated experiments to run (default: all: %(default)s)")
    p.add_argument("--out", default=str(REPO / "outcome"),
                   help="output folder for metrics, plots, tables and checkpoints (default: outcome/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every experiment, e.g. --set lr=3e-4;"
                        f" repeatable. Keys: {', '.join(cfg.field_names())}")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop each experiment after N steps (default: max_epochs over the data)")
    p.add_argument("--seed", type=int, default=None, help="shorthand for --set seed=S")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"run.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = cfg.parse_overrides(args.overrides)
        if args.seed is not None:
            overrides["seed"] = args.seed
        names = [n.strip() for n in args.experiments.split(",") if n.strip()]
        if not names:
            raise cfg.ConfigError("--experiments is empty; valid: " + ", ".join(cfg.EXPERIMENTS))
        configs = {n: cfg.experiment_config(n, overrides) for n in names}
        if args.max_steps is not None and args.max_steps <= 0:
            raise cfg.ConfigError(f"--max-steps {args.max_steps}: must be a positive integer")
    except cfg.ConfigError as e:
        fail(str(e))

    # Heavy imports after the arguments are known to be good: --help stays fast.
    from minigpt_jax import corpus, data, report, runner

    seqs = corpus.default_corpus()
    out = pathlib.Path(args.out)
    for i, (name, c) in enumerate(configs.items()):
        try:
            data.check_sequences(seqs, "default corpus", c.vocab_size)
        except data.DataError as e:
            fail(str(e))
        chunks = data.chunk_sequences(seqs, c.seq_len)
        train_chunks, _ = data.split_chunks(chunks, c.val_fraction, c.seed)
        result = runner.train_experiment(name, c, train_chunks, args.max_steps, position=0)
        report.write_metrics(out, name, result.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
