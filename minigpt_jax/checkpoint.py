"""Orbax checkpoints of one experiment: train state, config and progress.

Layout: `<out>/checkpoints/<name>/<step>/` with three Orbax items:
- `state`: {"step", "params", "opt_state"} (StandardSave; plain Orbax restores it);
- `config`: the full Config as JSON, so a checkpoint says what it is;
- `progress`: a fixed-size record, {"step", "next_batch" (the grain
  MapDataset position: the stream is random access), "tokens" (label tokens
  seen), "seconds" (training wall time so far)}. The per-step metrics are not
  in it: they live in the append-only metrics files, which a resume cuts back
  to the checkpoint's step (metrics.py), so a save costs the same at step 100
  as at step 100,000.
A save copies the state to host NumPy arrays (the step donates its buffers, so
nothing may read them after the next step, and a checkpoint without a device
layout restores on any machine), then a thread of the experiment's own writes
it with Orbax while training goes on. (Orbax's own asynchronous saves are not
used: several managers saving the same step number at once from the
experiments' threads failed in Orbax's temporary-folder handling.) A save is written to `<step>.orbax-checkpoint-tmp-*` and
renamed when complete, so a process killed while saving leaves no step folder,
only a temporary one that `latest_step` ignores (and a training manager
deletes). A save that fails (disk full, no permission) is one SaveError line
naming the folder, the cause and the space it needed; the previous checkpoint
stays as it was.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import re
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from minigpt_jax.config import Config, ConfigError
from minigpt_jax.train import TrainState, create_state

PROGRESS_KEYS = ("step", "next_batch", "tokens", "seconds")


def progress_record(step: int = 0, next_batch: int = 0, tokens: int = 0, seconds: float = 0.0,
                    data: str = "") -> dict:
    """The progress item: where the data stream and the counters stand at `step`, and which
    data they stand in (`data`: data.Sequences.fingerprint; "" when unknown)."""
    return {"step": int(step), "next_batch": int(next_batch), "tokens": int(tokens),
            "seconds": float(seconds), "data": str(data)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or of another config."""


class SaveError(RuntimeError):
    """A checkpoint that could not be written; the message is one line."""


def checkpoint_dir(out_dir: pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(out_dir) / "checkpoints" / name


def manager(directory: pathlib.Path, max_to_keep: int = 2, cleanup_tmp: bool = False) -> ocp.CheckpointManager:
    """cleanup_tmp: delete the temporary folders of saves that never finished (only
    for the one process that trains into `directory`: it would delete a running save)."""
    return ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=cleanup_tmp,
        ),
    )


def brief(e: BaseException) -> str:
    """An error as one short line: its type and first line, without tensorstore's spec dump."""
    plain = isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str)  # str() would quote it
    lines = (e.args[0] if plain else str(e)).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _drop_late_read_callbacks() -> None:
    """After a failed restore, tensorstore reads still in flight complete on an event
    loop asyncio has closed, and each prints a "RuntimeError: Event loop is closed"
    traceback (through sys.unraisablehook), dozens of them after the one error that
    matters. Drop exactly those; anything else still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def state_tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def host_state_tree(state: TrainState) -> dict:
    """The state as NumPy arrays: saved so, a checkpoint carries no device layout and
    restores anywhere (any device count, plain Orbax without a target)."""
    return jax.device_get(state_tree(state))


def _save_args(host_state: dict, config: Config, progress: dict) -> ocp.args.Composite:
    return ocp.args.Composite(
        state=ocp.args.StandardSave(host_state),
        config=ocp.args.JsonSave(config.to_dict()),
        progress=ocp.args.JsonSave(progress),
    )


def save(mngr: ocp.CheckpointManager, state: TrainState, config: Config, progress: dict) -> None:
    """Save and wait for the write (scripts; training uses a Checkpointer)."""
    mngr.save(int(state.step), args=_save_args(host_state_tree(state), config, progress), force=True)
    mngr.wait_until_finished()


def _cause(e: BaseException) -> str:
    """The reason of a failed write in a few words: the OS error where there is one."""
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return brief(e)


def _megabytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**20:.1f} MB"


class _DropOrbaxWriteErrors(logging.Filter):
    """Orbax logs a failed write with its traceback from the writing thread, then raises it
    to the caller; the caller's one line (SaveError) is the report, so the log is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("orbax" in record.pathname and "raised an exception" in record.getMessage())


_DROP = _DropOrbaxWriteErrors()


