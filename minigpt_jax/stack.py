"""Variants of one shape trained together on one device: one vmapped, jitted program.

- The variants' TrainStates are stacked along a leading axis V (params,
  opt_state, step); `stacked_step` is `jax.vmap(train._step)`, jitted once
  for the shape. What differs between variants must therefore be a value in
  the state or an input: lr and weight decay (optimizer state, optim.py),
  the seed (each variant's init, data order, held-out split and dropout
  keys), and what only changes a variant's data or length (max_epochs,
  val_fraction). Everything else is part of the compiled program or of the
  stack's one schedule and must be equal: `stackable` says which and why.
- Each variant runs as if alone: its own batches (`data.batch_dataset` over
  its own Prepared and seed), its own dropout keys (`fold_in(PRNGKey(seed + 1),
  step)`, from its own step), its own evaluation sample, metrics files,
  Checkpointer and Result. Per-step losses equal the variant's separate
  `loop.run_experiment` within float32 rounding (a vmapped matmul is not the
  same kernel as a single one): tests/test_stack.py states the tolerance.
- A variant stops training by a mask, not a new program: `active` (V,) is an
  input, and an inactive variant's state is carried through unchanged (a
  select). A variant is inactive once it reaches its own last step (variants
  may differ in length) or once it failed (loop.py: failures end only their lane).
- The training itself is loop.drive, the driver a single experiment also runs,
  with `Stacked` as its program: checkpoints are per variant, sliced from one host
  copy of the stacked state, in the unstacked layout (`--resume`, generate.py and
  exports see an ordinary run). A stacked resume needs the unfinished variants'
  latest checkpoints at one step (they are when the stack wrote them).
- One process, one device (no data parallelism inside a stack).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from minigpt_jax import data, evaluation, loop, optim, train
from minigpt_jax.config import Config, field_names
from minigpt_jax.options import RunOptions
from minigpt_jax.program import Program

VALUE_FIELDS = ("lr", "weight_decay", "seed", "data_seed", "max_epochs", "val_fraction")  # may differ
_WHY = {  # field group -> why it must be equal
    ("vocab_size", "seq_len", "embed_dim", "n_heads", "n_layers", "ffn_mult", "batch_size"):
        "different shapes (params, optimizer state and batches are stacked along one axis)",
    ("dtype", "matmul_precision", "activation"):
        "a different compiled program (the compute dtype, matmul precision or FFN activation)",
    ("dropout",): "the attention dropout rate is a constant of the model's program (model.py), not a value",
    ("lr_schedule", "warmup_steps", "min_lr_ratio", "grad_clip", "decay_params"):
        "the schedule's shape, clipping and the decay mask are static in the optimizer (optim.py)",
    ("eval_every", "eval_batches", "eval_final_batches", "ckpt_every", "ckpt_minutes", "num_workers", "segmentation"):
        "run settings the stack shares (one block, evaluation and checkpoint schedule, one data layout)",
}


def stackable(configs: Sequence[Config], names: Sequence[str] | None = None) -> tuple[bool, str]:
    """(True, "") if these configs can train as one stack, else (False, the first reason)."""
    if not configs:
        return False, "no variants to stack"
    names = list(names) if names is not None else [f"variant {i}" for i in range(len(configs))]
    first = configs[0]
    for name, c in zip(names[1:], configs[1:]):
        for group, why in _WHY.items():
            diffs = [f"{k}: {getattr(first, k)!r} vs {getattr(c, k)!r}" for k in group
                     if getattr(first, k) != getattr(c, k)]
            if diffs:
                return False, f"{names[0]} and {name} differ in {', '.join(diffs)}: {why}"
        if first.lr_schedule == "cosine" and first.max_epochs != c.max_epochs:
            return False, (f"{names[0]} and {name} differ in max_epochs ({first.max_epochs} vs"
                           f" {c.max_epochs}) under lr_schedule=cosine, whose length is static")
    unknown = set(field_names()) - set(VALUE_FIELDS) - {k for g in _WHY for k in g}
    assert not unknown, f"stack.py does not say whether {sorted(unknown)} may differ"
    return True, ""


# --- the stacked state and step ----------------------------------------------------------


def stack_states(states: Sequence[train.TrainState]) -> train.TrainState:
    """States of one program -> one state whose every leaf has a leading variant axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *states)


def variant(state: train.TrainState, v: int) -> train.TrainState:
    """Variant v's state, sliced out of a stacked one (device or host arrays)."""
    return jax.tree_util.tree_map(lambda x: x[v], state)


