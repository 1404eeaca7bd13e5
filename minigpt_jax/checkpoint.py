"""Orbax checkpoints of one experiment: train state, config and progress.

Layout: `<out>/checkpoints/<name>/<step>/` with three Orbax items:
- `state`: {"step", "params", "opt_state"} (StandardSave; plain Orbax restores it);
- `config`: the full Config as JSON, so a checkpoint says what it is;
- `progress`: the grain iterator state (the next batch index: the stream is a
  random-access MapDataset) and the metrics rows so far, so a resumed run
  writes the same CSV and curves as one that never stopped.
The state is copied to host NumPy arrays and saved synchronously: the train
step donates its buffers, so nothing may read them after the next step; and a
checkpoint without a device layout restores on any machine.
A save is written to `<step>.orbax-checkpoint-tmp-*` and renamed when complete,
so a process killed while saving leaves no step folder, only a temporary one
that `latest_step` ignores (and a training manager deletes).
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from minigpt_jax.config import Config, ConfigError
from minigpt_jax.train import TrainState, create_state


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or of another config."""


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


def save(mngr: ocp.CheckpointManager, state: TrainState, config: Config, progress: dict) -> None:
    step = int(state.step)
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state_tree(state)),
            config=ocp.args.JsonSave(config.to_dict()),
            progress=ocp.args.JsonSave(progress),
        ),
        force=True,
    )
    mngr.wait_until_finished()


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


def restore(mngr: ocp.CheckpointManager, step: int, config: Config, placement=None) -> tuple[TrainState, dict]:
    """The train state (laid out by `placement`, a minigpt_jax.placement.Placement) and progress saved at `step`."""
    fresh = create_state(config)
    if placement is not None:
        fresh = placement.put(fresh)
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


def verify(mngr: ocp.CheckpointManager, step: int, config: Config) -> None:
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
    expected = [x.shape for x in jax.tree_util.tree_leaves(jax.eval_shape(lambda: state_tree(create_state(config))))]
    if saved != expected:
        i = next((i for i, (a, b) in enumerate(zip(saved, expected)) if a != b), min(len(saved), len(expected)))
        got, want = (saved[i] if i < len(saved) else "none"), (expected[i] if i < len(expected) else "none")
        raise CheckpointError(f"{where}: its state does not match its config (array {i} of {len(saved)}"
                              f" is {got}; expected {want})")
    if not isinstance(progress, dict) or not {"next_batch", "rows", "val_rows"} <= set(progress) \
            or progress["next_batch"] != saved_step or saved_step != step:
        raise CheckpointError(f"{where}: its progress item does not match its state at step {saved_step}")


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


def load_params(path: pathlib.Path) -> tuple[dict, Config, int]:
    """Params, config and step of the latest checkpoint under an experiment folder
    (or of one step folder), on the default device. For generation and export."""
    directory, step = locate(path)
    mngr = manager(directory)
    config = read_config(mngr, step)
    state, _ = restore(mngr, step, config)
    return state.params, config, step
