"""Export an Orbax checkpoint's parameters as a PyTorch state dict (.pt).

CHECKPOINT is outcome/checkpoints/<name> (its latest step) or one step folder.
The result loads into the PyTorch project's own model (or
torch_compat.reference.MiniGPT) with `model.load_state_dict(torch.load(OUT,
weights_only=True), strict=True)`; its keys are docs/spec.md's State dict.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="export_state_dict.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="outcome/checkpoints/<name> or one of its step folders")
    p.add_argument("out", help="the .pt file to write")
    args = p.parse_args(argv)

    import torch_compat
    from minigpt_jax import checkpoint

    try:
        torch_compat.require_torch("exporting a state dict")
        params, config, step = checkpoint.load_params(pathlib.Path(args.checkpoint))
        path = torch_compat.save_state_dict(params, args.out, config)
    except (checkpoint.CheckpointError, torch_compat.StateDictError, torch_compat.TorchMissingError,
            OSError) as e:
        print(f"export_state_dict.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: step {step}, embed_dim {config.embed_dim}, n_layers {config.n_layers},"
          f" n_heads {config.n_heads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
