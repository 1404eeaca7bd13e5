"""The users' PyTorch data (.pt) -> a list of 1-D int32 NumPy sequences for the grain pipeline.

- Two formats, told apart by content so any file name works: `tokenized_data.pt`,
  a list of 1-D integer tensors (one per document), and `sample_dataset.pt`, a
  dict with an `input_ids` 2-D tensor or a list of such dicts (one row per
  sequence, rows taken in order). A folder is searched for `tokenized_data.pt`
  first, then `sample_dataset.pt`.
- Files are read with torch.load(weights_only=True) (see pt_io): a .pt never runs code.
- Id range, dtype and emptiness are checked by minigpt_jax.data.check_sequences,
  the same rule as every other source; errors are DataError, one line naming the file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

from minigpt_jax.config import VOCAB_SIZE
from minigpt_jax.data import DataError, check_sequences
from torch_compat.pt_io import load_pt, require_torch, tensor_to_numpy

TOKENIZED_DATA = "tokenized_data.pt"
SAMPLE_DATASET = "sample_dataset.pt"
DATA_FILES = (TOKENIZED_DATA, SAMPLE_DATASET)  # a folder's candidates, in order of preference

TOKENIZED_FORMAT = "a list of 1-D integer tensors (tokenized_data.pt)"
SAMPLE_FORMAT = "a dict with an 'input_ids' 2-D integer tensor, or a list of such dicts (sample_dataset.pt)"


def describe(obj: Any) -> str:
    """A short, one-line account of what a .pt held."""
    torch = require_torch("describing .pt contents")
    if torch.is_tensor(obj):
        return f"a {obj.ndim}-D tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    if isinstance(obj, str):
        text = obj if len(obj) <= 20 else obj[:20] + "..."
        return f"a str ({text!r})"
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:8]] + (["..."] if len(obj) > 8 else [])
        return f"a dict with keys [{', '.join(keys)}]" if obj else "an empty dict"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__} ({obj!r:.40})"


def _as_ids(item: Any, file: pathlib.Path, i: int) -> np.ndarray:
    """One sequence: a tensor, or a list of Python ints (as tokenizers return them)."""
    torch = require_torch("reading .pt data")
    if torch.is_tensor(item):
        return tensor_to_numpy(item)
    if isinstance(item, (list, tuple)):
        for j, x in enumerate(item):
            if isinstance(x, bool) or not isinstance(x, int):
                raise DataError(
                    f"{file}: sequence {i} holds {describe(x)} at position {j}; expected integer token ids"
                )
        try:
            return np.asarray(item, dtype=np.int64).reshape(-1)
        except OverflowError:
            raise DataError(f"{file}: sequence {i} holds an id beyond 64 bits; expected token ids") from None
    raise DataError(f"{file}: sequence {i} is {describe(item)}; expected a 1-D integer tensor")


def _tokenized(obj: Any, file: pathlib.Path) -> list[np.ndarray]:
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{file}: found {describe(obj)}; expected {TOKENIZED_FORMAT}")
    return [_as_ids(item, file, i) for i, item in enumerate(obj)]


def _sample_dataset(obj: Any, file: pathlib.Path) -> list[np.ndarray]:
    torch = require_torch("reading .pt data")
    single = isinstance(obj, Mapping)
    if not single and not isinstance(obj, (list, tuple)):
        raise DataError(f"{file}: found {describe(obj)}; expected {SAMPLE_FORMAT}")
    seqs = []
    for j, d in enumerate([obj] if single else obj):
        where = "" if single else f"item {j} is "
        if not isinstance(d, Mapping):
            raise DataError(f"{file}: {where or 'found '}{describe(d)}; expected {SAMPLE_FORMAT}")
        if "input_ids" not in d:
            raise DataError(f"{file}: {where or 'found '}{describe(d)}, without 'input_ids'; expected {SAMPLE_FORMAT}")
        ids = d["input_ids"]
        at = "'input_ids'" if single else f"item {j}'s 'input_ids'"
        if not torch.is_tensor(ids):
            raise DataError(f"{file}: {at} is {describe(ids)}; expected a 2-D integer tensor, one row per sequence")
        if ids.ndim != 2:
            raise DataError(
                f"{file}: {at} has shape {tuple(ids.shape)}; expected a 2-D integer tensor, one row per sequence"
            )
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise DataError(f"{file}: {at} has dtype {ids.dtype}; expected integer token ids")
        seqs.extend(tensor_to_numpy(ids))
    return seqs


def _is_sample_dataset(obj: Any) -> bool:
    return isinstance(obj, Mapping) or (
        isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(d, Mapping) for d in obj)
    )


def _finish(seqs: list[np.ndarray], file: pathlib.Path, vocab_size: int) -> list[np.ndarray]:
    check_sequences(seqs, str(file), vocab_size)  # before the int32 cast: no id wraps around
    return [s.astype(np.int32) for s in seqs]


def read_tokenized_data(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> list[np.ndarray]:
    """A tokenized_data.pt (list of 1-D integer tensors) -> list of 1-D int32 arrays."""
    file = pathlib.Path(path)
    return _finish(_tokenized(load_pt(file, DataError), file), file, vocab_size)


def read_sample_dataset(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> list[np.ndarray]:
    """A sample_dataset.pt (dict or list of dicts with 'input_ids' 2-D) -> its rows as 1-D int32 arrays."""
    file = pathlib.Path(path)
    return _finish(_sample_dataset(load_pt(file, DataError), file), file, vocab_size)


def find_data_file(folder: str | os.PathLike) -> pathlib.Path:
    """The folder's tokenized_data.pt, else its sample_dataset.pt, else DataError."""
    folder = pathlib.Path(folder)
    for name in DATA_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: a folder with neither {TOKENIZED_DATA} nor {SAMPLE_DATASET}; expected one of them")


def load_sequences(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> tuple[list[np.ndarray], str]:
    """A .pt file (either format) or a data folder -> (1-D int32 sequences, description of the source).

    Raises DataError (one line: file, what was found, what was expected) for
    anything unusable, and TorchMissingError when torch is not installed.
    """
    path = pathlib.Path(path)
    file = find_data_file(path) if path.is_dir() else path
    obj = load_pt(file, DataError)
    if _is_sample_dataset(obj):
        seqs, fmt = _sample_dataset(obj, file), "sample_dataset format"
    elif isinstance(obj, (list, tuple)):
        seqs, fmt = _tokenized(obj, file), "tokenized_data format"
    else:
        raise DataError(f"{file}: found {describe(obj)}; expected {TOKENIZED_FORMAT} or {SAMPLE_FORMAT}")
    seqs = _finish(seqs, file, vocab_size)
    return seqs, f"{file} ({fmt}: {len(seqs)} sequences, {sum(s.size for s in seqs)} tokens)"
