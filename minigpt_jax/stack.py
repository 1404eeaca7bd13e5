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
  may differ in length) or when its loss is not finite: that variant is
  marked failed (its rows before the bad step and its last checkpoint stay,
  as in loop.py) and the others go on. A failed checkpoint write fails only
  its variant, whose state is still returned for export. Any other exception
  fails the whole stack.
- Blocks, dispatch-ahead, sampled evaluation and clock-and-step checkpoints
  follow loop.py; a block also ends at each variant's last step. Checkpoints
  are per variant, sliced from one host copy of the stacked state, in the
  unstacked layout: `--resume`, scripts/generate.py and exports see an
  ordinary run. A stacked resume needs the unfinished variants' latest
  checkpoints at one step (they are when the stack wrote them).
- One process, one device (no data parallelism inside a stack).
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from minigpt_jax import checkpoint, data, loop, optim, train
from minigpt_jax.config import Config, field_names
from minigpt_jax.placement import Placement

VALUE_FIELDS = ("lr", "weight_decay", "seed", "max_epochs", "val_fraction")  # may differ in a stack
_WHY = {  # field group -> why it must be equal
    ("vocab_size", "seq_len", "embed_dim", "n_heads", "n_layers", "ffn_mult", "batch_size"):
        "different shapes (params, optimizer state and batches are stacked along one axis)",
    ("dtype", "matmul_precision", "activation"):
        "a different compiled program (the compute dtype, matmul precision or FFN activation)",
    ("dropout",): "the attention dropout rate is a constant of the model's program (model.py), not a value",
    ("lr_schedule", "warmup_steps", "min_lr_ratio", "grad_clip", "decay_params"):
        "the schedule's shape, clipping and the decay mask are static in the optimizer (optim.py)",
    ("eval_every", "eval_batches", "ckpt_every", "ckpt_minutes", "num_workers", "segmentation"):
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


# --- the loop ----------------------------------------------------------------------------


def _common_step(names, steps, totals) -> int:
    """The step the unfinished variants resume from; they must agree."""
    behind = {n: s for n, s, t in zip(names, steps, totals) if s < t}
    if len(set(behind.values())) > 1:
        at = ", ".join(f"{n} at step {s}" for n, s in behind.items())
        raise ValueError(f"stacked resume needs the unfinished variants' checkpoints at one step ({at});"
                         " resume them without --stack, or start afresh")
    return next(iter(behind.values()), max(steps))


def run_stacked(
    experiments: list[loop.Experiment],
    prepared: data.Prepared | Sequence[data.Prepared],
    out_dir: pathlib.Path,
    max_steps: int | None = None,
    resume: bool = False,
    position: int = 0,
    stop: threading.Event | None = None,
    fuse: bool | None = None,
    extra_writers: Callable | None = None,
) -> list[loop.Result]:
    """Train the experiments as one stack on their shared device -> their Results, in order.

    prepared: one Prepared for all, or one per experiment (a variant runs as if
    alone only on its own: the held-out split depends on the seed). fuse: as in
    loop.run_experiment (default: fused blocks on accelerators, single steps on the CPU).
    extra_writers(experiment): more metric writers (W&B), as in loop.run_experiment.
    ValueError, before anything is written, if the experiments cannot be stacked.
    """
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
    V, c = len(experiments), configs[0]  # c: the settings the variants share
    preps = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared] * V
    place = Placement(experiments[0].devices)
    fuse = place.devices[0].platform != "cpu" if fuse is None else fuse
    out_dir = pathlib.Path(out_dir)
    start = time.perf_counter()
    dss = [data.batch_dataset(p.train, cv.batch_size, cv.seed, cv.max_epochs) for p, cv in zip(preps, configs)]
    totals = [len(ds) if max_steps is None else min(max_steps, len(ds)) for ds in dss]

    if any(optim.make_optimizer(cv, t) != optim.make_optimizer(c, totals[0]) for cv, t in zip(configs, totals)):
        # cosine schedules of different lengths (variants whose data differ in size)
        raise ValueError("cannot stack: the variants' optimizer programs differ (a cosine schedule's"
                         f" length is static; steps: {', '.join(map(str, totals))})")

    ckpts = [checkpoint.Checkpointer(checkpoint.checkpoint_dir(out_dir, e.name), e.config, not resume)
             for e in experiments]
    latest = [k.saved if resume else None for k in ckpts]
    states, progress = [], []
    try:
        for e, k, at, total in zip(experiments, ckpts, latest, totals):
            if at is not None:
                tqdm.write(f"{e.name}: resuming at step {at} from {k.directory / str(at)}", file=sys.stderr)
                s, p = k.restore(at, place, total)
            else:
                with jax.default_device(place.devices[0]):
                    s, p = train.create_state(e.config, total_steps=total), checkpoint.progress_record()
            states.append(s)
            progress.append(p)
        step = _common_step(names, [p["step"] for p in progress], totals)
    except Exception:
        for k in ckpts:
            k.close()
        raise
    state = place.put(stack_states(states))
    del states
    writers = [loop.metric_writer(out_dir, e.name, at, extra_writers(e) if extra_writers else [])
               for e, at in zip(experiments, latest)]
    rngs = place.put(jnp.stack([jax.random.PRNGKey(cv.seed + 1) for cv in configs]))
    samples = [list(loop.eval_groups(data.eval_sample(p.val, cv.eval_batches, cv.batch_size, cv.seed),
                                     place, cv.eval_batches)) if len(p.val) else []
               for p, cv in zip(preps, configs)]
    tokens = [p["tokens"] for p in progress]
    status = ["ok"] * V
    live = [p["step"] < t for p, t in zip(progress, totals)]  # training: not finished, not failed
    kept: dict[int, train.TrainState] = {}  # the sound state of a variant whose save failed
    T = max(totals)
    pad_BL = np.full((c.batch_size, c.seq_len), data.PAD_TOKEN_ID, np.int32)
    iters = [data.batch_iterator(ds, p["next_batch"], cv.num_workers)
             for ds, p, cv in zip(dss, progress, configs)]
    label = f"stack of {V} [{place.label}]"
    bar = tqdm(total=T, initial=step, desc=label, position=position, unit="step", dynamic_ncols=True, leave=True)
    t0 = time.perf_counter() - max(p["seconds"] for p in progress)
    last_ckpt = time.monotonic()
    last_read = time.perf_counter()
    pending = None  # (first step, n, active (n, V), device metrics) of the block not yet read

    def dispatch(state, n: int):
        """Dispatch the next n stacked steps: each active variant on its own next batch."""
        K = loop.BLOCK if fuse else n
        active = np.zeros((K, V), bool)
        batches = np.empty((K, V, *pad_BL.shape), np.int32)
        batches[:] = pad_BL  # inactive: any valid batch (all-PAD: no labels)
        for i in range(n):
            for v in range(V):
                if live[v] and step + i < totals[v]:
                    active[i, v] = True
                    batches[i, v] = next(iters[v])
        if fuse:
            state, m = stacked_steps(state, place.put(batches), rngs, place.put(active))
            return state, active[:n], m
        ms = []
        for i in range(n):
            state, m = stacked_step(state, place.put(batches[i]), rngs, place.put(active[i]))
            ms.append(m)
        return state, active, ms

    def drain() -> None:
        """Read the pending block's metrics; write each active variant's rows; fail a
        variant at its first non-finite loss."""
        nonlocal pending, last_read
        first, n, active, dev = pending
        pending = None
        got = jax.device_get(dev)
        if isinstance(got, list):  # single steps: n dicts of (V,)
            got = {k: np.stack([g[k] for g in got]) for k in got[0]}
        now = time.perf_counter()
        per_step, elapsed = (now - last_read) / n, now - t0
        last_read = now
        for v in range(V):
            steps = [i for i in range(n) if active[i, v]]
            if not live[v] or not steps:
                continue
            for i in steps:
                loss = float(got["loss"][i, v])
                if not math.isfinite(loss):
                    live[v] = False
                    status[v] = f"failed: {names[v]}: non-finite loss at step {first + i + 1}"
                    break
                tokens[v] += int(got["tokens"][i, v])
                writers[v].write_scalars(first + i + 1, {
                    "train/tokens": tokens[v], "train/loss": loss,
                    "train/perplexity": got["perplexity"][i, v], "train/lr": got["lr"][i, v],
                    "train/grad_norm": got["grad_norm"][i, v], "train/seconds": round(per_step, 6),
                    "train/elapsed": round(elapsed, 4)})
        losses = [float(got["loss"][n - 1, v]) for v in range(V) if live[v] and active[n - 1, v]]
        if losses:
            bar.set_postfix(loss=f"{min(losses):.3f}", tok_s=f"{sum(tokens) / max(elapsed, 1e-9):.0f}")
        bar.update(first + n - bar.n)

    try:
        while step < T and any(live):
            end = min([loop.block_end(step, T, c)] + [t for t in totals if t > step])
            state, active, dev = dispatch(state, end - step)
            if pending is not None:
                drain()  # the previous block, while this one runs
            pending = (step, end - step, active, dev)
            step = end
            ending = [live[v] and step == totals[v] for v in range(V)]
            eval_due = step % c.eval_every == 0 or any(ending)
            stopping = stop is not None and stop.is_set() and step < T
            clock = time.monotonic() - last_ckpt >= 60 * c.ckpt_minutes
            ckpt_due = (c.ckpt_every and step % c.ckpt_every == 0) or clock or stopping
            if not (eval_due or ckpt_due or any(ending)):
                continue
            drain()
            host = None
            for v in range(V):
                if not (live[v] and step <= totals[v]):
                    continue
                if len(preps[v].val) and (ending[v] or step % c.eval_every == 0):
                    groups = (loop.eval_groups(data.eval_batches(preps[v].val, configs[v].batch_size),
                                               place, configs[v].eval_batches)
                              if ending[v] else samples[v])
                    vl, vp = loop.evaluate(variant(state, v), groups)
                    writers[v].write_scalars(step, {"val/tokens": tokens[v], "val/loss": vl,
                                                    "val/perplexity": vp})
                if ckpt_due or ending[v]:
                    host = jax.device_get(state) if host is None else host  # one copy for all
                    writers[v].flush()  # what a resume keeps of the metrics is on disk first
                    try:
                        ckpts[v].save(variant(host, v), checkpoint.progress_record(
                            step, step, tokens[v], time.perf_counter() - t0))
                    except checkpoint.SaveError as e:
                        status[v], live[v] = f"failed: {e}", False
                        kept[v] = variant(host, v)
                if ending[v]:
                    live[v] = False  # finished: frozen from here on
                elif stopping and live[v]:
                    status[v] = f"stopped at step {step}"
            if ckpt_due:
                last_ckpt = time.monotonic()
            if stopping:
                break
    except Exception as e:  # noqa: BLE001 - the stack's own failure fails its variants, not the sweep
        traceback.print_exc()
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        for v in range(V):
            if status[v] == "ok" and live[v]:
                status[v] = f"failed: {reason}"
        state = None
    finally:
        bar.close()
        for v in range(V):
            try:
                ckpts[v].close()
            except checkpoint.SaveError as e:
                if status[v] == "ok" or status[v].startswith("stopped"):
                    status[v] = f"failed: {e}"
            try:
                writers[v].close()
            except OSError as e:
                status[v] = status[v] if status[v] != "ok" else f"failed: writing metrics: {e}"
    results = []
    seconds = time.perf_counter() - start
    for v, e in enumerate(experiments):
        if v in kept:
            s = place.put(kept[v])
        elif state is None or "non-finite" in status[v]:
            s = None  # diverged, or the stack broke: not exported
        else:
            s = variant(state, v)
        devices = frozenset(d for leaf in jax.tree_util.tree_leaves(s) for d in leaf.devices()) \
            if s is not None else frozenset()
        rows, val_rows = loop.read_rows(out_dir, e.name)
        results.append(loop.Result(e.name, e.config, place.label, rows, val_rows, seconds,
                                   status[v], e.overrides, devices, s))
    return results



# --- sweeps: stacks on their devices ----------------------------------------------------


def groups(experiments: Sequence[loop.Experiment]) -> list[list[int]]:
    """Indices of the experiments, grouped into stacks: same device(s) and stackable with the
    group's first, in input order. A group of one runs unstacked."""
    out: list[list[int]] = []
    for i, e in enumerate(experiments):
        for g in out:
            first = experiments[g[0]]
            if first.devices == e.devices and len(e.devices) == 1 and stackable([first.config, e.config])[0]:
                g.append(i)
                break
        else:
            out.append([i])
    return out

