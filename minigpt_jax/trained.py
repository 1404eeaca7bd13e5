"""A trained model from wherever it lives, and its held-out loss on any data.

- `load` reads an Orbax experiment or step folder (checkpoint.py), a Hugging
  Face folder (hf.py) or a PyTorch .pt state dict, the last two through the
  readers the caller passes in (data.Readers; torch_compat.readers() fills
  them: this package never imports torch).
- `score` splits the data by the training rule (data.prepare with the
  config's seq_len, segmentation, val_fraction and seed), so the held-out
  segments are exactly the ones the run validated on, and evaluates the final
  evaluation's sample (evaluation.final_batches) with the loop's own call: an
  Orbax checkpoint's number is its run's final validation loss.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from minigpt_jax import data, hf
from minigpt_jax.config import Config
from minigpt_jax.data import DataError, Readers, Sequences

SPLITS = ("val", "all")


class ModelError(ValueError):
    """A checkpoint path that is none of the forms `load` reads."""


def load(
    path: str | os.PathLike,
    *,
    readers: Readers = Readers(),
    seq_len: int | None = None,
) -> tuple[dict, Config, list[str]]:
    """(params, config, notes) of an Orbax folder, a Hugging Face folder or a .pt file.
    seq_len: a Hugging Face model's positions to keep (default n_positions); elsewhere it
    is the positional table's rows and must not differ."""
    path = pathlib.Path(path)
    if path.is_file():
        if path.suffix != ".pt":
            raise ModelError(
                f"{path}: a file, but not a .pt state dict; expected a .pt file, an"
                " Orbax checkpoint folder or a Hugging Face folder"
            )
        params, config = readers.need("state_dict", path, ModelError)(path)
        notes = []
    elif hf.is_hf_folder(path):
        return hf.load(path, seq_len, readers=readers)
    elif path.is_dir():
        from minigpt_jax import checkpoint

        params, config, step = checkpoint.load_params(path)
        notes = [f"step {step}"]
    else:
        raise ModelError(f"{path}: no such file or folder")
    if seq_len is not None and seq_len != config.seq_len:
        raise ModelError(
            f"seq_len={seq_len}: {path} has {config.seq_len} positions (its"
            " positional table's rows); expected that value"
        )
    return params, config, notes


def segments(seqs: Sequences, config: Config, split: str = "val") -> np.ndarray:
    """The held-out segments training used for config (split "val"), or every segment ("all")."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    prepared = data.prepare(seqs, config)
    rows = prepared.val if split == "val" else np.concatenate([prepared.train, prepared.val])
    if len(rows) == 0:
        raise DataError(
            f"{seqs.source}: nothing is held out at val_fraction={config.val_fraction}"
            f" ({prepared.sequences} sequences); expected split all, or a larger"
            " val_fraction"
        )
    return rows


def score(
    params,
    config: Config,
    seqs: Sequences,
    split: str = "val",
    max_batches: int | None = None,
    desc: str | None = None,
    device=None,
) -> Any:
    """evaluation.Evaluation of params over `segments(seqs, config, split)`: at most max_batches
    (default config.eval_final_batches; 0 = every segment) batches of the final evaluation's
    seeded sample, on `device` (default the first); a progress bar when desc is given."""
    import jax

    from minigpt_jax import evaluation
    from minigpt_jax.placement import Placement
    from minigpt_jax.train import create_state

    rows = segments(seqs, config, split)
    if max_batches is None:
        max_batches = config.eval_final_batches
    batches = evaluation.final_batches(rows, max_batches, config.batch_size,
                                           config.data_seed)
    place = Placement([device or jax.devices()[0]])
    state = place.put(
        create_state(config.replace(lr_schedule="constant"), params)
    )  # no schedule needed
    with evaluation.progress(len(batches), desc) as bar:
        return evaluation.evaluate_batches(state, batches, place, config.eval_batches, bar)
