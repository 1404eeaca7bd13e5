"""Flax params <-> PyTorch state dicts with docs/spec.md's names and shapes.

- One explicit table maps each contract key to its Flax path; one transpose
  rule: a Flax Dense `kernel` (in, out) is a torch Linear `weight` (out, in).
- Strict like PyTorch's load_state_dict: every missing, unexpected and
  mis-shaped key is listed in one StateDictError, nothing is loaded partly.
- Conversion stays in NumPy float32, so both round trips are bit-exact.
- Accepted wrappings: keys prefixed `module.` (nn.DataParallel or DDP) or
  `_orig_mod.` (a torch.compile'd model), in any order, and a state dict
  inside `{"model": sd}` or `{"state_dict": sd}` (a training checkpoint).
- The contract is the PyTorch project's model.py, whose GELU is exact: a
  model with activation="gelu_tanh" (imported from GPT-2) is refused, never
  written as a file their model would compute differently.
- With no config, the shapes give vocab_size, seq_len (the positional table's
  rows), embed_dim, n_layers and ffn_mult; n_heads leaves no trace in the
  shapes and is an argument (default 4, the PyTorch project's).
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from minigpt_jax.config import SEQ_MIN, Config, ConfigError
from minigpt_jax.files import atomic_path
from torch_compat.pt_io import load_pt, require_torch, tensor_to_numpy

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel/DDP; torch.compile
WRAPPER_KEYS = ("model", "state_dict")  # training checkpoints: {"model": sd, "optimizer": ...}


class StateDictError(ValueError):
    """A state dict (or params tree) that does not match the contract."""


def contract(config: Config) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(torch key, Flax path, torch shape) for every parameter, in PyTorch's state_dict order."""
    V, D, F, S = config.vocab_size, config.embed_dim, config.ffn_dim, config.seq_len
    rows = [
        ("embed.weight", ("embed", "embedding"), (V, D)),
        ("pos.embed.weight", ("pos", "embed", "embedding"), (S, D)),
    ]
    for i in range(config.n_layers):
        b, f = f"layers.{i}.", (f"layers_{i}",)
        rows += [
            (b + "ln1.weight", f + ("ln1", "scale"), (D,)),
            (b + "ln1.bias", f + ("ln1", "bias"), (D,)),
            (b + "attn.qkv.weight", f + ("attn", "qkv", "kernel"), (3 * D, D)),
            (b + "attn.qkv.bias", f + ("attn", "qkv", "bias"), (3 * D,)),
            (b + "attn.proj.weight", f + ("attn", "proj", "kernel"), (D, D)),
            (b + "attn.proj.bias", f + ("attn", "proj", "bias"), (D,)),
            (b + "ln2.weight", f + ("ln2", "scale"), (D,)),
            (b + "ln2.bias", f + ("ln2", "bias"), (D,)),
            (b + "ffn.fc1.weight", f + ("ffn", "fc1", "kernel"), (F, D)),
            (b + "ffn.fc1.bias", f + ("ffn", "fc1", "bias"), (F,)),
            (b + "ffn.fc2.weight", f + ("ffn", "fc2", "kernel"), (D, F)),
            (b + "ffn.fc2.bias", f + ("ffn", "fc2", "bias"), (D,)),
        ]
    rows += [
        ("ln_f.weight", ("ln_f", "scale"), (D,)),
        ("ln_f.bias", ("ln_f", "bias"), (D,)),
        ("head.weight", ("head", "kernel"), (V, D)),
    ]
    return rows


def _is_kernel(flax_path: tuple[str, ...]) -> bool:
    return flax_path[-1] == "kernel"  # Dense kernel (in, out) = Linear weight.T


def _flat_params(params: Mapping) -> dict[tuple[str, ...], Any]:
    """{Flax path: array} of a params tree, or of the variables dict {"params": tree}."""
    return flatten_dict(params["params"] if set(params) == {"params"} else params)


