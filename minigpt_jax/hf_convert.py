"""MiniGPT's params and Config <-> GPT-2's state dict and config.json (docs/spec.md, Hugging Face form).

- MiniGPT is `transformers.GPT2LMHeadModel`; one table maps each GPT-2 key to
  its Flax path. GPT-2's Conv1D weights are (in, out), a Flax kernel as it is;
  only `lm_head` is a torch Linear (out, in), the transpose of `head/kernel`.
- Import adapts what GPT-2's own checkpoints do differently, one note each:
  the tanh GELU (activation="gelu_tanh"), a tied head (copied), more positions
  than seq_len (the first seq_len rows), residual and embedding dropout (none
  here), keys without the `transformer.` prefix, old mask buffers.
- What the other side cannot express is an HFError, one line naming every
  field that differs. NumPy (and flax's traverse_util for the trees) only: no
  torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from minigpt_jax.config import PAD_TOKEN_ID, SEQ_MIN, Config, ConfigError

EPS = 1e-5  # every LayerNorm's epsilon (model.py)
# GPT-2's activation names -> ours; GPT-2 writes the tanh GELU as gelu_new
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
EXPORT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# GPT2Config's flags that change the computation, and the only values MiniGPT computes
FIXED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}
# GPT2Config's defaults, for config.json files that leave a field out (GPT-2's own do)
DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "tie_word_embeddings": True,
}
SHAPE_FIELDS = ("vocab_size", "embed_dim", "n_heads", "n_layers", "ffn_mult", "activation")
# Older transformers saved each layer's causal-mask buffers; they hold no parameter
_BUFFERS = (("attn", "bias"), ("attn", "masked_bias"))


class HFError(ValueError):
    """A Hugging Face folder or config MiniGPT cannot use, or a model GPT-2 cannot express."""


# --- the key table -----------------------------------------------------------------------


def table(
    config: Config, n_positions: int | None = None
) -> list[tuple[str, tuple[str, ...], tuple]]:
    """(GPT-2 key, Flax path, GPT-2 shape) of every parameter; wpe has n_positions rows
    (default seq_len)."""
    V, D, F = config.vocab_size, config.embed_dim, config.ffn_dim
    rows = [
        ("transformer.wte.weight", ("embed", "embedding"), (V, D)),
        (
            "transformer.wpe.weight",
            ("pos", "embed", "embedding"),
            (n_positions or config.seq_len, D),
        ),
    ]
    for i in range(config.n_layers):
        h, f = f"transformer.h.{i}.", (f"layers_{i}",)
        for hf_name, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
            rows += [
                (f"{h}{hf_name}.weight", f + (ours, "scale"), (D,)),
                (f"{h}{hf_name}.bias", f + (ours, "bias"), (D,)),
            ]
        for hf_name, ours, n_in, n_out in (
            ("attn.c_attn", ("attn", "qkv"), D, 3 * D),
            ("attn.c_proj", ("attn", "proj"), D, D),
            ("mlp.c_fc", ("ffn", "fc1"), D, F),
            ("mlp.c_proj", ("ffn", "fc2"), F, D),
        ):
            rows += [
                (f"{h}{hf_name}.weight", f + ours + ("kernel",), (n_in, n_out)),
                (f"{h}{hf_name}.bias", f + ours + ("bias",), (n_out,)),
            ]
    rows += [
        ("transformer.ln_f.weight", ("ln_f", "scale"), (D,)),
        ("transformer.ln_f.bias", ("ln_f", "bias"), (D,)),
        ("lm_head.weight", ("head", "kernel"), (V, D)),
    ]
    return rows


def _transposed(key: str) -> bool:
    return key == "lm_head.weight"  # a torch Linear (out, in); every Conv1D is (in, out) already


def _listed(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- configs -----------------------------------------------------------------------------


def gpt2_config(config: Config) -> dict[str, Any]:
    """The config.json of config's model as GPT2LMHeadModel (docs/spec.md, Hugging Face form)."""
    if config.activation not in EXPORT_ACTIVATION:
        raise HFError(
            f"activation={config.activation!r}: GPT-2 has no such activation;"
            f" expected one of {', '.join(EXPORT_ACTIVATION)}"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.seq_len,
        "n_embd": config.embed_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.ffn_dim,
        "activation_function": EXPORT_ACTIVATION[config.activation],
        "layer_norm_epsilon": EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": config.dropout,
        **FIXED,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": PAD_TOKEN_ID,
        "eos_token_id": PAD_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "dtype": "float32",
    }


