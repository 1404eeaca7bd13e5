"""What a run is asked, as one object: `RunOptions`, built once by the run call and taken whole by
every layer below it (runner -> parallel -> loop / stack), so that a new option is a field here,
not a parameter threaded through five signatures.

The experiments themselves (their configs and names) are not options: they are the plan
(runner.plan). Options are how the run goes: where it writes, how long, whether it continues,
how experiments share devices, what else watches it (extra metric writers, a callback per
finished experiment, a stop event), and where its progress bar sits.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
from collections.abc import Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """A run's options (docs/options.md); every field has the value a plain `run.py` uses."""

    out: pathlib.Path  # the output folder: metrics, plots, tables, checkpoints
    max_steps: int | None = None  # stop each experiment after this many steps (None: its epochs)
    resume: bool = False  # continue each experiment from its latest checkpoint under `out`
    stop: threading.Event | None = None  # set it: every experiment saves and stops at its next block
    fuse: bool | None = None  # a block as one fused dispatch (None: on accelerators, not the CPU)
    stack: bool = False  # experiments of one shape on one device train as one vmapped program
    seeds_apart: bool = False  # an experiment's seeds one after another, not as one stack
    reference: str | None = None  # the experiment others are compared with (default: baseline)
    concurrent: int = 1  # up to this many experiments at the same time on each device
    writers: Callable | None = None  # experiment -> extra metric writers (e.g. W&B), lead only
    on_result: Callable | None = None  # result -> None, as each experiment finishes (exports)
    position: int = 0  # the progress bar's line (a thread per device: one line each)
    # Where the data comes from and how it is read (the run call reads it once)
    data: str | os.PathLike | None = None  # None: the embedded corpus
    text_docs: str = "file"  # .txt sources: a document per file, or per blank-line block
    cache: bool = True  # read a .pt source through the token cache
    read_pt: Callable | None = None  # (path, vocab_size) -> sequences: the PyTorch .pt reader
    read_bin: Callable | None = None  # path -> {key: array}: a pytorch_model.bin reader
    # (the library never imports torch_compat: the caller passes these; `readers` holds both)
    init_from: str | os.PathLike | None = None  # a local Hugging Face GPT-2 folder to start from
    # Devices, and what the run writes beyond the core outputs
    devices: Sequence[int] | None = None  # indices into jax.devices() (None: the first device)
    data_parallel: bool = False  # each experiment's batches split over every listed device
    gpu_index: Mapping[int, int] | None = None  # host.restrict_gpus' index map
    export_hf: bool = False  # <out>/hf/<name>/ as each experiment finishes
    command: str | None = None  # the command line, for the report and model cards

    def __post_init__(self):
        object.__setattr__(self, "out", pathlib.Path(self.out))

    @property
    def readers(self):
        """read_pt and read_bin as the one object the layers below take (data.Readers)."""
        from minigpt_jax.data.readers import Readers

        return Readers(pt=self.read_pt, bin=self.read_bin)

    def replace(self, **changes) -> RunOptions:
        return dataclasses.replace(self, **changes)