class Checkpointer:
    """One experiment's checkpoints while it trains: asynchronous saves, one-line failures.

    save() blocks only while the state is copied to the host; a writer thread
    saves it, and the next save() (or wait()) first waits for that write. A
    failed write raises SaveError from the next save() or wait().
    """

    def __init__(self, directory: pathlib.Path, config: Config, fresh: bool, lead: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.config = config
        if fresh and lead and self.directory.exists():
            shutil.rmtree(self.directory)  # a fresh run replaces the old one
        self.mngr = manager(self.directory, cleanup_tmp=True)
        if _DROP not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(_DROP)
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending: tuple[int, int, concurrent.futures.Future] | None = None  # (step, bytes, write)
        self.saved: int | None = self.mngr.latest_step()

    def restore(self, step: int, placement=None, total_steps: int | None = None) -> tuple[TrainState, dict]:
        return restore(self.mngr, step, self.config, placement, total_steps)

    def _failed(self, step: int, need: int, e: BaseException) -> SaveError:
        _drop_late_read_callbacks()  # the write's own callbacks fail after it, one traceback each
        try:
            free = f", {_megabytes(shutil.disk_usage(self.directory).free)} free there"
        except OSError:
            free = ""
        kept = f"the checkpoint of step {self.saved} is kept" if self.saved is not None else "no checkpoint is kept"
        return SaveError(f"checkpoint {self.directory}: saving step {step} failed ({_cause(e)}; it needs"
                         f" about {_megabytes(need)}{free}); {kept}")

    def wait(self) -> None:
        """Wait for the write in flight; SaveError if it failed."""
        if self.pending is None:
            return
        step, need, write = self.pending
        self.pending = None
        try:
            write.result()
        except Exception as e:
            raise self._failed(step, need, e) from None
        self.saved = step

    def _write(self, step: int, host: dict, progress: dict) -> None:
        self.mngr.save(step, args=_save_args(host, self.config, progress), force=True)
        self.mngr.wait_until_finished()

    def save(self, state: TrainState, progress: dict) -> None:
        """Copy the state to the host (blocking) and start writing it (not blocking)."""
        self.wait()
        step = int(state.step)
        host = host_state_tree(state)
        need = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(host))
        if jax.process_count() > 1:
            # Orbax's save is collective (barriers across processes): run in a second thread it
            # could interleave with the loop's own collectives in another order on another
            # process, and both would wait forever. Across processes a save is synchronous.
            try:
                self._write(step, host, progress)
            except Exception as e:
                raise self._failed(step, need, e) from None
            self.saved = step
            return
        self.pending = (step, need, self.writer.submit(self._write, step, host, progress))

    def close(self) -> None:
        """Wait for the last write and release the manager; SaveError if the write failed."""
        try:
            self.wait()
        finally:
            self.writer.shutdown()
            try:
                self.mngr.close()
            except Exception:  # a failed write was reported by wait(); closing must not hide it
                pass


def read_config(mngr: ocp.CheckpointManager, step: int) -> Config:
    try:
        d = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return Config.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{mngr.directory}/{step}: config item is not a minigpt_jax Config ({e})") from None
    except Exception as e:
        raise CheckpointError(f"{mngr.directory}/{step}: cannot read its config ({type(e).__name__}: {e})") from None


def config_differences(a: Config, b: Config) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k]]


def _structure(config: Config, total_steps: int | None) -> TrainState:
    """A fresh state of the config's structure. A cosine schedule needs the run's length to build
    its optimizer; without one (reading params, not training on) a constant schedule gives the
    same state structure."""
    if total_steps is None and config.lr_schedule == "cosine":
        config = config.replace(lr_schedule="constant")
    return create_state(config, total_steps=total_steps)


def restore(mngr: ocp.CheckpointManager, step: int, config: Config, placement=None,
            total_steps: int | None = None) -> tuple[TrainState, dict]:
    """The train state (laid out by `placement`, a minigpt_jax.placement.Placement) and progress
    saved at `step`; total_steps: the run's length, for a training state under a cosine schedule."""
    if placement is not None:  # built where it will live: nothing lands on an unlisted device
        with jax.default_device(placement.devices[0] if jax.process_count() == 1 else jax.local_devices()[0]):
            fresh = placement.put(_structure(config, total_steps))
    else:
        fresh = _structure(config, total_steps)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(fresh))
    try:
        got = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
            ),
        )
    except Exception as e:
        _drop_late_read_callbacks()
        raise CheckpointError(f"{mngr.directory}/{step}: cannot restore ({brief(e)})") from None
    s = got["state"]
    state = fresh.replace(step=s["step"], params=s["params"], opt_state=s["opt_state"])
    return state, got["progress"]


