"""Evaluate a checkpoint on data: loss, perplexity, label tokens and the loss's standard error.

--checkpoint is an Orbax experiment or step folder, a .pt state dict (ours or the PyTorch
project's mini_gpt_<name>.pt), or a Hugging Face GPT-2 folder; --data is anything run.py's
--data takes (default: the embedded corpus). The held-out split is training's own for the same
data and config (seq_len, segmentation, val_fraction, seed: an Orbax checkpoint's are its run's),
and the batches are the final evaluation's seeded sample (--max-batches, default the config's
eval_final_batches; 0 = every segment), so an Orbax checkpoint gives its run's final validation
loss. .pt files and Hugging Face folders use the default config's training fields: --set them.

Examples:
  python scripts/evaluate.py --checkpoint outcome/checkpoints/baseline
  python scripts/evaluate.py --checkpoint outcome/mini_gpt_baseline.pt --data data/ --split all
  python scripts/evaluate.py --checkpoint /tmp/hf --set seq_len=64 --max-batches 0

Exit codes: 0 evaluated; 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from minigpt_jax import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("evaluate.py", __doc__)
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="an Orbax experiment or step folder, a .pt state dict or a Hugging Face folder",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="as run.py's --data: a .pt file or data folder, .txt text (default: the"
        " embedded corpus)",
    )
    p.add_argument(
        "--text-docs",
        default="file",
        metavar="file|block",
        help="with .txt data: one document per file or per block (default: %(default)s)",
    )
    p.add_argument(
        "--split",
        default="val",
        choices=("val", "all"),
        help="val: training's held-out segments; all: every segment (default: %(default)s)",
    )
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        metavar="N",
        help="at most N batches of a seeded sample; 0 = every segment (default: the"
        " config's eval_final_batches)",
    )
    cli.add_overrides(p, "config fields that decide the split and batches (data_seed,"
                      " val_fraction, segmentation, batch_size, ...); seq_len only for a Hugging"
                      " Face folder")
    p.add_argument(
        "--n-heads",
        type=int,
        default=4,
        metavar="H",
        help="attention heads of a .pt state dict (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch_compat
    from minigpt_jax import config as cfg
    from minigpt_jax import data, hf, trained

    try:
        if args.max_batches is not None and args.max_batches < 0:
            raise cfg.ConfigError(
                f"--max-batches {args.max_batches}: must be >= 0 (0 = every segment)"
            )
        overrides = cfg.parse_overrides(args.overrides)
        hf.refuse_shape(overrides, "the checkpoint", "fields that decide the split and batches")
        readers = torch_compat.readers(args.n_heads)
        params, config, notes = trained.load(
            args.checkpoint, readers=readers, seq_len=overrides.pop("seq_len", None)
        )
        config = config.replace(**overrides)
        seqs = data.load(args.data, config.vocab_size, args.text_docs, readers)
        e = trained.score(
            params,
            config,
            seqs,
            args.split,
            args.max_batches,
            desc=None if args.json else "evaluating",
        )
    except (ValueError, ImportError, OSError) as e:  # the library's one-line errors
        return cli.error("evaluate.py", str(e))
    if args.json:
        figures = {
            k: (v if math.isfinite(v) else None) for k, v in e.as_dict().items()
        }  # JSON has no NaN
        print(
            json.dumps(
                {
                    "checkpoint": args.checkpoint,
                    "data": seqs.describe(),
                    "split": args.split,
                    **figures,
                    "notes": notes,
                }
            )
        )
    else:
        print(
            f"{args.checkpoint} on {seqs.describe()}, {args.split}: loss {e.loss:.4f}"
            f" ± {e.stderr:.4f}, perplexity {e.perplexity:.2f}, {e.tokens:,} label tokens in"
            f" {e.segments:,} segments"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
