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
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from minigpt_jax.config import Config, ConfigError
from minigpt_jax.train import TrainState, create_state


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or of another config."""


def manager(directory: pathlib.Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        ),
    )


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
        raise CheckpointError(
            f"{mngr.directory}/{step}: cannot restore ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    s = got["state"]
    state = fresh.replace(step=s["step"], params=s["params"], opt_state=s["opt_state"])
    return state, got["progress"]


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
