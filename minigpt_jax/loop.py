"""One experiment's training loop, built so that nothing around the step grows with the run.

- Steps go in blocks. A block ends at the next multiple of BLOCK steps, of
  eval_every, of ckpt_every (when set), or at the end: boundaries depend only
  on the absolute step, so a resumed run replays the dispatches of one that
  never stopped. On accelerators a block is one `train_steps` dispatch (a
  short block is the same program with its tail steps masked); on the CPU, a
  block is single steps, which keeps resume bit-exact from any step.
- The host never waits on the step it just dispatched: block k+1 is built and
  dispatched before block k's metrics are read. Only at an evaluation, a
  checkpoint or a stop does the loop read the block it just ran.
- Evaluation every eval_every steps is a fixed, seeded sample of eval_batches
  held-out batches, in one dispatch; the whole held-out set once at the end.
- Checkpoints are asynchronous (checkpoint.Checkpointer), every ckpt_minutes
  of wall time, every ckpt_every steps if set, at the end and on a stop. A
  checkpoint is only taken of a state whose metrics were read and finite.
- Metrics go through one seam (metrics.MultiWriter): the train CSV, the
  validation CSV, JSONL and TensorBoard, each appended to, never rewritten.
  `seconds` in a row is that step's own time: its block's wall time over its steps.
- A failure (an exception, a non-finite loss, a failed save) ends only this
  experiment, whose last checkpoint and metrics stay.
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
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from minigpt_jax import checkpoint, data, evaluation, metrics, report
from minigpt_jax.config import Config, num_params
from minigpt_jax.placement import Placement
from minigpt_jax.train import create_state, train_step, train_steps

BLOCK = 10  # steps per block: one fused dispatch on accelerators, one host read of metrics
TRAIN_FIELDS = {"tokens": "train/tokens", "loss": "train/loss", "perplexity": "train/perplexity",
                "lr": "train/lr", "grad_norm": "train/grad_norm", "seconds": "train/seconds",
                "elapsed": "train/elapsed"}  # CSV column -> tag
VAL_FIELDS = {"tokens": "val/tokens", "val_loss": "val/loss", "val_perplexity": "val/perplexity"}


@dataclasses.dataclass
class Experiment:
    name: str
    config: Config
    devices: tuple  # one device, or several for data parallelism
    overrides: str = ""  # human-readable overrides, for the results table

    def __post_init__(self):
        if isinstance(self.devices, jax.Device):
            self.devices = (self.devices,)
        self.devices = tuple(self.devices)
        if self.config.batch_size % len(self.devices):
            raise ValueError(f"{self.name}: batch_size={self.config.batch_size} is not divisible by"
                             f" the {len(self.devices)} data-parallel devices")

    @property
    def label(self) -> str:
        return Placement(self.devices).label


@dataclasses.dataclass
class Result:
    name: str
    config: Config
    device: str
    rows: list[dict]  # per step (read back from metrics_<name>.csv): step, tokens, loss, ...
    val_rows: list[dict]  # per evaluation: step, tokens, val_loss, val_perplexity
    seconds: float  # wall time of this invocation (training, evaluation and checkpoints)
    status: str = "ok"  # ok | stopped at step k | failed: reason
    overrides: str = ""
    state_devices: frozenset = frozenset()  # devices holding the final train state
    state: object = None  # the final TrainState (for exports and in-process callers)

    @property
    def steps(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0

    @property
    def tokens(self) -> int:
        return int(self.rows[-1]["tokens"]) if self.rows else 0

    def table_row(self) -> dict:
        last = self.rows[-1] if self.rows else {}
        val = self.val_rows[-1] if self.val_rows else {}
        # the mean of the last smoothing window: the end of the plotted curve, not one noisy batch
        loss = float(report.smooth([r["loss"] for r in self.rows])[-1]) if self.rows else None
        with np.errstate(over="ignore"):
            ppl = float(np.exp(loss)) if loss is not None else None
        elapsed = last.get("elapsed")
        row = {
            "experiment": self.name,
            "final_loss": last.get("loss"),  # the PyTorch project's column: the last step's loss
            "final_perplexity": last.get("perplexity"),
            "overrides": self.overrides,
            "parameters": num_params(self.config),
            "device": self.device,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_loss": loss,
            "train_perplexity": ppl,
            "val_loss": val.get("val_loss"),
            "val_perplexity": val.get("val_perplexity"),
            "wall_seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens / elapsed, 1) if elapsed else None,
            "status": self.status,
        }
        # A diverging run's losses overflow exp(); an infinite cell is left empty ("-"), as NaN is.
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class NonFiniteLoss(RuntimeError):
    pass


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True if `flag` is true in any process: every process must stop at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def block_end(step: int, total: int, c: Config) -> int:
    """The end (exclusive) of the block of steps that starts at `step`."""
    every = [BLOCK, c.eval_every] + ([c.ckpt_every] if c.ckpt_every else [])
    return min([total] + [(step // e + 1) * e for e in every])


def run_block(state, batches, n: int, rng, place: Placement, fuse: bool):
    """Dispatch n training steps on the next n batches -> (state, device metrics of n steps).

    Fused: one `train_steps` program of BLOCK steps whose steps past n are masked,
    so a short block compiles nothing new. Nothing here waits for the device.
    """
    if fuse:
        first = next(batches)
        stacked_KBL = np.empty((BLOCK, *first.shape), first.dtype)
        stacked_KBL[0] = first
        for i in range(1, n):
            stacked_KBL[i] = next(batches)
        stacked_KBL[n:] = first  # masked steps: any valid batch
        state, m = train_steps(state, place.put(stacked_KBL, place.stacked_rows), rng, np.int32(n))
        return state, m
    pending = []
    for _ in range(n):
        state, m = train_step(state, place.put_batch(next(batches)), rng)
        pending.append(m)
    return state, pending


def host_rows(device_metrics, n: int) -> list[dict]:
    """The first n steps' metrics as host dicts (waits for the device)."""
    got = jax.device_get(device_metrics)
    if isinstance(got, dict):  # fused: arrays of BLOCK
        return [{k: v[i] for k, v in got.items()} for i in range(n)]
    return got


