"""PyTorch interop for minigpt_jax: .pt data, state dicts and a reference model.

Importing this package does not import torch; each call that needs it does,
and without torch installed raises TorchMissingError (one line naming the
`torch` extra). The PyTorch reference model is `torch_compat.reference`.
"""

from torch_compat.data import (
    find_data_file,
    load_sequences,
    read_sample_dataset,
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

__all__ = [
    "StateDictError", "TorchMissingError", "check_exportable", "config_from_state_dict", "contract",
    "find_data_file", "from_state_dict", "load_params", "load_sequences", "load_state_dict_file", "read_sample_dataset",
    "read_numpy_state_dict", "read_tokenized_data", "require_torch", "save_state_dict", "to_state_dict",
]
