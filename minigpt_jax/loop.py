"""The one block driver: a single experiment, or a stack of V variants, trained so that nothing
around the step grows with the run.

- The driver (`drive`) trains V lanes, one experiment each, through a program
  (program.py declares what one does): `program.Plain` for a single experiment, the
  un-vmapped step, so its numbers and the PyTorch parity are the step's own;
  `stack.Stacked` for V variants of one shape in one vmapped program. Everything
  else (data, blocks, metrics, evaluation, checkpoints, stop, failures,
  progress) is this one code path for both.
- Steps go in blocks. A block ends at the next multiple of BLOCK steps, of
  eval_every, of ckpt_every (when set), at a lane's last step, or at the end:
  boundaries depend only on the absolute step, so a resumed run replays the
  dispatches of one that never stopped. On accelerators a block is one fused
  dispatch (a short block is the same program with its tail steps masked); on the
  CPU, single steps, which keeps resume bit-exact from any step.
- The host never waits on the block it just dispatched: block k+1 is dispatched
  before block k's metrics are read. Only at an evaluation, a checkpoint or a stop
  does the driver read the block it just ran.
- Evaluation every eval_every steps is a fixed, seeded sample of eval_batches
  held-out batches; at a lane's end, at most eval_final_batches (evaluation.py).
- Checkpoints are asynchronous (checkpoint.Checkpointer), every ckpt_minutes of
  wall time, every ckpt_every steps if set, at a lane's end and on a stop; only of a
  state whose metrics were read and finite. The stop and the clock are voted on
  across processes, so every process stops and saves at the same step.
- Metrics go through one seam (metrics.MultiWriter), appended to, never rewritten.
  `seconds` in a row is that step's own time: its block's wall time over its steps;
  `elapsed` is training time, without the first dispatch's compilation.
- A failure ends only its lane: a non-finite loss (its rows before the bad step and
  its last checkpoint stay; its state is not exported), a failed save (its state is
  sound and still exported). Any other exception fails every lane still training.
- Tokens are label tokens (non-PAD targets), so curves of experiments with
  different batch sizes share an x axis.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import threading
import time
import traceback
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from minigpt_jax import checkpoint, data, evaluation, metrics
from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.experiment import Experiment, Result
from minigpt_jax.host import any_process, sync
from minigpt_jax.options import RunOptions
from minigpt_jax.placement import Placement
from minigpt_jax.program import Plain, Program
from minigpt_jax.train import create_state

BLOCK = 10  # steps per block: one fused dispatch on accelerators, one host read of metrics
TRAIN_FIELDS = {"tokens": "train/tokens", "loss": "train/loss", "perplexity": "train/perplexity",
                "lr": "train/lr", "grad_norm": "train/grad_norm", "seconds": "train/seconds",
                "elapsed": "train/elapsed"}  # CSV column -> tag
VAL_FIELDS = {"tokens": "val/tokens", "val_loss": "val/loss", "val_perplexity": "val/perplexity"}


def block_end(step: int, total: int, c: Config) -> int:
    """The end (exclusive) of the block of steps that starts at `step`."""
    every = [BLOCK, c.eval_every] + ([c.ckpt_every] if c.ckpt_every else [])
    return min([total] + [(step // e + 1) * e for e in every])


def metric_writer(out_dir: pathlib.Path, name: str, resume_step: int | None,
                  extra: list | tuple = ()) -> metrics.Writer:
    """The experiment's writers; resume_step cuts each back to the checkpoint's step."""
    return metrics.MultiWriter([
        metrics.CsvWriter(out_dir, name, TRAIN_FIELDS, resume_step),
        metrics.CsvWriter(out_dir, f"{name}_val", VAL_FIELDS, resume_step),
        metrics.JsonlWriter(out_dir, name, resume_step),
        metrics.TensorBoardWriter(out_dir, name, resume_step),
        *extra,
    ])


def read_rows(out_dir: pathlib.Path, name: str) -> tuple[list[dict], list[dict]]:
    """The experiment's metrics as written: train rows and validation rows."""
    return (metrics.read_csv(pathlib.Path(out_dir) / f"metrics_{name}.csv"),
            metrics.read_csv(pathlib.Path(out_dir) / f"metrics_{name}_val.csv"))


@dataclasses.dataclass
class _Lane:
    """One experiment's part of a driver run."""

    exp: Experiment
    prepared: data.Prepared
    total: int
    ckpt: checkpoint.Checkpointer
    latest: int | None  # the step resumed from
    batches: object = None  # iterator over the lane's batches
    writer: metrics.Writer = None
    sample: list = dataclasses.field(default_factory=list)  # periodic evaluation, on device
    tokens: int = 0
    status: str = "ok"
    live: bool = True  # training: neither finished nor failed
    exported: bool = True  # its state is sound (False after a non-finite loss)
    kept: object = None  # host state of a lane whose save failed
    final_eval: evaluation.Evaluation | None = None
    phases: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.exp.name

    def fail(self, reason: str, exported: bool) -> None:
        self.status, self.live = f"failed: {reason}", False
        self.exported = self.exported and exported


