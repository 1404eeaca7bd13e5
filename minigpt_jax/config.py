"""Configuration: the contract's constants (docs/spec.md, Constants), one frozen Config, the five experiments.

- Field names are the PyTorch project's, so a user's `--set embed_dim=64` means
  what it meant there.
- Every value is checked at construction; the message names the field and the
  allowed range, so a bad value never reaches a training run.
- Experiments are named overrides of the baseline, in one table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Any

VOCAB_SIZE = 50257  # GPT-2 vocabulary
PAD_TOKEN_ID = 50256  # pads short chunks; never a label, an ordinary attention key
SEQ_LEN = 64  # default chunk length
SEQ_MIN, SEQ_MAX = 32, 128  # the segmentation rule's bounds (docs/spec.md)
SEQ_LEN_MAX = 4096  # a sanity bound on seq_len: the attention scores are (L, L) per head
SEGMENTATIONS = ("pytorch", "chunks")  # docs/spec.md's rule, or every token in seq_len chunks
DTYPES = ("float32", "bfloat16")
ACTIVATIONS = ("gelu", "gelu_tanh")  # exact erf GELU (the PyTorch project's); tanh GELU (GPT-2's own)
MATMUL_PRECISIONS = ("default", "tensorfloat32", "float32")  # jax.default_matmul_precision's names


class ConfigError(ValueError):
    """A configuration value outside its allowed range, or an unknown key."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and training hyperparameters of one experiment."""

    # model
    vocab_size: int = VOCAB_SIZE  # token ids are in [0, vocab_size)
    seq_len: int = SEQ_LEN  # tokens per training sequence; also the positional table's rows
    embed_dim: int = 128  # model width D; divisible by n_heads
    n_heads: int = 4  # attention heads; head_dim = embed_dim // n_heads
    n_layers: int = 2  # transformer blocks
    ffn_mult: int = 4  # FFN hidden width = embed_dim * ffn_mult
    dropout: float = 0.1  # attention-probability dropout, training only
    activation: str = "gelu"  # FFN: "gelu" exact erf (their model.py), "gelu_tanh" (GPT-2's checkpoints)
    dtype: str = "float32"  # compute dtype; parameters and loss stay float32
    matmul_precision: str = "default"  # float32 matmuls: "default" is JAX's (TF32 on NVIDIA GPUs), or "float32"
    # training
    lr: float = 5e-4  # constant AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay (PyTorch's default)
    batch_size: int = 32  # chunks per step
    max_epochs: int = 1  # passes over the training chunks
    seed: int = 42  # parameter init, shuffling and dropout (--seeds N trains seed .. seed+N-1)
    data_seed: int = 42  # the held-out split and the evaluation samples: equal across seeds
    val_fraction: float = 0.05  # share of chunks held out for validation, in [0, 0.5]
    eval_every: int = 200  # steps between evaluations of the eval_batches sample
    eval_batches: int = 20  # held-out batches in the fixed, seeded sample evaluated every eval_every steps
    eval_final_batches: int = 200  # held-out batches in the final evaluation's seeded sample; 0 = all
    ckpt_minutes: float = 10.0  # wall-clock minutes between checkpoints (always one at the end and on a stop)
    ckpt_every: int = 0  # also a checkpoint every this many steps; 0 = by the clock only
    num_workers: int = 0  # grain worker processes for batching; 0 reads in-process
    segmentation: str = "pytorch"  # "pytorch": docs/spec.md's rule; "chunks": every token
    # optimizer options (optim.py); the defaults are the PyTorch project's AdamW
    lr_schedule: str = "constant"  # "constant", or "cosine" from lr down to min_lr_ratio * lr
    warmup_steps: int = 0  # steps of linear warmup up to lr, before either schedule; 0 = none
    min_lr_ratio: float = 0.1  # the cosine's floor as a fraction of lr, in [0, 1]
    grad_clip: float = 0.0  # max global gradient norm before AdamW; 0 = no clipping
    decay_params: str = "all"  # weight decay on "all" parameters or on "matrices" (kernels) only

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "str": str}[f.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ConfigError(
                    f"{f.name}={value!r}: expected {f.type}, got {type(value).__name__}"
                )
        positive = ("vocab_size", "embed_dim", "n_heads", "n_layers", "ffn_mult",
                    "batch_size", "max_epochs", "eval_every", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be a positive integer (>= 1)")
        if self.vocab_size <= PAD_TOKEN_ID:
            raise ConfigError(
                f"vocab_size={self.vocab_size}: must be > {PAD_TOKEN_ID} so that PAD ({PAD_TOKEN_ID}) is a valid id"
            )
        if self.segmentation not in SEGMENTATIONS:
            raise ConfigError(
                f"segmentation={self.segmentation!r}: must be one of {', '.join(SEGMENTATIONS)}")
        # the segmentation rule (docs/spec.md) keeps only segments of >= SEQ_MIN tokens, and a segment has at most seq_len
        low = SEQ_MIN if self.segmentation == "pytorch" else 2
        if not low <= self.seq_len <= SEQ_LEN_MAX:
            why = " (segmentation=pytorch keeps segments of at least 32 tokens)" if low == SEQ_MIN else ""
            raise ConfigError(f"seq_len={self.seq_len}: must be in [{low}, {SEQ_LEN_MAX}]{why}")
        if self.embed_dim % self.n_heads:
            raise ConfigError(
                f"embed_dim={self.embed_dim}: must be divisible by n_heads={self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 1)")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay={self.weight_decay}: must be >= 0")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ConfigError(f"val_fraction={self.val_fraction}: must be in [0, 0.5]")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 2**32)")
        if self.ckpt_every < 0:
            raise ConfigError(f"ckpt_every={self.ckpt_every}: must be >= 0 (0 = by the clock only)")
        if not self.ckpt_minutes > 0:  # also refuses NaN
            raise ConfigError(f"ckpt_minutes={self.ckpt_minutes}: must be > 0")
        if self.eval_final_batches < 0:
            raise ConfigError(f"eval_final_batches={self.eval_final_batches}: must be >= 0 (0 = every held-out batch)")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: must be one of {', '.join(DTYPES)}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(f"matmul_precision={self.matmul_precision!r}: must be one of"
                              f" {', '.join(MATMUL_PRECISIONS)}")
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        """The optimizer options' ranges (optim.py)."""
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}: must be one of constant, cosine")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not self.grad_clip >= 0:  # also refuses NaN
            raise ConfigError(f"grad_clip={self.grad_clip}: must be >= 0 (0 = no clipping)")
        if self.decay_params not in ("all", "matrices"):
            raise ConfigError(f"decay_params={self.decay_params!r}: must be one of all, matrices")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.embed_dim * self.ffn_mult

    def replace(self, **overrides: Any) -> "Config":
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise ConfigError(
                f"unknown config key {', '.join(unknown)}; valid keys: {', '.join(field_names())}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        if "seed" in d and "data_seed" not in d:  # saved before data_seed: seed split the data
            d = {**d, "data_seed": d["seed"]}
        return cls().replace(**d)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def num_params(c: Config) -> int:
    """Closed-form parameter count (the PyTorch state dict's numel)."""
    d, f, v = c.embed_dim, c.ffn_dim, c.vocab_size
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d)
    return v * d + c.seq_len * d + c.n_layers * block + 2 * d + v * d


