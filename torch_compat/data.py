"""The users' PyTorch data (.pt) -> minigpt_jax.data.Sequences (flat int32 tokens, offsets).

- Two formats, told apart by content so any file name works: `tokenized_data.pt`,
  a list of 1-D integer tensors (one per document), and `sample_dataset.pt`, a
  dict with an `input_ids` 2-D tensor or a list of such dicts (one row per
  sequence, rows taken in order). A folder is searched for `tokenized_data.pt`
  first, then `sample_dataset.pt`.
- Files are read with torch.load(weights_only=True) (see pt_io): a .pt never runs code.
- No NumPy work per sequence: lengths come from numel, tokens from one torch.cat
  per group of tensors, range-checked (minigpt_jax.data.sequences, the same rule as
  every other source) before the int32 cast; errors are DataError, one line
  naming the file, the sequence, the position and the value.
- load_sequences, read_tokenized_data and read_sample_dataset keep the older
  list-of-arrays API on top of read_sequences.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from minigpt_jax.config import VOCAB_SIZE
from minigpt_jax.data.readers import (  # noqa: F401  (kept importable from here)
    DATA_FILES,
    SAMPLE_DATASET,
    TOKENIZED_DATA,
    find_data_file,
)
from minigpt_jax.data.sequences import (
    DataError,
    Sequences,
    check_nonempty,
    check_range,
    offsets_from_lengths,
)
from torch_compat.pt_io import load_pt, require_torch

TOKENIZED_FORMAT = "a list of 1-D integer tensors (tokenized_data.pt)"
SAMPLE_FORMAT = (
    "a dict with an 'input_ids' 2-D integer tensor, or a list of such dicts (sample_dataset.pt)"
)
_GROUP = 1 << 24  # tokens per torch.cat: bounds the int64 temporary while narrowing to int32


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
    """One sequence that is not a tensor: a list of Python ints (as tokenizers return them)."""
    if isinstance(item, (list, tuple)):
        for j, x in enumerate(item):
            if isinstance(x, bool) or not isinstance(x, int):
                raise DataError(
                    f"{file}: sequence {i} holds {describe(x)} at position {j};"
                    " expected integer token ids"
                )
        try:
            return np.asarray(item, dtype=np.int64).reshape(-1)
        except OverflowError:
            raise DataError(
                f"{file}: sequence {i} holds an id beyond 64 bits; expected token ids"
            ) from None
    raise DataError(f"{file}: sequence {i} is {describe(item)}; expected a 1-D integer tensor")


def _flatten(
    items: list, seq_offsets: np.ndarray, file: pathlib.Path, kind: str, vocab_size: int
) -> Sequences:
    """1-D integer tensors back to back -> Sequences: one torch.cat per group of ~16M tokens,
    each group range-checked in its own dtype (no id wraps) before it is narrowed to int32."""
    torch = require_torch("reading .pt data")
    check_nonempty(seq_offsets, str(file))
    item_offsets = offsets_from_lengths([t.numel() for t in items])
    tokens = np.empty(int(item_offsets[-1]), np.int32)
    i = 0
    while i < len(items):
        j = max(
            i + 1, int(np.searchsorted(item_offsets, item_offsets[i] + _GROUP, side="right")) - 1
        )
        group = (torch.cat(items[i:j]) if j - i > 1 else items[i].reshape(-1)).numpy()
        check_range(group, seq_offsets, int(item_offsets[i]), str(file), vocab_size)
        tokens[item_offsets[i] : item_offsets[j]] = group
        i = j
    return Sequences(tokens, seq_offsets, kind, str(file))


def _bad_dtype(dtype) -> bool:
    """A torch dtype that cannot hold token ids."""
    return dtype.is_floating_point or dtype.is_complex or str(dtype) == "torch.bool"


def _tokenized(obj: Any, file: pathlib.Path, vocab_size: int) -> Sequences:
    torch = require_torch("reading .pt data")
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{file}: found {describe(obj)}; expected {TOKENIZED_FORMAT}")
    items = list(obj)
    fast = (
        all(map(torch.is_tensor, items))
        and {t.dim() for t in items} <= {1}
        and not any(map(_bad_dtype, {t.dtype for t in items}))
    )
    if not fast:  # the per-item path: lists of ints, or an item to name in an error
        for i, item in enumerate(items):
            t = item if torch.is_tensor(item) else torch.from_numpy(_as_ids(item, file, i))
            if t.dim() != 1:
                raise DataError(
                    f"{file}: sequence {i} has shape {tuple(t.shape)}; expected a 1-D sequence"
                    " of token ids"
                )
            if t.numel() and _bad_dtype(t.dtype):
                raise DataError(
                    f"{file}: sequence {i} has dtype {str(t.dtype).removeprefix('torch.')};"
                    " expected integer token ids"
                )
            items[i] = t.long() if _bad_dtype(t.dtype) else t  # an empty float tensor: no ids
    offsets = offsets_from_lengths(np.fromiter((t.numel() for t in items), np.int64, len(items)))
    return _flatten(items, offsets, file, "tokenized", vocab_size)


def _sample_dataset(obj: Any, file: pathlib.Path, vocab_size: int) -> Sequences:
    torch = require_torch("reading .pt data")
    single = isinstance(obj, Mapping)
    if not single and not isinstance(obj, (list, tuple)):
        raise DataError(f"{file}: found {describe(obj)}; expected {SAMPLE_FORMAT}")
    items, lengths = [], []
    for j, d in enumerate([obj] if single else obj):
        where = "" if single else f"item {j} is "
        if not isinstance(d, Mapping):
            raise DataError(f"{file}: {where or 'found '}{describe(d)}; expected {SAMPLE_FORMAT}")
        if "input_ids" not in d:
            raise DataError(
                f"{file}: {where or 'found '}{describe(d)}, without 'input_ids';"
                f" expected {SAMPLE_FORMAT}"
            )
        ids = d["input_ids"]
        at = "'input_ids'" if single else f"item {j}'s 'input_ids'"
        if not torch.is_tensor(ids):
            raise DataError(
                f"{file}: {at} is {describe(ids)}; expected a 2-D integer tensor, one row per"
                " sequence"
            )
        if ids.ndim != 2:
            raise DataError(
                f"{file}: {at} has shape {tuple(ids.shape)}; expected a 2-D integer tensor, one"
                " row per sequence"
            )
        if _bad_dtype(ids.dtype):
            raise DataError(f"{file}: {at} has dtype {ids.dtype}; expected integer token ids")
        items.append(ids.reshape(-1))
        lengths.append(np.full(ids.shape[0], ids.shape[1], np.int64))
    return _flatten(items, offsets_from_lengths(np.concatenate(lengths)), file, "rows", vocab_size)


def _is_sample_dataset(obj: Any) -> bool:
    return isinstance(obj, Mapping) or (
        isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(d, Mapping) for d in obj)
    )


def sequences_from_pt(obj: Any, file: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> Sequences:
    """What torch.load returned (either format, told apart by content) -> checked Sequences."""
    file = pathlib.Path(file)
    if _is_sample_dataset(obj):
        return _sample_dataset(obj, file, vocab_size)
    if isinstance(obj, (list, tuple)):
        return _tokenized(obj, file, vocab_size)
    raise DataError(
        f"{file}: found {describe(obj)}; expected {TOKENIZED_FORMAT} or {SAMPLE_FORMAT}"
    )


def read_sequences(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> Sequences:
    """A .pt file (either format) or a data folder -> checked Sequences (flat tokens, offsets).

    Raises DataError (one line: file, what was found, what was expected) for
    anything unusable, and TorchMissingError when torch is not installed.
    """
    path = pathlib.Path(path)
    file = find_data_file(path) if path.is_dir() else path
    return sequences_from_pt(load_pt(file, DataError), file, vocab_size)


def read_tokenized_data(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> list[np.ndarray]:
    """A tokenized_data.pt (list of 1-D integer tensors) -> list of 1-D int32 arrays."""
    file = pathlib.Path(path)
    return _tokenized(load_pt(file, DataError), file, vocab_size).to_list()


def read_sample_dataset(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> list[np.ndarray]:
    """A sample_dataset.pt (dicts with 'input_ids' 2-D) -> its rows as 1-D int32 arrays."""
    file = pathlib.Path(path)
    return _sample_dataset(load_pt(file, DataError), file, vocab_size).to_list()


def load_sequences(
    path: str | os.PathLike, vocab_size: int = VOCAB_SIZE
) -> tuple[list[np.ndarray], str]:
    """A .pt file or a data folder -> (1-D int32 sequences, description of the source): the list
    API over read_sequences, which large data should use instead."""
    seqs = read_sequences(path, vocab_size)
    fmt = "sample_dataset format" if seqs.kind == "rows" else "tokenized_data format"
    return (
        seqs.to_list(),
        f"{seqs.source} ({fmt}: {len(seqs)} sequences, {len(seqs.tokens)} tokens)",
    )
