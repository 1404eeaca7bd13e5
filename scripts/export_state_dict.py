"""Export an Orbax checkpoint's parameters as a PyTorch state dict (.pt).

CHECKPOINT is outcome/checkpoints/<name> (its latest step) or one step folder.
The result loads into the PyTorch project's own model (or
torch_compat.reference.MiniGPT) with `model.load_state_dict(torch.load(OUT,
weights_only=True), strict=True)`; its keys are docs/spec.md's State dict.
"""

from __future__ import annotations

import pathlib
import sys

from minigpt_jax import cli


def main(argv=None) -> int:
    p = cli.parser("export_state_dict.py", __doc__)
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
        return cli.error("export_state_dict.py", str(e))
    print(f"wrote {path}: step {step}, embed_dim {config.embed_dim}, n_layers {config.n_layers},"
          f" n_heads {config.n_heads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
