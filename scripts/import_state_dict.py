"""Import a PyTorch state dict (.pt) as an Orbax checkpoint at step 0.

The state dict may come from the PyTorch project's own model.py
(`torch.save(model.state_dict(), ...)`), torch_compat.reference.MiniGPT, a
torch.compile'd or DataParallel model (keys prefixed `_orig_mod.` / `module.`),
or be wrapped as {"model": sd} or {"state_dict": sd}. vocab_size, seq_len (the
positional rows), embed_dim, n_layers and ffn_mult are read from the shapes;
n_heads cannot be, so give --n-heads when it is not 4. The checkpoint holds a
fresh AdamW state, so `scripts/run.py --resume` with the same config continues
training from these weights, and scripts/generate.py samples from them.
"""

from __future__ import annotations

import pathlib
import sys

from minigpt_jax import cli


def main(argv=None) -> int:
    p = cli.parser("import_state_dict.py", __doc__)
    p.add_argument("state_dict", help="the .pt file to read (loaded with weights_only=True)")
    p.add_argument("checkpoint",
                   help="the experiment folder to write, e.g. outcome/checkpoints/imported")
    p.add_argument("--n-heads", type=int, default=4,
                   help="attention heads of the model (default: 4)")
    cli.add_overrides(p, "training fields for the checkpoint's config (lr, batch_size, ...)")
    args = p.parse_args(argv)

    import torch_compat
    from minigpt_jax import checkpoint
    from minigpt_jax import config as cfg
    from minigpt_jax.train import create_state

    out = pathlib.Path(args.checkpoint)
    try:
        overrides = cfg.parse_overrides(args.overrides)
        if out.exists() and any(out.iterdir()):
            raise checkpoint.CheckpointError(f"{out}: exists and is not empty; choose a new folder")
        params, config = torch_compat.load_params(args.state_dict, n_heads=args.n_heads)
        config = config.replace(**overrides)
        state = create_state(config, params)
        checkpoint.save(checkpoint.manager(out), state, config, checkpoint.progress_record())
    except (cfg.ConfigError, checkpoint.CheckpointError, torch_compat.StateDictError,
            torch_compat.TorchMissingError, OSError) as e:
        return cli.error("import_state_dict.py", str(e))
    print(f"wrote {out}/0: embed_dim {config.embed_dim}, n_layers {config.n_layers},"
          f" n_heads {config.n_heads}, vocab_size {config.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