def _open(experiments, preps, opts: RunOptions, place, lead) -> tuple[list, list, list]:
    """The lanes, each restored from its checkpoint or freshly initialised -> (lanes, states,
    progress records)."""
    lanes, states, progress = [], [], []
    try:
        for e, p in zip(experiments, preps):
            c = e.config
            ds = data.batch_dataset(p.train, c.batch_size, c.seed, c.max_epochs)
            total = len(ds) if opts.max_steps is None else min(opts.max_steps, len(ds))
            ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(opts.out, e.name), c,
                                           not opts.resume, lead)
            sync(f"fresh {e.name}")
            lane = _Lane(e, p, total, ckpt, ckpt.saved if opts.resume else None)
            lanes.append(lane)
            if lane.latest is not None:
                if lead:
                    tqdm.write(f"{e.name}: resuming at step {lane.latest} from"
                               f" {ckpt.directory / str(lane.latest)}", file=sys.stderr)
                s, pr = ckpt.restore(lane.latest, place, total)
            else:
                init = place.devices[0] if jax.process_count() == 1 else jax.local_devices()[0]
                with jax.default_device(init):  # initialise where it will live
                    s = place.put(create_state(c, params=e.params, total_steps=total))
                pr = checkpoint.progress_record()
            lane.batches = data.batch_iterator(ds, pr["next_batch"], c.num_workers)
            lane.tokens = pr["tokens"]
            states.append(s)
            progress.append(pr)
    except BaseException:
        for lane in lanes:
            lane.ckpt.close()
        raise
    return lanes, states, progress


def common_step(names: Sequence[str], steps: Sequence[int], totals: Sequence[int]) -> int:
    """The step the unfinished lanes resume from; they must agree."""
    behind = {n: s for n, s, t in zip(names, steps, totals) if s < t}
    if len(set(behind.values())) > 1:
        at = ", ".join(f"{n} at step {s}" for n, s in behind.items())
        raise ValueError("stacked resume needs the unfinished variants' checkpoints at one step"
                         f" ({at}); resume them without --stack, or start afresh")
    return next(iter(behind.values()), max(steps))