def config_from_gpt2(
    hf: Mapping[str, Any],
    seq_len: int | None = None,
    base: Config | None = None,
    where: str = "config.json",
) -> tuple[Config, list[str]]:
    """(Config, notes) of a GPT-2 config.json. The model's shape comes from hf; seq_len is
    n_positions unless given (at most n_positions); the other fields come from base (default
    Config(), dropout then attn_pdrop). HFError names every field MiniGPT cannot compute."""
    d = {**DEFAULTS, **hf}
    differs = []
    if d.get("model_type") != "gpt2":
        differs.append(f"model_type {d.get('model_type')!r} (expected 'gpt2')")
    if d["activation_function"] not in ACTIVATIONS:
        differs.append(
            f"activation_function {d['activation_function']!r} (expected one of"
            f" {', '.join(ACTIVATIONS)})"
        )
    if d["layer_norm_epsilon"] != EPS:
        differs.append(f"layer_norm_epsilon {d['layer_norm_epsilon']!r} (expected {EPS})")
    differs += [f"{k} {d.get(k, v)!r} (expected {v})" for k, v in FIXED.items() if d.get(k, v) != v]
    D, n_inner = d["n_embd"], d["n_inner"] or 4 * d["n_embd"]
    if n_inner % D:
        differs.append(
            f"n_inner {n_inner} (expected a multiple of n_embd {D}: MiniGPT's FFN is"
            " ffn_mult * embed_dim)"
        )
    n_pos = d["n_positions"]
    if seq_len is not None and seq_len > n_pos:
        differs.append(f"n_positions {n_pos} (expected at least seq_len {seq_len})")
    if differs:
        raise HFError(f"{where}: MiniGPT cannot compute this model: {'; '.join(differs)}")
    seq_len = seq_len or n_pos
    base = base or Config(dropout=float(d["attn_pdrop"]))
    try:
        config = base.replace(
            vocab_size=d["vocab_size"],
            seq_len=seq_len,
            embed_dim=D,
            n_heads=d["n_head"],
            n_layers=d["n_layer"],
            ffn_mult=n_inner // D,
            activation=ACTIVATIONS[d["activation_function"]],
            segmentation=base.segmentation if seq_len >= SEQ_MIN else "chunks",
        )
    except ConfigError as e:
        raise HFError(f"{where}: not a usable MiniGPT: {e}") from None
    notes = []
    if config.activation != "gelu":
        notes.append(
            f"activation_function {d['activation_function']}: the tanh GELU,"
            " model option activation=gelu_tanh"
        )
    dropped = [f"{k} {d[k]}" for k in ("resid_pdrop", "embd_pdrop") if d[k]]
    if dropped:
        notes.append(
            f"{' and '.join(dropped)} not applied (MiniGPT drops out attention"
            f" probabilities only, at dropout={config.dropout})"
        )
    return config, notes


# --- state dicts -------------------------------------------------------------------------


def to_gpt2_state_dict(params: Mapping, config: Config) -> dict[str, np.ndarray]:
    """Flax params -> {GPT-2 key: float32 array}; HFError unless params are config's model."""
    flat = flatten_dict(params["params"] if set(params) == {"params"} else params)
    rows = table(config)
    want = {path: (shape[::-1] if _transposed(key) else shape) for key, path, shape in rows}
    problems = [f"missing {'/'.join(p)}" for p in want if p not in flat]
    problems += [f"unexpected {'/'.join(p)}" for p in flat if p not in want]
    problems += [
        f"{'/'.join(p)} has shape {tuple(np.shape(flat[p]))} (expected {s})"
        for p, s in want.items()
        if p in flat and tuple(np.shape(flat[p])) != s
    ]
    if problems:
        raise HFError(f"params are not the model of their config: {_listed(problems)}")
    out = {}
    for key, path, _ in rows:
        a = np.asarray(flat[path], dtype=np.float32)
        out[key] = np.ascontiguousarray(a.T if _transposed(key) else a)
    return out


def _normalise(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """GPT2Model's keys (no `transformer.` prefix, as GPT-2's own files have them) prefixed;
    older transformers' mask buffers dropped."""
    sd, notes = dict(sd), []
    if not any(k.startswith("transformer.") for k in sd):
        sd = {k if k == "lm_head.weight" else f"transformer.{k}": v for k, v in sd.items()}
    buffers = [
        k for k in sd if k.startswith("transformer.h.") and tuple(k.split(".")[-2:]) in _BUFFERS
    ]
    for k in buffers:
        del sd[k]
    if buffers:
        notes.append(
            f"{len(buffers)} attention-mask buffers (attn.bias, attn.masked_bias) skipped:"
            " constants, not parameters"
        )
    return sd, notes


def from_gpt2_state_dict(
    sd: Mapping[str, np.ndarray], config: Config, n_positions: int, tied: bool
) -> tuple[dict, list[str]]:
    """{GPT-2 key: array} -> (Flax params of config, notes), strict: every missing,
    unexpected and mis-shaped key in one HFError."""
    sd, notes = _normalise(sd)
    if tied:
        if "lm_head.weight" in sd:
            del sd["lm_head.weight"]  # a tied model computes with wte, whatever the file holds
        if "transformer.wte.weight" in sd:
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
            notes.append(
                "tie_word_embeddings: the head is a copy of transformer.wte, trained"
                " on its own from here"
            )
    rows = table(config, n_positions)
    want = {key: shape for key, _, shape in rows}
    problems = [f"missing {k}" for k in want if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in want]
    for k, shape in want.items():
        if k in sd and tuple(sd[k].shape) != shape:
            problems.append(f"{k} has shape {tuple(sd[k].shape)} (expected {shape})")
        elif k in sd and sd[k].dtype.kind != "f":
            problems.append(f"{k} has dtype {sd[k].dtype} (expected floating point)")
    if problems:
        raise HFError(f"weights do not match config.json: {_listed(problems)}")
    cast = sorted({str(sd[k].dtype) for k in want if sd[k].dtype != np.float32})
    if cast:
        notes.append(f"{', '.join(cast)} weights cast to float32")
    if n_positions > config.seq_len:
        notes.append(
            f"n_positions {n_positions} > seq_len {config.seq_len}: the first"
            f" {config.seq_len} rows of transformer.wpe"
        )
    flat = {}
    for key, path, _ in rows:
        a = np.asarray(sd[key], dtype=np.float32)
        a = (
            a.T
            if _transposed(key)
            else a[: config.seq_len]
            if key == "transformer.wpe.weight"
            else a
        )
        flat[path] = np.ascontiguousarray(a)
    return unflatten_dict(flat), notes