def config_from_params(params: Mapping, n_heads: int = 4) -> Config:
    """The Config implied by a params tree's shapes (n_heads given)."""
    flat = _flat_params(params)
    try:
        V, D = flat[("embed", "embedding")].shape
        S = flat[("pos", "embed", "embedding")].shape[0]
        F = flat[("layers_0", "ffn", "fc1", "kernel")].shape[1]
    except KeyError as e:
        raise StateDictError(f"params have no {'/'.join(e.args[0])}; expected a MiniGPT params tree") from None
    n_layers = len({p[0] for p in flat if re.fullmatch(r"layers_\d+", p[0])})
    return _make_config(V, D, n_heads, n_layers, F // D, S, "params")


def _make_config(V, D, n_heads, n_layers, ffn_mult, seq_len, source) -> Config:
    # the segmentation rule (docs/spec.md) needs seq_len >= SEQ_MIN; a shorter table still loads, under "chunks"
    segmentation = "pytorch" if seq_len >= SEQ_MIN else "chunks"
    try:
        return Config(vocab_size=V, embed_dim=D, n_heads=n_heads, n_layers=n_layers,
                      ffn_mult=ffn_mult, seq_len=seq_len, segmentation=segmentation)
    except ConfigError as e:
        raise StateDictError(f"{source} imply an unusable model: {e}") from None


def check_exportable(config: Config) -> None:
    """StateDictError unless the users' model.py computes config's model (its GELU is exact)."""
    if config.activation != "gelu":
        raise StateDictError(f"activation={config.activation}: the PyTorch project's model.py has the"
                             " exact (erf) GELU only; expected activation=gelu for a .pt export")


def to_state_dict(params: Mapping, config: Config | None = None) -> "collections.OrderedDict[str, Any]":
    """Flax params -> OrderedDict of float32 torch tensors with exactly the contract's keys and shapes.
    config: the params' config where known, so that a model their model.py cannot compute is refused
    (params do not record the activation)."""
    torch = require_torch("exporting a PyTorch state dict")
    if config is not None:
        check_exportable(config)
    flat = _flat_params(params)
    rows = contract(config_from_params(params, n_heads=1))  # heads leave no trace in shapes
    expected = {path for _, path, _ in rows}
    missing = sorted("/".join(p) for p in expected - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - expected)
    if missing or unexpected:
        raise StateDictError(
            f"params tree does not match MiniGPT: missing {missing or 'none'}; unexpected {unexpected or 'none'}"
        )
    bad = []
    for _, path, shape in rows:
        flax_shape = shape[::-1] if _is_kernel(path) else shape
        if tuple(flat[path].shape) != flax_shape:
            bad.append(f"{'/'.join(path)} has shape {tuple(flat[path].shape)} (expected {flax_shape})")
    if bad:
        raise StateDictError(f"params tree has inconsistent shapes: {'; '.join(bad)}")
    out = collections.OrderedDict()
    for key, path, _ in rows:
        a = np.array(flat[path], dtype=np.float32)  # a copy, off the device
        out[key] = torch.from_numpy(np.ascontiguousarray(a.T) if _is_kernel(path) else a)
    return out


def _strip(key):
    while isinstance(key, str) and key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def unwrap(state_dict: Mapping) -> dict:
    """Strip {"model": ...} / {"state_dict": ...} wrappers and `module.` / `_orig_mod.` prefixes."""
    if not isinstance(state_dict, Mapping):
        raise StateDictError(f"found a {type(state_dict).__name__}; expected a state dict (a dict of tensors)")
    for key in WRAPPER_KEYS:
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    return {_strip(k): v for k, v in state_dict.items()}


def config_from_state_dict(state_dict: Mapping, n_heads: int = 4) -> Config:
    """The Config implied by a state dict's shapes; n_heads cannot be inferred and is given."""
    sd = unwrap(state_dict)
    needed = ("embed.weight", "pos.embed.weight", "layers.0.ffn.fc1.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise StateDictError(
            f"cannot infer the model's shape: missing {absent}; expected MiniGPT contract keys"
            " (or pass config=)"
        )
    shapes = {k: tuple(getattr(sd[k], "shape", ())) for k in needed}
    if any(len(s) != 2 for s in shapes.values()):
        raise StateDictError(f"cannot infer the model's shape: found shapes {shapes}; expected 2-D weights")
    V, D = shapes["embed.weight"]
    S = shapes["pos.embed.weight"][0]
    F = shapes["layers.0.ffn.fc1.weight"][0]
    if F % D:
        raise StateDictError(f"layers.0.ffn.fc1.weight has shape {(F, D)}; expected ({D}*ffn_mult, {D})")
    layers = {int(m.group(1)) for k in sd if isinstance(k, str) and (m := re.match(r"layers\.(\d+)\.", k))}
    return _make_config(V, D, n_heads, max(layers) + 1, F // D, S, "state dict shapes")


def from_state_dict(state_dict: Mapping, config: Config | None = None, n_heads: int = 4) -> tuple[dict, Config]:
    """A PyTorch state dict -> (Flax params, Config), strict like load_state_dict(strict=True).

    With config=None the shapes give the config (n_heads from the argument);
    with a config, its n_heads is used and the argument is ignored.
    """
    torch = require_torch("importing a PyTorch state dict")
    sd = unwrap(state_dict)
    if config is None:
        config = config_from_state_dict(sd, n_heads)
    rows = contract(config)
    expected = {key for key, _, _ in rows}
    missing = [key for key, _, _ in rows if key not in sd]
    unexpected = sorted(str(k) for k in sd if k not in expected)
    wrong = []
    for key, _, shape in rows:
        if key not in sd:
            continue
        v = sd[key]
        if not torch.is_tensor(v):
            wrong.append(f"{key} is a {type(v).__name__} (expected a tensor of shape {shape})")
        elif tuple(v.shape) != shape:
            wrong.append(f"{key} has shape {tuple(v.shape)} (expected {shape})")
        elif not v.is_floating_point():
            wrong.append(f"{key} has dtype {v.dtype} (expected floating point)")
    if missing or unexpected or wrong:
        problems = [f"missing keys: {', '.join(missing)}" if missing else "",
                    f"unexpected keys: {', '.join(unexpected)}" if unexpected else "",
                    f"wrong: {'; '.join(wrong)}" if wrong else ""]
        raise StateDictError(
            f"state dict does not match MiniGPT(vocab_size={config.vocab_size}, embed_dim={config.embed_dim},"
            f" n_layers={config.n_layers}, ffn_mult={config.ffn_mult}, seq_len={config.seq_len}): "
            + "; ".join(p for p in problems if p)
        )
    flat = {}
    for key, path, _ in rows:
        a = tensor_to_numpy(sd[key], float32=True)
        flat[path] = jnp.asarray(np.ascontiguousarray(a.T) if _is_kernel(path) else a)
    return unflatten_dict(flat), config


def save_state_dict(params: Mapping, path: str | os.PathLike, config: Config | None = None) -> pathlib.Path:
    """Write to_state_dict(params, config) with torch.save, atomically (temporary name, then rename)."""
    torch = require_torch("saving a PyTorch state dict")
    path = pathlib.Path(path)
    sd = to_state_dict(params, config)  # refused before anything is written
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A .pt state dict read with torch.load(weights_only=True); unreadable files -> StateDictError."""
    return load_pt(path, StateDictError, "a state dict written by torch.save")


def load_params(path: str | os.PathLike, config: Config | None = None, n_heads: int = 4) -> tuple[dict, Config]:
    """from_state_dict(load_state_dict_file(path)); errors name the file."""
    try:
        return from_state_dict(load_state_dict_file(path), config, n_heads)
    except StateDictError as e:
        if str(e).startswith(str(path)):
            raise
        raise StateDictError(f"{path}: {e}") from None


def read_numpy_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .pt/.bin state dict (torch.load, weights_only) as {key: NumPy array}, for readers that
    take NumPy (minigpt_jax.data.Readers.bin: a Hugging Face pytorch_model.bin)."""
    sd = unwrap(load_state_dict_file(path))
    torch = require_torch(f"reading {path}")
    bad = [str(k) for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise StateDictError(f"{path}: {bad[0]} is not a tensor; expected a state dict of tensors")
    return {str(k): tensor_to_numpy(v) for k, v in sd.items()}