class _Run:
    """The driver's state between blocks: lanes, pending block, progress bar, clocks."""

    def __init__(self, lanes, program: Program, step, prior, position, lead, label):
        self.lanes, self.program, self.lead = lanes, program, lead
        self.V = len(lanes)
        c = lanes[0].exp.config
        self.pad_BL = np.full((c.batch_size, c.seq_len), PAD_TOKEN_ID, np.int32)
        self.bar = tqdm(total=max(ln.total for ln in lanes), initial=step, desc=label,
                        disable=not lead, position=position, unit="step", dynamic_ncols=True,
                        leave=True)
        self.t0 = time.perf_counter() - prior  # training time continues across resumes
        self.last_read = time.perf_counter()
        self.last_ckpt = time.monotonic()
        self.compiled = False
        self.position = position

    def dispatch(self, state, rng, step: int, n: int):
        """The next n steps, each live lane on its own next batch -> (state, pending block)."""
        K = BLOCK if self.program.fuse else n
        active = np.zeros((K, self.V), bool)
        batches = np.empty((K, self.V, *self.pad_BL.shape), np.int32)
        batches[:] = self.pad_BL  # inactive steps: any valid batch (all PAD: no labels)
        for i in range(n):
            for v, lane in enumerate(self.lanes):
                if lane.live and step + i < lane.total:
                    active[i, v] = True
                    batches[i, v] = next(lane.batches)
        t = time.perf_counter()
        state, dev = self.program.dispatch(state, rng, batches, n, active)
        if not self.compiled:  # tracing and compilation are synchronous; the run is not
            self.compiled = True
            seconds = time.perf_counter() - t
            self.t0 += seconds
            self.last_read += seconds
            for lane in self.lanes:
                lane.phases["compile"] = lane.phases.get("compile", 0.0) + seconds
            if self.lead:
                tqdm.write(f"{self.bar.desc}: step program traced and compiled in {seconds:.1f} s",
                           file=sys.stderr)
        return state, (step, n, active[:n], dev)

    def drain(self, pending) -> None:
        """Read a block's metrics; write each active lane's rows; fail a lane at its first
        non-finite loss."""
        first, n, active, dev = pending
        got = self.program.host(dev, n)
        now = time.perf_counter()
        per_step, elapsed = (now - self.last_read) / n, now - self.t0
        self.last_read = now
        for v, lane in enumerate(self.lanes):
            for i in (i for i in range(n) if active[i, v] and lane.live):
                loss = float(got["loss"][i, v])
                if not math.isfinite(loss):
                    lane.fail(f"{lane.name}: non-finite loss at step {first + i + 1}",
                              exported=False)
                    break
                lane.tokens += int(got["tokens"][i, v])
                lane.writer.write_scalars(first + i + 1, {
                    "train/tokens": lane.tokens, "train/loss": loss,
                    "train/perplexity": got["perplexity"][i, v], "train/lr": got["lr"][i, v],
                    "train/grad_norm": got["grad_norm"][i, v], "train/seconds": round(per_step, 6),
                    "train/elapsed": round(elapsed, 4)})
        losses = [float(got["loss"][n - 1, v]) for v, ln in enumerate(self.lanes)
                  if ln.live and active[n - 1, v]]
        if losses:
            with np.errstate(over="ignore"):
                ppl = float(np.exp(min(losses)))
            tokens = sum(ln.tokens for ln in self.lanes)
            self.bar.set_postfix(loss=f"{min(losses):.3f}", ppl=f"{ppl:.1f}",
                                 tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        self.bar.update(first + n - self.bar.n)

    def boundary(self, state, step: int, ending: list[bool], ckpt_due: bool,
                 stopping: bool) -> None:
        """At a block boundary whose metrics were read: evaluations, checkpoints, the end of
        lanes, a stop."""
        saving = None  # the lanes' states for saving, made once for all
        due = [v for v, lane in enumerate(self.lanes) if lane.live and step <= lane.total]
        finals = [v for v in due if ending[v] and len(self.lanes[v].prepared.val)]
        if finals:
            self.final_evaluations(state, finals, step)
        for v in due:
            lane = self.lanes[v]
            c = lane.exp.config
            if len(lane.prepared.val) and not ending[v] and step % c.eval_every == 0:
                e = evaluation.evaluate(self.program.lane(state, v), lane.sample)
                self.write_eval(lane, step, e)
            if ckpt_due or ending[v]:
                saving = self.program.for_saving(state) if saving is None else saving
                lane.writer.flush()  # what a resume keeps of the metrics is on disk first
                try:
                    lane.ckpt.save(saving[v], checkpoint.progress_record(
                        step, step, lane.tokens, time.perf_counter() - self.t0, lane.exp.data_id))
                except checkpoint.SaveError as e:
                    lane.fail(str(e), exported=True)
                    lane.kept = jax.device_get(saving[v])
            if ending[v] and lane.live:
                lane.live = False  # finished: frozen from here on
            elif stopping and lane.live:
                lane.status = f"stopped at step {step}"
        if ckpt_due:
            self.last_ckpt = time.monotonic()

    def final_evaluations(self, state, lanes: list[int], step: int) -> None:
        """The end-of-run evaluation of the lanes ending at `step`, in one pass of the program
        (a stack: one vmapped program for all of them), at most eval_final_batches each."""
        t = time.perf_counter()
        c = self.lanes[lanes[0]].exp.config  # batch size and eval_batches: shared (stackable)
        batches = []
        for v in lanes:
            lc = self.lanes[v].exp.config
            batches.append(evaluation.final_batches(self.lanes[v].prepared.val,
                                                    lc.eval_final_batches, lc.batch_size,
                                                    lc.data_seed))
        name = self.lanes[lanes[0]].name if len(lanes) == 1 else f"{len(lanes)} lanes"
        desc = f"{name}: final evaluation" if self.lead else None
        with evaluation.progress(max(map(len, batches)), desc, self.position) as bar:
            got = self.program.evaluate(state, lanes, batches, c.eval_batches, bar)
        seconds = (time.perf_counter() - t) / len(lanes)  # the pass's time, shared by its lanes
        for v, e in zip(lanes, got):
            lane = self.lanes[v]
            lane.final_eval = e
            lane.phases["final_eval"] = seconds
            self.write_eval(lane, step, e)

    def write_eval(self, lane: _Lane, step: int, e: evaluation.Evaluation) -> None:
        lane.writer.write_scalars(step, {"val/tokens": lane.tokens, "val/loss": e.loss,
                                         "val/perplexity": e.perplexity})

    def close(self) -> None:
        """Wait for the last saves and close the writers; their failures fail their lane."""
        self.bar.close()
        for lane in self.lanes:
            # training time: the run's, less its compilation (already out of t0) and final
            # evaluation
            lane.phases["train"] = (time.perf_counter() - self.t0
                                    - lane.phases.get("final_eval", 0.0))
            try:
                lane.ckpt.close()
            except checkpoint.SaveError as e:
                if lane.status == "ok" or lane.status.startswith("stopped"):
                    lane.status = f"failed: {e}"
            try:
                lane.writer.close()
            except OSError as e:  # the metrics' own disk may be the one that is full
                lane.status = (lane.status if lane.status != "ok"
                               else f"failed: writing metrics: {e}")


def _loop(run: _Run, state, rng, step: int, stop: threading.Event | None):
    """Blocks until every lane has finished or failed, or a stop -> the final state."""
    lanes = run.lanes
    c = lanes[0].exp.config  # the settings the lanes share (stack.stackable)
    T = max(lane.total for lane in lanes)
    pending = None
    while step < T and any(lane.live for lane in lanes):
        end = min([block_end(step, T, c)] + [lane.total for lane in lanes if lane.total > step])
        state, block = run.dispatch(state, rng, step, end - step)
        if pending is not None:
            run.drain(pending)  # the previous block, while this one runs
        pending, step = block, end
        ending = [lane.live and step == lane.total for lane in lanes]
        eval_due = step % c.eval_every == 0 or any(ending)
        stopping = any_process(stop is not None and stop.is_set()) and step < T
        clock = any_process(time.monotonic() - run.last_ckpt >= 60 * c.ckpt_minutes)
        ckpt_due = bool(c.ckpt_every and step % c.ckpt_every == 0) or clock or stopping
        if not (eval_due or ckpt_due):
            continue
        run.drain(pending)
        pending = None
        run.boundary(state, step, ending, ckpt_due, stopping)
        if stopping:
            break
    return state


def drive(experiments: list[Experiment], prepared: Sequence[data.Prepared], opts: RunOptions,
          program: type[Program] = Plain) -> list[Result]:
    """Train the experiments (one, or a stack that shares a device) -> their Results, in order.

    program: the Program class the lanes run (`Plain`: one experiment; `stack.Stacked`).
    opts.fuse: fused blocks (None: on accelerators, where a step is short enough for dispatch
    to matter; on the CPU single steps keep resume bit-exact from any step).
    """
    place = Placement(experiments[0].devices)
    fuse = place.devices[0].platform != "cpu" if opts.fuse is None else opts.fuse
    prog = program(place, fuse)
    lead = jax.process_index() == 0  # only process 0 writes outputs; all write checkpoints
    start = time.perf_counter()
    lanes, states, progress = _open(experiments, prepared, opts, place, lead)
    try:
        step = common_step([ln.name for ln in lanes], [p["step"] for p in progress],
                           [ln.total for ln in lanes])
    except ValueError:
        for lane in lanes:
            lane.ckpt.close()
        raise
    state, rng = prog.start(states, [e.config for e in experiments])
    del states
    for lane, p in zip(lanes, progress):
        extra = opts.writers(lane.exp) if opts.writers is not None and lead else []
        lane.writer = (metric_writer(opts.out, lane.name, lane.latest, extra) if lead
                       else metrics.MultiWriter([]))
        lane.live = p["step"] < lane.total
        c = lane.exp.config
        if len(lane.prepared.val):
            lane.sample = list(evaluation.groups(data.eval_sample(
                lane.prepared.val, c.eval_batches, c.batch_size, c.data_seed), place,
                c.eval_batches))
    label = (f"{experiments[0].name} [{place.label}]" if len(lanes) == 1
             else f"stack of {len(lanes)} [{place.label}]")
    run = _Run(lanes, prog, step, max(p["seconds"] for p in progress), opts.position, lead, label)
    try:
        state = _loop(run, state, rng, step, opts.stop)
    except Exception as e:  # one experiment's failure must not end the others
        traceback.print_exc()
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        for lane in lanes:
            if lane.live:
                lane.fail(reason, exported=False)
        state = None
    finally:
        run.close()
    return _results(lanes, prog, state, opts.out, lead, time.perf_counter() - start)


def _results(lanes, prog, state, out_dir, lead, seconds) -> list[Result]:
    results = []
    for v, lane in enumerate(lanes):
        if lane.kept is not None:
            s = prog.put(lane.kept)  # a failed save: the state is sound
        elif state is None or not lane.exported:
            s = None  # diverged, or the run broke: not exported
        else:
            s = prog.lane(state, v)
        devices = frozenset(d for leaf in jax.tree_util.tree_leaves(s) for d in leaf.devices()) \
            if s is not None else frozenset()
        rows, val_rows = read_rows(out_dir, lane.name) if lead else ([], [])
        results.append(Result(lane.name, lane.exp.config, prog.place.label, rows, val_rows, seconds,
                              lane.status, lane.exp.overrides, devices, s, lane.final_eval,
                              lane.phases, len(lanes), lane.exp.experiment))
    return results


def run_experiment(exp: Experiment, prepared: data.Prepared, opts: RunOptions) -> Result:
    """Train one experiment on its device(s): `drive` of a stack of one, with the plain step."""
    return drive([exp], [prepared], opts)[0]
