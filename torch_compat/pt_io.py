"""Lazy torch import and a safe, explained `torch.load` of .pt files.

- torch is imported on first use, so minigpt_jax runs without it; a call that
  needs it raises TorchMissingError, one line naming the `torch` extra.
- Every load is `torch.load(..., weights_only=True, map_location="cpu")`: a
  .pt is a pickle, and only tensors, lists, dicts and numbers may come out of
  it, never a function call.
- Every failure is one line, "<file>: what was found; expected ...", raised as
  the caller's error type (DataError for data, StateDictError for checkpoints).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_MAGIC = b"\x80"  # torch.save's legacy format: a protocol-2 pickle


class TorchMissingError(ImportError):
    """PyTorch is needed for this call but is not installed."""


def require_torch(purpose: str):
    """Import and return torch, or raise TorchMissingError naming `purpose`."""
    try:
        import torch
    except ImportError:
        raise TorchMissingError(
            f"PyTorch is needed for {purpose}: pip install 'minigpt-jax[torch]'"
        ) from None
    return torch


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_pt(path: str | os.PathLike, error: type[Exception],
            what: str = "a file written by torch.save"):
    """torch.load(path, weights_only=True) on CPU; any failure ->
    error("<path>: ...; expected <what>")."""
    torch = require_torch(f"reading {path}")
    path = pathlib.Path(path)
    if not path.is_file():
        found = "a folder" if path.is_dir() else "no such file"
        raise error(f"{path}: {found}; expected {what}")
    if path.stat().st_size == 0:
        raise error(f"{path}: empty file (0 bytes); expected {what}")
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise error(f"{path}: not a zip archive or pickle (starts with {head!r}); expected {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise error(f"{path}: damaged or truncated ({_first_line(e)});"
                        f" expected a complete copy of {what}") from None
        called = re.search(r"GLOBAL (\S+)", str(e))
        found = (f"its pickle would call {called.group(1)}" if called
                 else "its pickle holds more than data")
        raise error(
            f"{path}: refused to load, {found} and so could run code; expected only tensors, lists,"
            " dicts and numbers (it is read with torch.load(weights_only=True))"
        ) from None
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, ... for damaged files
        raise error(f"{path}: damaged or truncated ({_first_line(e)});"
                    f" expected a complete copy of {what}") from None


def tensor_to_numpy(x, float32: bool = False):
    """A CPU NumPy copy of a torch tensor; float32=True casts to float32 (as
    PyTorch's load_state_dict copies into float32 parameters)."""
    x = x.detach().cpu()
    if float32 or str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
        x = x.float()
    return np.array(x.numpy(), copy=True)
