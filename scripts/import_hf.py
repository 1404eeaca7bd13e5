"""Import a local Hugging Face GPT-2 folder as an Orbax checkpoint at step 0.

HF_DIR holds config.json and model.safetensors (or pytorch_model.bin, read with torch's
weights_only=True), of a GPT-2-architecture model: GPT-2's own checkpoints, one of ours
(scripts/export_hf.py), or any GPT2LMHeadModel's save_pretrained. What is adapted is said in
one line each: GPT-2's tanh GELU becomes activation=gelu_tanh, a tied head is copied, and of
n_positions > seq_len positions the first seq_len are kept (--set seq_len=N; default all). A
model MiniGPT cannot compute (another activation, scale_attn_by_inverse_layer_idx, another
LayerNorm epsilon, ...) is refused in one line, exit 2. The checkpoint holds a fresh AdamW
state: scripts/generate.py samples from it and `run.py --resume` with its config trains on.
"""

from __future__ import annotations

import pathlib
import sys

from minigpt_jax import cli


def main(argv=None) -> int:
    p = cli.parser("import_hf.py", __doc__)
    p.add_argument("hf_dir", help="a local Hugging Face GPT-2 folder")
    p.add_argument(
        "checkpoint", help="the experiment folder to write, e.g. outcome/checkpoints/gpt2"
    )
    cli.add_overrides(p, "seq_len (positions kept) and training fields for the checkpoint's"
                      " config (lr, batch_size, dropout, ...); the model's shape comes from HF_DIR")
    args = p.parse_args(argv)

    import torch_compat
    from minigpt_jax import checkpoint, hf
    from minigpt_jax import config as cfg
    from minigpt_jax.train import create_state

    out = pathlib.Path(args.checkpoint)
    try:
        overrides = cfg.parse_overrides(args.overrides)
        hf.refuse_shape(overrides, args.hf_dir, "seq_len or training fields")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise checkpoint.CheckpointError(f"{out}: exists and is not empty; choose a new folder")
        params, config, notes = hf.load(
            args.hf_dir, overrides.pop("seq_len", None), readers=torch_compat.readers()
        )
        config = config.replace(**overrides)
        checkpoint.save(
            checkpoint.manager(out),
            create_state(config, params),
            config,
            checkpoint.progress_record(),
        )
    except (ValueError, ImportError, OSError) as e:  # the library's one-line errors
        return cli.error("import_hf.py", str(e))
    for note in notes:
        print(f"adapted: {note}")
    print(
        f"wrote {out}/0: embed_dim {config.embed_dim}, n_layers {config.n_layers}, n_heads"
        f" {config.n_heads}, seq_len {config.seq_len}, activation {config.activation}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
