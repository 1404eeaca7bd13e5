"""Orbax checkpoints of one experiment: train state, config and progress.

Layout: `<out>/checkpoints/<name>/<step>/` with three Orbax items:
- `state`: {"step", "params", "opt_state"} (StandardSave; plain Orbax restores it);
- `config`: the full Config as JSON, so a checkpoint says what it is;
- `progress`: the grain iterator state (the next batch index: the stream is a
  random-access MapDataset) and the metrics rows so far, so a resumed run
  writes the same CSV and curves as one that never stopped.
Saves are synchronous: the train step donates its state buffers, and on the
CPU an async save could read a buffer the next step has already reused.
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


def save(mngr: ocp.CheckpointManager, state: TrainState, config: Config, progress: dict) -> None:
    step = int(state.step)
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree(state)),
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


def restore(mngr: ocp.CheckpointManager, step: int, config: Config, device=None) -> tuple[TrainState, dict]:
    """The train state (on `device`) and progress saved at `step`."""
    fresh = create_state(config)
    if device is not None:
        fresh = jax.device_put(fresh, device)
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


def load_params(path: pathlib.Path) -> tuple[dict, Config, int]:
    """Params, config and step of the latest checkpoint under an experiment folder
    (or of one step folder), on the default device. For generation and export."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if (path / "state").is_dir() and path.name.isdigit():
        mngr, step = manager(path.parent), int(path.name)
    else:
        mngr = manager(path)
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{path}: no checkpoint found; expected an experiment folder under outcome/checkpoints/")
    config = read_config(mngr, step)
    state, _ = restore(mngr, step, config)
    return state.params, config, step
