"""Export a checkpoint as a Hugging Face GPT-2 folder (GPT2LMHeadModel, tokenizer, model card).

CHECKPOINT is an Orbax experiment folder (outcome/checkpoints/<name>: its latest step), one of
its step folders, or a .pt state dict (ours, or the PyTorch project's mini_gpt_<name>.pt). The
folder loads with no network:
  GPT2LMHeadModel.from_pretrained(OUT_DIR), AutoTokenizer.from_pretrained(OUT_DIR),
  pipeline("text-generation", model=OUT_DIR).
An Orbax checkpoint under <out>/checkpoints/<name> takes its losses for the model card from
<out>/metrics_<name>.csv and metrics_<name>_val.csv. OUT_DIR must be new, empty, or an earlier
export (which is replaced). Exit codes: 0 written; 2 bad input, nothing written.
"""

from __future__ import annotations

import pathlib
import shlex
import sys

from minigpt_jax import cli


def card(checkpoint: pathlib.Path, argv) -> dict:
    """The model card's facts: the run's metrics where the checkpoint sits in a run's --out."""
    from minigpt_jax import hf, loop

    folder = checkpoint.absolute()
    folder = folder.parent if folder.name.isdigit() else folder
    command = shlex.join(["scripts/export_hf.py", *argv])
    if folder.is_dir() and folder.parent.name == "checkpoints":
        rows, val_rows = loop.read_rows(folder.parent.parent, folder.name)
        return hf.run_card(folder.name, rows, val_rows, command=command)
    return {"name": checkpoint.stem, "command": command}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = cli.parser("export_hf.py", __doc__)
    p.add_argument("checkpoint", help="an Orbax experiment or step folder, or a .pt state dict")
    p.add_argument("out", help="the Hugging Face folder to write, e.g. /tmp/hf")
    p.add_argument(
        "--n-heads",
        type=int,
        default=4,
        help="attention heads of a .pt state dict, which its shapes do not record (default: 4)",
    )
    args = p.parse_args(argv)

    import torch_compat
    from minigpt_jax import hf, trained

    path = pathlib.Path(args.checkpoint)
    try:
        if hf.is_hf_folder(path):
            raise trained.ModelError(
                f"{path}: already a Hugging Face folder; expected an Orbax"
                " checkpoint or a .pt state dict"
            )
        params, config, _ = trained.load(path, readers=torch_compat.readers(args.n_heads))
        out = hf.export(params, config, args.out, card(path, argv))
    except (ValueError, ImportError, OSError) as e:  # the library's one-line errors
        return cli.error("export_hf.py", str(e))
    print(
        f"wrote {out}: GPT2LMHeadModel, n_layer {config.n_layers}, n_embd {config.embed_dim},"
        f" n_head {config.n_heads}, n_positions {config.seq_len}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