# The five experiments: named overrides of the baseline (the PyTorch project's table).
BASELINE = Config()
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "lr_1e-3": {"lr": 1e-3},
    "batch_size_16": {"batch_size": 16},
    "n_layers_1": {"n_layers": 1},
    "embed_dim_64": {"embed_dim": 64},
}


def parse_value(key: str, text: str) -> Any:
    """Parse a `--set key=value` string to the field's type, or raise ConfigError."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    if key not in types:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(types)}")
    kind = types[key]
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {kind}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=1e-3', 'n_layers=1'] -> {'lr': 0.001, 'n_layers': 1}."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-3")
        out[key.strip()] = parse_value(key.strip(), text.strip())
    return out


def experiment_config(name: str, overrides: dict[str, Any] | None = None) -> Config:
    """The user's overrides change the baseline; the experiment's own go on top,
    so `embed_dim_64` still means embed_dim 64 whatever else was set."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    merged = {**(overrides or {}), **EXPERIMENTS[name]}
    return BASELINE.replace(**merged)


def override_text(name: str) -> str:
    """An experiment's own override as text: 'lr=0.001'."""
    return ", ".join(f"{k}={v}" for k, v in EXPERIMENTS[name].items())


def parse_sweeps(items: list[str]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """['lr=1e-3,3e-4', 'batch_size=16,64'] -> [('lr', [('1e-3', 0.001), ('3e-4', 0.0003)]), ...]:
    each key with its values as typed (for names) and as parsed."""
    sweeps, seen = [], set()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        texts = [t.strip() for t in text.split(",")]
        if not sep or not key or not all(texts):
            raise ConfigError(f"--sweep {item!r}: expected key=v1,v2,..., e.g. --sweep lr=1e-3,3e-4")
        if key in seen:
            raise ConfigError(f"--sweep {key} given twice; expected each key once")
        seen.add(key)
        values = [(t, parse_value(key, t)) for t in texts]
        parsed = [v for _, v in values]
        dupes = [t for t, v in values if parsed.count(v) > 1]
        if dupes:
            raise ConfigError(f"--sweep {key}: {', '.join(dupes)} are the same value; expected distinct values")
        bad = [t for t in texts if not re.fullmatch(r"[A-Za-z0-9.+_-]+", t)]
        if bad:
            raise ConfigError(f"--sweep {key}={bad[0]!r}: expected letters, digits and . + - _ only"
                              " (the value becomes part of file names)")
        sweeps.append((key, values))
    return sweeps


def plan(names: list[str], overrides: dict[str, Any], user_text: str = "",
         sweeps: list[tuple[str, list[tuple[str, Any]]]] = ()) -> dict[str, tuple[Config, str]]:
    """Experiment name -> (config, override text) for the chosen experiments and the grid of
    sweeps over each: named as the PyTorch project names them (`lr_1e-3`; several keys joined,
    `lr_1e-3_batch_size_16`; over another experiment, its name first: `n_layers_1_lr_1e-3`)."""
    out: dict[str, tuple[Config, str]] = {}
    grid = list(itertools.product(*[[(k, t, v) for t, v in values] for k, values in sweeps]))
    for name in names:
        if name not in EXPERIMENTS:
            raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
        for combo in grid:
            own = [k for k, _, _ in combo if k in EXPERIMENTS[name]]
            if own:
                raise ConfigError(f"--sweep {own[0]}: experiment {name} sets {own[0]} itself;"
                                  " expected a key it leaves to the baseline")
            parts = [f"{k}_{t}" for k, t, _ in combo]
            run = "_".join(parts if name == "baseline" and parts else [name, *parts])
            swept = ", ".join(f"{k}={t}" for k, t, _ in combo)
            config = experiment_config(name, {**overrides, **{k: v for k, _, v in combo}})
            if run in out:
                raise ConfigError(f"experiment {run} would run twice; expected distinct names")
            out[run] = (config, ", ".join(filter(None, [override_text(name), user_text, swept])))
    return out
