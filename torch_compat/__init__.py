"""PyTorch interop for minigpt_jax: .pt data, state dicts and a reference model.

Importing this package does not import torch; each call that needs it does,
and without torch installed raises TorchMissingError (one line naming the
`torch` extra). The PyTorch reference model is `torch_compat.reference`.
`readers()` is the one object through which the library reads what only
torch reads (minigpt_jax.data.Readers): scripts pass it in.
"""

import functools

from minigpt_jax.data import Readers
from torch_compat.data import (
    find_data_file,
    load_sequences,
    read_sample_dataset,
    read_sequences,
    read_tokenized_data,
)
from torch_compat.pt_io import TorchMissingError, require_torch
from torch_compat.state_dict import (
    StateDictError,
    check_exportable,
    config_from_state_dict,
    contract,
    from_state_dict,
    load_params,
    load_state_dict_file,
    read_numpy_state_dict,
    save_state_dict,
    to_state_dict,
)


def readers(n_heads: int = 4):
    """minigpt_jax.data.Readers with every field filled: .pt data (data.read_sequences), a
    Hugging Face pytorch_model.bin (read_numpy_state_dict) and a .pt state dict
    (load_params; n_heads, which a state dict's shapes do not record)."""
    return Readers(pt=read_sequences, bin=read_numpy_state_dict,
                   state_dict=functools.partial(load_params, n_heads=n_heads))


__all__ = [
    "StateDictError", "TorchMissingError", "check_exportable", "config_from_state_dict", "contract",
    "find_data_file", "from_state_dict", "load_params", "load_sequences", "load_state_dict_file",
    "read_numpy_state_dict", "read_sample_dataset", "read_sequences", "read_tokenized_data",
    "readers", "require_torch", "save_state_dict", "to_state_dict",
]
