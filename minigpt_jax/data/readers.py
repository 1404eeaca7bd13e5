"""The one way file readers that need torch are passed into the library: `Readers`.

- PyTorch pickles (a .pt data file, a .pt state dict, a Hugging Face
  pytorch_model.bin) need torch to read, and the library never imports
  torch_compat (torch_compat depends on minigpt_jax, never the reverse). So
  a caller hands the readers in as one frozen `Readers`: `torch_compat.readers()`
  fills every field, scripts/ pass it, and `runner.run(read_pt=, read_bin=)`
  builds one from its keyword arguments.
- Each field is optional. A reader that is needed and missing is one line
  naming the file and how to pass it (`Readers.need`), in the caller's error
  class (DataError, hf.HFError, trained.ModelError).
- Also here: the names of the PyTorch project's data files, which only the
  .pt reader and the token cache's key need.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping

import numpy as np

from minigpt_jax.data.sequences import DataError, Sequences

TOKENIZED_DATA = "tokenized_data.pt"
SAMPLE_DATASET = "sample_dataset.pt"
DATA_FILES = (TOKENIZED_DATA, SAMPLE_DATASET)  # a folder's candidates, in order of preference

PtReader = Callable[[pathlib.Path, int], Sequences]  # (file or data folder, vocab_size) -> checked
BinReader = Callable[[pathlib.Path], Mapping[str, np.ndarray]]  # pytorch_model.bin -> {key: array}
StateDictReader = Callable[[pathlib.Path], tuple]  # a .pt state dict -> (params, Config)

# field -> (what the file is, how a caller passes its reader)
_WHAT = {
    "pt": ("PyTorch .pt data", "read_pt=torch_compat.read_sequences"),
    "bin": ("a PyTorch pytorch_model.bin", "read_bin=torch_compat.read_numpy_state_dict"),
    "state_dict": ("a PyTorch .pt state dict", "state_dict=torch_compat.load_params"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Readers:
    """Readers for the files only torch reads; torch_compat.readers() fills all three."""

    pt: PtReader | None = None  # a .pt data file or folder, e.g. torch_compat.read_sequences
    bin: BinReader | None = None  # pytorch_model.bin, e.g. torch_compat.read_numpy_state_dict
    state_dict: StateDictReader | None = None  # a .pt state dict, e.g. torch_compat.load_params

    def need(self, field: str, file: str | os.PathLike, error: type[Exception] = DataError):
        """The reader `field` ("pt", "bin" or "state_dict"), or `error`: one line naming the
        file and how to pass the reader."""
        reader = getattr(self, field)
        if reader is None:
            what, how = _WHAT[field]
            raise error(
                f"{file}: {what}, which needs torch to read, and no reader was given; pass {how}"
                " (all of them: torch_compat.readers()), as the scripts do"
            )
        return reader


def find_data_file(folder: str | os.PathLike) -> pathlib.Path:
    """The folder's tokenized_data.pt, else its sample_dataset.pt, else DataError."""
    folder = pathlib.Path(folder)
    for name in DATA_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"{folder}: a folder with neither {TOKENIZED_DATA} nor {SAMPLE_DATASET};"
        " expected one of them"
    )
