"""A finished run's PyTorch state dict, `mini_gpt_<name>.pt` (docs/spec.md, Outputs)."""

from __future__ import annotations

import pathlib

from tqdm.auto import tqdm


def export_result(out: pathlib.Path, r) -> None:
    """<out>/mini_gpt_<name>.pt of a loop.Result, or one line saying why not (no torch, or a
    model their model.py cannot compute: skipped, never wrong)."""
    from torch_compat.pt_io import require_torch
    from torch_compat.state_dict import StateDictError, save_state_dict

    if r.state is None:
        return
    try:
        require_torch(f"exporting mini_gpt_{r.name}.pt")
    except ImportError as e:
        tqdm.write(f"{r.name}: no mini_gpt_{r.name}.pt ({str(e).splitlines()[0]})")
        return
    import jax

    try:
        save_state_dict(jax.device_get(r.state.params), pathlib.Path(out) / f"mini_gpt_{r.name}.pt",
                        r.config)
    except StateDictError as e:
        tqdm.write(f"{r.name}: no mini_gpt_{r.name}.pt ({e})")
