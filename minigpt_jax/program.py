"""What the block driver (loop.py) runs: a program that trains V lanes, one experiment each.

`Program` declares the interface once; two programs implement it:
- `Plain` (here): a single experiment (V = 1) on its placement, the un-vmapped step, so its
  numbers and the PyTorch parity are the step's own;
- `stack.Stacked`: V variants of one shape on one device, the vmapped step.

The driver hands a program host batches of shape (K, V, B, L) with an `active` mask (K, V)
and reads back metrics of shape (n, V); everything else (data, blocks, metrics, evaluation,
checkpoints, stop, failures, progress) is the driver's, one code path for both.
"""

from __future__ import annotations

import abc

import jax
import numpy as np

from minigpt_jax import evaluation
from minigpt_jax.config import Config
from minigpt_jax.placement import Placement
from minigpt_jax.train import train_step, train_steps


class Program(abc.ABC):
    """A compiled training program over V lanes on one placement."""

    def __init__(self, place: Placement, fuse: bool):
        self.place = place  # where the program's state lives
        self.fuse = fuse  # a block is one fused dispatch of BLOCK steps (else single steps)

    @abc.abstractmethod
    def start(self, states: list, configs: list[Config]) -> tuple:
        """The lanes' own states and configs -> (the program's state, its dropout keys)."""

    @abc.abstractmethod
    def dispatch(self, state, rng, batches_KVBL: np.ndarray, n: int, active_KV: np.ndarray):
        """n steps, each active lane on its own batch -> (state, device metrics); nothing here
        waits. Steps past n (a short block's tail) and inactive lanes change nothing."""

    @abc.abstractmethod
    def lane(self, state, v: int):
        """Lane v's TrainState, on the device."""

    @abc.abstractmethod
    def for_saving(self, state) -> list:
        """Every lane's TrainState, in the unstacked layout checkpoints hold."""

    def host(self, dev, n: int) -> dict:
        """The device metrics of n steps as host arrays of shape (n, V) (waits)."""
        got = jax.device_get(dev)
        if isinstance(got, list):  # single steps: one metrics dict each
            got = {k: np.stack([g[k] for g in got]) for k in got[0]}
        return {k: np.asarray(v)[:n].reshape(n, -1) for k, v in got.items()}

    def put(self, host_state):
        """A host TrainState of one lane onto the program's placement."""
        return self.place.put(host_state)

    def evaluate(self, state, lanes: list[int], batches: list[list[np.ndarray]], group: int,
                 progress=None) -> list[evaluation.Evaluation]:
        """Lanes `lanes`, each over its own host batches, `group` batches per dispatch -> one
        Evaluation each (here one lane after another; a stack overrides it with one program)."""
        return [evaluation.evaluate_batches(self.lane(state, v), b, self.place, group, progress)
                for v, b in zip(lanes, batches)]


class Plain(Program):
    """A single experiment's program: the plain jitted step on one placement (V = 1)."""

    def start(self, states: list, configs: list[Config]):
        return states[0], self.place.put(jax.random.PRNGKey(configs[0].seed + 1))

    def dispatch(self, state, rng, batches_KVBL: np.ndarray, n: int, active_KV: np.ndarray):
        # its one lane is active in each of the n steps; fused steps past n are masked
        if self.fuse:
            put = self.place.put(batches_KVBL[:, 0], self.place.stacked_rows)
            return train_steps(state, put, rng, np.int32(n))
        out = []
        for i in range(n):
            state, m = train_step(state, self.place.put_batch(batches_KVBL[i, 0]), rng)
            out.append(m)
        return state, out

    def lane(self, state, v: int):
        return state

    def for_saving(self, state) -> list:
        return [state]  # the Checkpointer copies it to the host itself
