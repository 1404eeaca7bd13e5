"""The metrics seam: writers of scalars by step (clu / nanodo style), and a fan-out.

- Every writer has `write_scalars(step, {tag: number})`, `flush()` and `close()`.
  The loop builds one writer (a `MultiWriter`) and knows nothing of formats.
- Cheap per call: rows go into Python's file buffers; nothing is synced per
  row. `flush()` pushes them to the OS; call it at each checkpoint, so that
  what a resume keeps is on disk.
- Resume (`resume_step=k`): rows of steps > k, written after the checkpoint the
  run resumes from, are dropped. CSV and JSONL files are append-only and are
  rewritten (streamed to a temporary file, then renamed) only when their last
  row is past k or torn by a crash; TensorBoard gets a purge event at k + 1, so
  its readers discard the later points of the earlier event file.
- Tags are the caller's (train/loss, val/perplexity, ...). A CSV has fixed
  columns, so `CsvWriter` keeps the fields it was given (a mapping renames
  them) and skips a write that holds none of them: one MultiWriter can feed a
  train CSV and a validation CSV.
- `WandbWriter` imports wandb when constructed; nothing else imports it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from minigpt_jax.files import atomic_path

BUFFER_BYTES = 1 << 16  # file buffer of the CSV and JSONL writers
TAIL_BYTES = 1 << 16  # end of a log read to find its last step (rows are far shorter)


def _number(v: Any) -> int | float:
    """A Python int or float from a Python, NumPy or JAX scalar."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    a = np.asarray(v)
    return int(a) if a.dtype.kind in "iub" else float(a)


class Writer:
    """Base of the writers: the three calls, and use as a context manager."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MultiWriter(Writer):
    """Every call goes to each writer in turn."""

    def __init__(self, writers: Sequence[Writer]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        """Close them all, then raise the first error, if any."""
        errors = []
        for w in self.writers:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001 - the others must still be closed
                errors.append(e)
        if errors:
            raise errors[0]


def cut_back(path: pathlib.Path, step_of: Callable[[str], int], keep_step: int,
             header: bool) -> bool:
    """Drop rows of steps > keep_step and a torn last line; rewrite only if needed -> rewritten?"""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    torn = not tail.endswith(b"\n")  # a crash mid-row leaves no final newline
    lines = tail.split(b"\n")[:-1]  # the complete lines in the tail
    whole = len(tail) == size
    rows = lines if whole and not header else lines[1:]  # the header, or a line cut by the seek
    past = bool(rows) and step_of(rows[-1].decode()) > keep_step
    if not (torn or past):
        return False
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as out, open(path, newline="") as src:
        for i, line in enumerate(src):
            if not line.endswith("\n"):
                break  # the torn last row
            if (header and i == 0) or step_of(line) <= keep_step:
                out.write(line)
    return True


class _LineWriter(Writer):
    """An append-only text file of one row per line, opened fresh or cut back for a resume."""

    def __init__(self, path: pathlib.Path, header: str | None, resume_step: int | None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = resume_step is None or not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            if header is not None:
                with open(self.path, newline="") as f:
                    found = f.readline()
                if found != header:
                    raise ValueError(f"{self.path}: header {found.strip()!r} differs from the "
                                     f"writer's {header.strip()!r}; expected the same columns")
            cut_back(self.path, self._step_of, resume_step, header is not None)
        self._file = open(self.path, "w" if fresh else "a", buffering=BUFFER_BYTES, newline="")
        if fresh and header is not None:
            self._file.write(header)

    def _step_of(self, line: str) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvWriter(_LineWriter):
    """`<out_dir>/metrics_<name>.csv`: a step column, then the given fields."""

    def __init__(self, out_dir: pathlib.Path, name: str,
                 fields: Sequence[str] | Mapping[str, str], resume_step: int | None = None):
        # a mapping is column -> tag, e.g. {"loss": "train/loss"}; a sequence names both
        self.columns = dict(fields) if isinstance(fields, Mapping) else {f: f for f in fields}
        self.columns.pop("step", None)
        head = ["step", *self.columns]
        header = ",".join(f'"{c}"' if any(ch in c for ch in ',"\n') else c for c in head) + "\n"
        super().__init__(pathlib.Path(out_dir) / f"metrics_{name}.csv", header, resume_step)
        self._rows = csv.writer(self._file, lineterminator="\n")

    def _step_of(self, line: str) -> int:
        return int(line.split(",", 1)[0])

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = [scalars.get(tag) for tag in self.columns.values()]
        if all(v is None for v in row):
            return
        self._rows.writerow([int(step)] + ["" if v is None else _number(v) for v in row])


class JsonlWriter(_LineWriter):
    """`<out_dir>/metrics_<name>.jsonl`: one object per write, {"step": k, tag: value, ...}."""

    def __init__(self, out_dir: pathlib.Path, name: str, resume_step: int | None = None):
        super().__init__(pathlib.Path(out_dir) / f"metrics_{name}.jsonl", None, resume_step)

    def _step_of(self, line: str) -> int:
        return int(json.loads(line)["step"])

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: _number(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")  # NaN and Infinity as Python's json writes them


class TensorBoardWriter(Writer):
    """Event files under `<out_dir>/tensorboard/<name>/`, one event of all tags per step."""

    def __init__(self, out_dir: pathlib.Path, name: str, resume_step: int | None = None):
        # tensorboardX's record writer, called directly: SummaryWriter's queue and
        # worker thread cost several times more per row than the writing itself
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        self._event, self._summary = Event, Summary
        self.logdir = pathlib.Path(out_dir) / "tensorboard" / name
        self.logdir.mkdir(parents=True, exist_ok=True)
        # files are named by the second they open in: the suffix keeps a quick resume's apart
        self._events = EventsWriter(str(self.logdir / "events"), f".{time.time_ns()}")
        if resume_step is not None:  # readers drop the earlier files' events from this step on
            self._events.write_event(Event(step=resume_step + 1, wall_time=time.time(),
                                           session_log=SessionLog(status=SessionLog.START)))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = [self._summary.Value(tag=k, simple_value=_number(v)) for k, v in scalars.items()]
        self._events.write_event(self._event(step=int(step), wall_time=time.time(),
                                             summary=self._summary(value=values)))

    def flush(self) -> None:
        self._events.flush()  # tensorboardX's flush also syncs the file

    def close(self) -> None:
        self._events.close()


class WandbWriter(Writer):
    """A Weights & Biases run; keyword arguments go to `wandb.init` (project, name, id...)."""

    def __init__(self, **init_kwargs: Any):
        try:
            import wandb
        except ImportError:
            raise ImportError("WandbWriter needs the wandb package, which is not installed; "
                              "pip install wandb, or leave the W&B writer out") from None
        self._run = wandb.init(**init_kwargs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._run.log({k: _number(v) for k, v in scalars.items()}, step=int(step))

    def close(self) -> None:
        self._run.finish()


def read_csv(path: pathlib.Path) -> list[dict]:
    """A metrics CSV (CsvWriter's) as rows of numbers: step and tokens int, the rest float (an
    empty cell is NaN); [] when the file does not exist."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("step", "tokens") else float(v) if v else math.nan)
                 for k, v in row.items()} for row in csv.DictReader(f)]
