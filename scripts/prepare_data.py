"""Prepare training data once into a folder that run.py takes directly, without torch.

Reads PATH (tokenized_data.pt, sample_dataset.pt, a folder holding one, or
.txt text, as run.py --data takes them), checks every id, and writes
OUT_DIR/sequences.bin: the offsets and the tokens as flat little-endian
arrays (uint16 where every id fits) behind a small JSON header with their
digest (docs/data.md, "The token cache and prepared data"). Then
`run.py --data OUT_DIR` memory-maps it and starts at once; copy OUT_DIR to
another machine as it is.

Examples:
  python scripts/prepare_data.py data/tokenized_data.pt prepared/
  python scripts/prepare_data.py my_texts/ prepared_texts/ --text-docs block
  python scripts/run.py --data prepared/

Exit codes: 0 written; 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from minigpt_jax import cli
from minigpt_jax import config as cfg


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("prepare_data.py", __doc__)
    p.add_argument("path", metavar="PATH", help="the data, as run.py --data takes it")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write sequences.bin into")
    p.add_argument("--vocab-size", type=int, default=cfg.VOCAB_SIZE,
                   help="ids must be below this (default: GPT-2's %(default)s)")
    p.add_argument("--text-docs", default="file", choices=("file", "block"),
                   help="with .txt data: one document per file, or per blank-line-separated block"
                        " (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch_compat
    from minigpt_jax import data

    try:
        seqs = data.load(args.path, args.vocab_size, args.text_docs, torch_compat.readers(),
                         cache=False)
        file = data.write_prepared(seqs, args.out_dir)
    except (data.DataError, ImportError) as e:
        return cli.error("prepare_data.py", str(e))
    except OSError as e:
        print(f"prepare_data.py: error: {args.out_dir}: cannot write ({e.strerror or e});"
              " expected a writable folder", file=sys.stderr)
        return 2
    print(f"prepare_data.py: {seqs.describe()} -> {file}"
          f" ({data.storage_dtype(seqs.tokens)} tokens, {seqs.fingerprint[:19]})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
