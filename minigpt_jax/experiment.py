"""What the driver is given and what it returns: an `Experiment` (one run's name, config,
devices and where it starts from) and its `Result` (metrics read back, status, final state and
evaluation). loop.py trains them; runner, parallel, stack, tables and the report read them.
"""

from __future__ import annotations

import dataclasses

import jax

from minigpt_jax import evaluation
from minigpt_jax.config import Config
from minigpt_jax.placement import Placement


@dataclasses.dataclass
class Experiment:
    name: str
    config: Config
    devices: tuple  # one device, or several for data parallelism
    overrides: str = ""  # human-readable overrides, for the results table
    params: object = None  # initial parameters (e.g. imported from Hugging Face); None: fresh
    data_id: str = ""  # the data's fingerprint (data.Sequences), recorded in checkpoints
    experiment: str = ""  # the experiment this run is one seed of ("": the run is the experiment)

    def __post_init__(self):  # the one check that the batch splits over the devices
        if isinstance(self.devices, jax.Device):
            self.devices = (self.devices,)
        self.devices = tuple(self.devices)
        if self.config.batch_size % len(self.devices):
            raise ValueError(f"{self.name}: batch_size={self.config.batch_size} is not divisible by"
                             f" the {len(self.devices)} data-parallel devices")

    @property
    def label(self) -> str:
        return Placement(self.devices).label


@dataclasses.dataclass
class Result:
    name: str
    config: Config
    device: str
    rows: list[dict]  # per step (read back from metrics_<name>.csv): step, tokens, loss, ...
    val_rows: list[dict]  # per evaluation: step, tokens, val_loss, val_perplexity
    seconds: float  # wall time of this invocation (training, evaluation and checkpoints)
    status: str = "ok"  # ok | stopped at step k | failed: reason
    overrides: str = ""
    state_devices: frozenset = frozenset()  # devices holding the final train state
    state: object = None  # the final TrainState (for exports and in-process callers)
    final_eval: evaluation.Evaluation | None = None  # the end-of-run held-out evaluation
    phases: dict = dataclasses.field(default_factory=dict)  # phase -> seconds (compile, train, ...)
    stacked: int = 1  # variants trained in one program with this one
    experiment: str = ""

    @property
    def steps(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0

    @property
    def tokens(self) -> int:
        return int(self.rows[-1]["tokens"]) if self.rows else 0

    @property
    def final_loss(self) -> float | None:
        """The last step's loss (the PyTorch project's final_loss)."""
        return float(self.rows[-1]["loss"]) if self.rows else None