def _keep(active_V: jax.Array, new, old):
    """new where the variant is active, else old, leaf by leaf."""
    def select(a, b):
        return jnp.where(active_V.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return jax.tree_util.tree_map(select, new, old)


def _stacked(state, batches_VBL, rngs_V, active_V):
    new, m = jax.vmap(train._step)(state, batches_VBL, rngs_V)
    return _keep(active_V, new, state), m


@functools.partial(jax.jit, donate_argnums=0)
def stacked_step(state, batches_VBL, rngs_V, active_V):
    """One AdamW step of every variant on its own (B, L) batch -> metrics of shape (V,);
    inactive variants' states are carried through unchanged."""
    return _stacked(state, batches_VBL, rngs_V, active_V)


@functools.partial(jax.jit, donate_argnums=0)
def stacked_steps(state, batches_KVBL, rngs_V, active_KV):
    """K stacked steps in one dispatch (lax.scan) -> metrics of shape (K, V); a step where a
    variant is inactive (a short block's tail, a finished or failed variant) changes nothing."""
    return lax.scan(lambda s, xs: _stacked(s, xs[0], rngs_V, xs[1]), state, (batches_KVBL, active_KV))


# --- the program the driver runs, and the checks before it -----------------------------


class Stacked(Program):
    """V variants' program for the driver (loop.drive): the vmapped step on one device."""

    def start(self, states: list, configs: list[Config]):
        keys = jnp.stack([jax.random.PRNGKey(c.seed + 1) for c in configs])
        return self.place.put(stack_states(states)), self.place.put(keys)

    def dispatch(self, state, rngs, batches_KVBL: np.ndarray, n: int, active_KV: np.ndarray):
        if self.fuse:
            return stacked_steps(state, self.place.put(batches_KVBL), rngs,
                                 self.place.put(active_KV))
        out = []
        for i in range(n):
            state, m = stacked_step(state, self.place.put(batches_KVBL[i]), rngs,
                                    self.place.put(active_KV[i]))
            out.append(m)
        return state, out

    def lane(self, state, v: int):
        return variant(state, v)

    def evaluate(self, state, lanes: list[int], batches: list[list[np.ndarray]], group: int,
                 progress=None) -> list[evaluation.Evaluation]:
        """Every listed lane in one vmapped program (evaluation.evaluate_stack): the stack's
        final evaluation is one pass over the batches, not one per variant."""
        if len(lanes) == 1:
            return super().evaluate(state, lanes, batches, group, progress)
        own = dict(zip(lanes, batches))
        every = [own.get(v, []) for v in range(len(state.step))]
        got = evaluation.evaluate_stack(state, every, self.place, group, progress)
        return [got[v] for v in lanes]

    def for_saving(self, state) -> list:
        """Every variant's state, sliced from one host copy of the stacked state."""
        host = jax.device_get(state)
        return [variant(host, v) for v in range(len(host.step))]


def check(experiments: Sequence[loop.Experiment], preps: Sequence[data.Prepared],
          max_steps: int | None) -> None:
    """ValueError, before anything is written, if the experiments cannot train as one stack."""
    names = [e.name for e in experiments]
    configs = [e.config for e in experiments]
    ok, reason = stackable(configs, names)
    if not ok:
        raise ValueError(f"cannot stack: {reason}")
    if len({e.devices for e in experiments}) != 1 or len(experiments[0].devices) != 1:
        raise ValueError("cannot stack: stacked variants share one device; got "
                         + ", ".join(f"{e.name} on {e.label}" for e in experiments))
    if jax.process_count() > 1:
        raise ValueError("cannot stack: stacked variants run in one process")
    totals = [data.steps_per_epoch(len(p.train), c.batch_size) * c.max_epochs for p, c in zip(preps, configs)]
    totals = [t if max_steps is None else min(max_steps, t) for t in totals]
    first = optim.make_optimizer(configs[0], totals[0])
    if any(optim.make_optimizer(c, t) != first for c, t in zip(configs, totals)):
        # cosine schedules of different lengths (variants whose data differ in size)
        raise ValueError("cannot stack: the variants' optimizer programs differ (a cosine schedule's"
                         f" length is static; steps: {', '.join(map(str, totals))})")


def run_stacked(experiments: list[loop.Experiment],
                prepared: data.Prepared | Sequence[data.Prepared],
                opts: RunOptions) -> list[loop.Result]:
    """Train the experiments as one stack on their shared device -> their Results, in order.

    prepared: one Prepared for all, or one per experiment (a variant runs as if alone only
    on its own: the held-out split depends on the seed). The rest as loop.drive.
    """
    preps = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared] * len(experiments)
    check(experiments, preps, opts.max_steps)
    return loop.drive(experiments, preps, opts, Stacked)


# --- sweeps: stacks on their devices ----------------------------------------------------


def groups(experiments: Sequence[loop.Experiment], key=None) -> list[list[int]]:
    """Indices of the experiments, grouped into stacks: same device(s), the same `key`
    (experiment -> a value; default: any) and stackable with the group's first, in input order.
    A group of one runs unstacked."""
    out: list[list[int]] = []
    same = key or (lambda e: None)
    for i, e in enumerate(experiments):
        for g in out:
            first = experiments[g[0]]
            if (first.devices == e.devices and len(e.devices) == 1 and same(first) == same(e)
                    and stackable([first.config, e.config])[0]):
                g.append(i)
                break
        else:
            out.append([i])
    return out

