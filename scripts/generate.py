"""Continue a text prompt with a trained MiniGPT.

Examples:
  python scripts/generate.py --checkpoint outcome/checkpoints/baseline --prompt "The list"
  python scripts/generate.py --checkpoint outcome/mini_gpt_baseline.pt --prompt "Return the" \\
      --temperature 0.8 --top-k 40 --seed 1
  python scripts/generate.py --checkpoint outcome/checkpoints/baseline/120 --prompt "x" \\
      --temperature 0

Prints the prompt followed by its continuation. The same seed gives the same
text; --temperature 0 is greedy. Prompts longer than the model's seq_len
positions (64 at baseline) slide: only the last seq_len tokens are seen.
A .pt may be the PyTorch project's own `mini_gpt_<name>.pt`. <|endoftext|> (the PAD
id 50256) is never generated.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

from minigpt_jax import cli
from minigpt_jax.config import VOCAB_SIZE


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("generate.py", __doc__)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="an Orbax experiment folder (outcome/checkpoints/<name>: its latest step),"
                        " one of its step folders, a Hugging Face GPT-2 folder, or a PyTorch"
                        " state dict file ending in .pt")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (GPT-2 BPE)")
    p.add_argument("--max-new-tokens", type=int, default=50, metavar="N",
                   help="tokens to generate, >= 1 (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="softmax temperature, >= 0; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=40, metavar="K",
                   help=f"sample only among the K most likely tokens, 0 <= K <= {VOCAB_SIZE};"
                        " 0 is no filter (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="sampling seed in [0, 2**32); the same seed gives the same text"
                        " (default: %(default)s)")
    p.add_argument("--n-heads", type=int, default=4, metavar="H",
                   help="attention heads of a .pt state dict, which its shapes do not record"
                        " (default: %(default)s); Orbax checkpoints store their own config")
    return p.parse_args(argv)


def fail(message: str) -> None:
    raise SystemExit(cli.error("generate.py", message))


def check(args: argparse.Namespace) -> None:
    """Argument errors that need no model, before the slow imports."""
    if not args.prompt:
        fail("--prompt is empty: give some text to continue")
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        fail(f"--temperature {args.temperature}: must be a finite number >= 0 (0 is greedy)")
    if args.top_k < 0:
        fail(f"--top-k {args.top_k}: must be >= 0 (0 is no filter)")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed {args.seed}: must be in [0, 2**32)")
    if args.n_heads < 1:
        fail(f"--n-heads {args.n_heads}: must be >= 1")
    if not pathlib.Path(args.checkpoint).exists():
        fail(f"--checkpoint {args.checkpoint}: no such file or folder")


def load(path: pathlib.Path, n_heads: int):
    """(params, config) of an Orbax checkpoint, a Hugging Face folder or a .pt state dict
    (trained.load, with torch_compat's readers: torch is imported only for a .pt or .bin)."""
    import torch_compat
    from minigpt_jax import checkpoint, trained

    try:
        params, config, _ = trained.load(path, readers=torch_compat.readers(n_heads))
    except checkpoint.CheckpointError as e:
        fail(f"--checkpoint {e}")
    except (ValueError, ImportError) as e:  # the library's one-line errors
        fail(str(e))
    return params, config


def main(argv=None) -> int:
    args = parse_args(argv)
    check(args)
    # Heavy imports after the arguments are known to be good: --help stays fast.
    from minigpt_jax import generate

    params, config = load(pathlib.Path(args.checkpoint), args.n_heads)
    try:
        text = generate.generate_text(
            params, config, args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        )
    except generate.GenerationError as e:
        fail(str(e))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