def verify(mngr: ocp.CheckpointManager, step: int, config: Config) -> dict:
    """Read all of `step` (its state as host arrays: 0.3 s for the baseline on a 2-core CPU)
    and check it against `config`, or raise CheckpointError: a damaged checkpoint is
    refused before a resumed run starts, not discovered by it."""
    where = f"{mngr.directory}/{step}"
    try:
        got = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), progress=ocp.args.JsonRestore())
        )
        state, progress = got["state"], got["progress"]
        saved = [np.shape(x) for x in jax.tree_util.tree_leaves(state)]  # a fresh state's step is an int
        saved_step = int(state["step"])
    except Exception as e:
        _drop_late_read_callbacks()
        raise CheckpointError(f"{where}: damaged, cannot be read ({brief(e)})") from None
    expected = [x.shape for x in jax.tree_util.tree_leaves(jax.eval_shape(lambda: state_tree(_structure(config, None))))]
    if saved != expected:
        i = next((i for i, (a, b) in enumerate(zip(saved, expected)) if a != b), min(len(saved), len(expected)))
        got, want = (saved[i] if i < len(saved) else "none"), (expected[i] if i < len(expected) else "none")
        raise CheckpointError(f"{where}: its state does not match its config (array {i} of {len(saved)}"
                              f" is {got}; expected {want})")
    if not isinstance(progress, dict) or not set(PROGRESS_KEYS) <= set(progress) \
            or progress["step"] != saved_step or saved_step != step:
        raise CheckpointError(f"{where}: its progress item does not match its state at step {saved_step}")
    return progress


def locate(path: pathlib.Path) -> tuple[pathlib.Path, int]:
    """(experiment folder, step) for an experiment folder (its latest step) or a step folder."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise CheckpointError(
            f"{path}: no checkpoint found; expected outcome/checkpoints/<name> or one of its step folders"
        )
    return path, steps[-1]


@dataclasses.dataclass(frozen=True)
class Saved:
    """One saved step as this module wrote it, read without a config's structure: what
    scripts/inspect_checkpoint.py shows. One field per Orbax item, plus where it lies."""

    path: pathlib.Path  # the step folder
    steps: list[int]  # every step saved beside it
    state: dict  # {"step", "params", "opt_state"} as NumPy arrays (optax's tuples as lists)
    config: dict  # the Config as saved (JSON), not validated: an older one still shows
    progress: dict  # progress_record()'s fields


def read_saved(path: pathlib.Path) -> Saved:
    """Every item of the latest step under an experiment folder (or of one step folder), as
    saved; CheckpointError (one line) if there is none or it cannot be read."""
    directory, step = locate(path)
    mngr = manager(directory)
    try:
        got = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore(),
            progress=ocp.args.JsonRestore()))
    except Exception as e:
        _drop_late_read_callbacks()
        raise CheckpointError(f"{directory}/{step}: not a readable minigpt_jax checkpoint"
                              f" ({brief(e)})") from None
    return Saved(directory / str(step), list(mngr.all_steps()), got["state"], got["config"],
                 got["progress"])


def load_params(path: pathlib.Path) -> tuple[dict, Config, int]:
    """Params, config and step of the latest checkpoint under an experiment folder
    (or of one step folder), on the default device. For generation and export."""
    directory, step = locate(path)
    mngr = manager(directory)
    config = read_config(mngr, step)
    state, _ = restore(mngr, step, config)
    return state.params, config, step


def check_resumable(out_dir: pathlib.Path, configs: dict[str, Config], data: str = "",
                    source: str = "") -> None:
    """Before any training: each experiment's latest checkpoint, where there is one, must be
    complete, readable in full, of the same config and trained on the same data (`data`:
    the fingerprint of `source`; a checkpoint that records none is not checked for it);
    CheckpointError (one line, with what to do) if not."""
    for name, c in configs.items():
        path = checkpoint_dir(out_dir, name)
        if not path.exists():
            continue
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder; expected the Orbax checkpoints of {name}")
        mngr = manager(path)
        steps = mngr.all_steps()
        if not steps:
            continue
        step = steps[-1]
        try:
            saved = read_config(mngr, step)
            diffs = config_differences(saved, c)
            progress = verify(mngr, step, c) if not diffs else {}
        except CheckpointError as e:
            instead = f"resume from step {steps[-2]}" if len(steps) > 1 else f"start {name} afresh"
            raise CheckpointError(
                f"checkpoint {e}; expected a complete checkpoint: delete {path / str(step)}"
                f" to {instead}, or run without --resume") from None
        if diffs:
            raise CheckpointError(
                f"checkpoint {path}/{step} was made with another config"
                f" ({'; '.join(diffs)} [saved vs now]); expected the same config: --set the saved"
                " values, or run without --resume to start afresh"
            )
        if data and progress.get("data") and progress["data"] != data:
            raise CheckpointError(
                f"checkpoint {path}/{step} was trained on other data (fingerprint"
                f" {progress['data'][:12]}...) than {source or 'the data given'} ({data[:12]}...);"
                " expected the same --data, or run without --resume to start afresh")