def evaluate(state, groups) -> tuple[float, float]:
    """Mean loss over every label of the held-out batch groups -> (loss, perplexity)."""
    e = evaluation.evaluate(state, groups)
    return e.loss, e.perplexity


eval_groups = evaluation.groups


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


def run_experiment(
    exp: Experiment,
    prepared: data.Prepared,
    out_dir: pathlib.Path,
    max_steps: int | None = None,
    resume: bool = False,
    position: int = 0,
    stop: threading.Event | None = None,
    fuse: bool | None = None,
    writers: Callable | None = None,
) -> Result:
    """Train one experiment on its device(s); save checkpoints; return its metrics.

    fuse: run blocks as one `train_steps` dispatch (default: on accelerators,
    where a step is short enough for dispatch to matter; on the CPU single
    steps keep resume bit-exact from any step). writers(exp): extra metric
    writers (W&B) beside the files.
    """
    c = exp.config
    place = Placement(exp.devices)
    if fuse is None:
        fuse = place.devices[0].platform != "cpu"
    lead = jax.process_index() == 0  # only process 0 writes outputs; all write checkpoints
    out_dir = pathlib.Path(out_dir)
    start = time.perf_counter()
    ds = data.batch_dataset(prepared.train, c.batch_size, c.seed, c.max_epochs)
    total = len(ds) if max_steps is None else min(max_steps, len(ds))
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(out_dir, exp.name), c, not resume, lead)
    sync(f"fresh {exp.name}")
    latest = ckpt.saved if resume else None
    if latest is not None:
        if lead:
            tqdm.write(f"{exp.name}: resuming at step {latest} from {ckpt.directory / str(latest)}",
                       file=sys.stderr)
        state, progress = ckpt.restore(latest, place, total)
    else:
        init_device = place.devices[0] if jax.process_count() == 1 else jax.local_devices()[0]
        with jax.default_device(init_device):  # initialise where it will live
            state = place.put(create_state(c, total_steps=total))
        progress = checkpoint.progress_record()
    extra = writers(exp) if writers is not None and lead else []
    writer = metric_writer(out_dir, exp.name, latest, extra) if lead else metrics.MultiWriter([])
    rng = place.put(jax.random.PRNGKey(c.seed + 1))
    sample = list(eval_groups(data.eval_sample(prepared.val, c.eval_batches, c.batch_size, c.seed),
                              place, c.eval_batches)) if len(prepared.val) else []
    step, tokens, prior = progress["step"], progress["tokens"], progress["seconds"]
    status = "ok"
    bar = tqdm(total=total, initial=step, desc=f"{exp.name} [{place.label}]", disable=not lead,
               position=position, unit="step", dynamic_ncols=True, leave=True)
    t0 = time.perf_counter() - prior  # elapsed training time continues across resumes
    last_ckpt = time.monotonic()
    last_read = time.perf_counter()
    pending = None  # (first step, n, device metrics) of the block dispatched but not yet read

    def drain() -> None:
        """Read the pending block's metrics, write its rows; NonFiniteLoss if one is not finite."""
        nonlocal pending, tokens, last_read
        first, n, dev = pending
        pending = None
        host = host_rows(dev, n)
        now = time.perf_counter()
        per_step, elapsed = (now - last_read) / n, now - t0
        last_read = now
        bad = [i for i, m in enumerate(host) if not math.isfinite(float(m["loss"]))]
        for i, m in enumerate(host[: bad[0] if bad else n]):
            tokens += int(m["tokens"])
            writer.write_scalars(first + i + 1, {
                "train/tokens": tokens, "train/loss": m["loss"], "train/perplexity": m["perplexity"],
                "train/lr": m["lr"], "train/grad_norm": m["grad_norm"],
                "train/seconds": round(per_step, 6), "train/elapsed": round(elapsed, 4)})
        if bad:
            raise NonFiniteLoss(f"{exp.name}: non-finite loss at step {first + bad[0] + 1}")
        bar.set_postfix(loss=f"{float(host[-1]['loss']):.3f}", ppl=f"{float(host[-1]['perplexity']):.1f}",
                        tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        bar.update(first + n - bar.n)

    def validate(groups, at: int) -> None:
        vl, vp = evaluate(state, groups)
        writer.write_scalars(at, {"val/tokens": tokens, "val/loss": vl, "val/perplexity": vp})

    batches = data.batch_iterator(ds, progress["next_batch"], c.num_workers)
    try:
        while step < total:
            end = block_end(step, total, c)
            state, dev = run_block(state, batches, end - step, rng, place, fuse)
            if pending is not None:
                drain()  # the previous block, while this one runs
            pending = (step, end - step, dev)
            step = end
            eval_due = step % c.eval_every == 0 or step == total
            stopping = any_process(stop is not None and stop.is_set()) and step < total
            clock = any_process(time.monotonic() - last_ckpt >= 60 * c.ckpt_minutes)
            ckpt_due = (c.ckpt_every and step % c.ckpt_every == 0) or clock or stopping or step == total
            if not (eval_due or ckpt_due):
                continue
            drain()
            if eval_due and len(prepared.val):  # val_fraction=0: nothing held out, nothing evaluated
                full = step == total
                groups = eval_groups(data.eval_batches(prepared.val, c.batch_size), place,
                                     c.eval_batches) if full else sample
                validate(groups, step)
            if ckpt_due:
                writer.flush()  # what a resume keeps of the metrics is on disk first
                ckpt.save(state, checkpoint.progress_record(step, step, tokens, time.perf_counter() - t0))
                last_ckpt = time.monotonic()
            if stopping:
                status = f"stopped at step {step}"
                break
        ckpt.close()
    except Exception as e:  # one experiment's failure must not end the others
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, (NonFiniteLoss, checkpoint.SaveError)):
            traceback.print_exc()
        status = f"failed: {reason}"
        if not isinstance(e, checkpoint.SaveError):
            state = None  # diverged or broken; after a failed save the state is sound and exported
        try:
            ckpt.close()  # a save in flight finishes; a second failure says nothing new
        except checkpoint.SaveError:
            pass
    finally:
        bar.close()
        try:
            writer.close()
        except OSError as e:  # the metrics' own disk may be the one that is full
            status = status if status != "ok" else f"failed: writing metrics: {e}"
    rows, val_rows = (read_rows(out_dir, exp.name) if lead else ([], []))
    devices = frozenset(d for leaf in jax.tree_util.tree_leaves(state) for d in leaf.devices()) \
        if state is not None else frozenset()
    return Result(exp.name, c, place.label, rows, val_rows, time.perf_counter() - start,
                  status, exp.overrides, devices, state)


def read_rows(out_dir: pathlib.Path, name: str) -> tuple[list[dict], list[dict]]:
    """The experiment's metrics as written: train rows and validation rows."""
    return (report.read_metrics(out_dir / f"metrics_{name}.csv"),
            report.read_metrics(out_dir / f"metrics_{name}_val.csv"))
