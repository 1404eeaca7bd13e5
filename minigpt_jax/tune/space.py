"""The search space: `--space key=spec` entries over Config fields, checked against the base
experiment's Config before anything runs (docs/tuning.md, The space)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from minigpt_jax import config as cfg


class TuneError(ValueError):
    """A study that cannot run as asked (a usage error); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched Config field: a range (low, high, log) or categorical choices."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def spec(self) -> str:
        """The space entry as the command line writes it (canonical, for the study's record)."""
        if self.kind == "categorical":
            return ",".join(map(str, self.choices))
        return ("log:" if self.log else "") + f"{self.low}:{self.high}"


def _config_of(base: str, overrides: Mapping[str, Any]) -> cfg.Config:
    return cfg.experiment_config(base, dict(overrides))


def _value(item: str, key: str, text: str):
    try:
        return cfg.parse_value(key, text)
    except cfg.ConfigError as e:
        raise TuneError(f"--space {item!r}: {e}") from None


def parse_param(item: str, base: str, overrides: Mapping[str, Any]) -> Param:
    """'lr=log:1e-4:3e-3' -> Param; TuneError naming the entry and what was expected."""
    key, sep, spec = (s.strip() for s in item.partition("="))
    if not sep or not key or not spec:
        raise TuneError(f"--space {item!r}: expected key=log:LOW:HIGH, key=LOW:HIGH or"
                        " key=V1,V2,..., e.g. --space lr=log:1e-4:3e-3")
    types = {f.name: f.type for f in dataclasses.fields(cfg.Config)}
    if key not in types:
        raise TuneError(f"--space {item!r}: unknown config key {key!r}; valid keys: "
                        + ", ".join(types))
    if key in cfg.EXPERIMENTS[base]:
        raise TuneError(f"--space {key}: experiment {base} sets {key} itself; expected a key it"
                        " leaves to the baseline")
    kind = types[key]
    if "," in spec:
        texts = [t.strip() for t in spec.split(",")]
        if not all(texts):
            raise TuneError(f"--space {item!r}: an empty value; expected V1,V2,...")
        choices = [_value(item, key, t) for t in texts]
        if len(set(choices)) < len(choices):
            raise TuneError(f"--space {item!r}: a value given twice; expected distinct values")
        param = Param(key, "categorical", choices=tuple(choices))
        values = choices
    else:
        log = spec.startswith("log:")
        parts = spec[4:].split(":") if log else spec.split(":")
        if len(parts) != 2 or kind == "str":
            what = "a numeric field" if kind == "str" else "LOW:HIGH or log:LOW:HIGH"
            raise TuneError(f"--space {item!r}: expected {what} (or V1,V2,... for choices)")
        low, high = (_value(item, key, p.strip()) for p in parts)
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise TuneError(f"--space {item!r}: low {low} must be below high {high}")
        if log and low <= 0:
            raise TuneError(f"--space {item!r}: a log range must be above 0; got low {low}")
        param = Param(key, kind, low, high, log)
        values = [low, high]
    for v in values:  # a range's ends, or each choice, must make a valid Config
        try:
            _config_of(base, {**overrides, key: v})
        except cfg.ConfigError as e:
            raise TuneError(f"--space {item!r}: {e}") from None
    return param


def parse_space(items: Sequence[str], base: str, overrides: Mapping[str, Any]) -> dict[str, Param]:
    """--space entries -> {field: Param}; TuneError on the first bad one."""
    if base not in cfg.EXPERIMENTS:
        raise TuneError(f"unknown experiment {base!r}; valid: {', '.join(cfg.EXPERIMENTS)}")
    if not items:
        raise TuneError("no --space given; expected at least one, e.g. --space lr=log:1e-4:3e-3")
    space: dict[str, Param] = {}
    for item in items:
        p = parse_param(item, base, overrides)
        if p.name in space:
            raise TuneError(f"--space {p.name} given twice; expected each key once")
        if p.name in overrides:
            raise TuneError(f"--space {p.name}: also given by --set; expected one of them")
        space[p.name] = p
    return space


def parse_enqueue(items: Sequence[str], space: Mapping[str, Param], base: str,
                  overrides: Mapping[str, Any]) -> list[dict]:
    """--enqueue 'lr=1e-3,dropout=0.1' -> [{'lr': 0.001, 'dropout': 0.1}]: points to try first.
    Every searched key must be given; each point must make a valid Config."""
    points = []
    for item in items:
        point = cfg.parse_overrides([p for p in item.split(",") if p.strip()])
        if set(point) != set(space):
            raise TuneError(f"--enqueue {item!r}: expected exactly the searched keys"
                            f" {', '.join(space)}")
        try:
            _config_of(base, {**overrides, **point})
        except cfg.ConfigError as e:
            raise TuneError(f"--enqueue {item!r}: {e}") from None
        points.append(point)
    return points


