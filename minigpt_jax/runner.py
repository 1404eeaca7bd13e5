"""Running experiments: one per device, at the same time, resumable.

- The loop is a function. Metrics stay on the device and are read in blocks
  (every LOG_EVERY steps, and at every eval/checkpoint step), so the host never
  waits on the device each step.
- Block boundaries depend only on the absolute step, so a run resumed from a
  checkpoint replays exactly the dispatches of one that never stopped.
- Experiments on distinct devices run in parallel threads (JAX releases the
  GIL while a computation runs); experiments sharing a device run one after
  another in that device's thread. Everything an experiment touches is placed
  on its device with `jax.device_put`.
- A failure (an exception, a non-finite loss) ends only its own experiment,
  whose last good checkpoint stays; a stop request (SIGINT/SIGTERM) makes every
  running experiment save a checkpoint at its next block boundary and return.
- Tokens are label tokens (non-PAD targets), so curves of experiments with
  different batch sizes share an x axis.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil
import sys
import threading
import time
import traceback

import jax
import numpy as np
from tqdm.auto import tqdm

from minigpt_jax import checkpoint, data, report
from minigpt_jax.config import Config, num_params
from minigpt_jax.placement import Placement
from minigpt_jax.train import create_state, eval_step, train_step, train_steps

LOG_EVERY = 10  # steps between host reads of the metrics (and bar updates)


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
    rows: list[dict]  # per step: step, tokens, loss, perplexity, seconds
    val_rows: list[dict]  # per evaluation: step, tokens, val_loss, val_perplexity
    seconds: float  # wall time of this invocation (training, eval and checkpoints)
    status: str = "ok"  # ok | stopped at step k | failed: reason
    overrides: str = ""
    state_devices: frozenset = frozenset()  # devices holding the final train state
    state: object = None  # the final TrainState (in-process callers and tests)

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
            "tokens_per_second": round(self.tokens / last["seconds"], 1) if last.get("seconds") else None,
            "status": self.status,
        }
        # A diverging run's losses overflow exp(); an infinite cell is left empty ("-"), as NaN is.
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class NonFiniteLoss(RuntimeError):
    pass


def evaluate(state, val_batches: list) -> tuple[float, float]:
    """Mean loss over every label of the held-out batches -> (loss, perplexity)."""
    sums = jax.device_get([eval_step(state, b) for b in val_batches])
    loss_sum = float(sum(s["loss_sum"] for s in sums))
    n = float(sum(s["tokens"] for s in sums))
    loss = loss_sum / max(n, 1.0)
    with np.errstate(over="ignore"):  # a diverged model's perplexity is inf, not a warning
        return loss, float(np.exp(loss))


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk (unless the user chose a cache): a rerun, a resume
    or another experiment of the same shape skips XLA compilation."""
    if jax.config.jax_compilation_cache_dir is None:
        from minigpt_jax.corpus import cache_dir

        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def any_process(flag: bool) -> bool:
    """True if `flag` is true in any process: every process must stop at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def block_end(step: int, total: int, c: Config) -> int:
    """The end (exclusive) of the block of steps that starts at `step`."""
    nxt = [total]
    for every in (LOG_EVERY, c.eval_every, c.ckpt_every):
        nxt.append((step // every + 1) * every)
    return min(nxt)


def run_block(state, batches, n: int, rng, place: Placement, fuse: bool):
    """n training steps on batches from the iterator -> (state, per-step host metrics).

    Full LOG_EVERY blocks go as one fused dispatch when `fuse`; its per-step
    numbers equal single steps' to float32 rounding, and since block boundaries
    depend only on the absolute step, a resumed run fuses the same blocks.
    """
    if fuse and n == LOG_EVERY:
        stacked_KBL = np.stack([next(batches) for _ in range(n)])
        state, m = train_steps(state, place.put(stacked_KBL, place.stacked_rows), rng)
        m = jax.device_get(m)
        return state, [{k: v[i] for k, v in m.items()} for i in range(n)]
    pending = []
    for _ in range(n):
        state, metrics = train_step(state, place.put_batch(next(batches)), rng)
        pending.append(metrics)
    return state, jax.device_get(pending)


def checkpoint_dir(out_dir: pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(out_dir) / "checkpoints" / name


def run_experiment(
    exp: Experiment,
    train_chunks: np.ndarray,
    val_chunks: np.ndarray,
    out_dir: pathlib.Path,
    max_steps: int | None = None,
    resume: bool = False,
    position: int = 0,
    stop: threading.Event | None = None,
    fuse: bool | None = None,
) -> Result:
    """Train one experiment on its device(s); save checkpoints; return its metrics.

    fuse: run whole LOG_EVERY blocks as one `train_steps` dispatch (default: on
    accelerators, where a step is short enough for dispatch to matter; on the
    CPU a step takes a second and single steps keep resume bit-exact from any step).
    """
    c = exp.config
    place = Placement(exp.devices)
    if fuse is None:
        fuse = place.devices[0].platform != "cpu"
    lead = jax.process_index() == 0  # only process 0 writes outputs; all write checkpoints
    start = time.perf_counter()
    ds = data.batch_dataset(train_chunks, c.batch_size, c.seed, c.max_epochs)
    total = len(ds) if max_steps is None else min(max_steps, len(ds))
    ckpt_path = checkpoint_dir(out_dir, exp.name)
    rows: list[dict] = []
    val_rows: list[dict] = []
    prior_seconds = 0.0  # training time of earlier invocations (resume)
    if not resume and ckpt_path.exists() and lead:
        shutil.rmtree(ckpt_path)  # a fresh run replaces the old one
    sync(f"fresh {exp.name}")
    mngr = checkpoint.manager(ckpt_path, cleanup_tmp=True)
    latest = mngr.latest_step() if resume else None
    if latest is not None:
        if lead:
            tqdm.write(f"{exp.name}: resuming at step {latest} from {ckpt_path / str(latest)}", file=sys.stderr)
        state, progress = checkpoint.restore(mngr, latest, c, place)
        rows, val_rows = progress["rows"], progress["val_rows"]
        prior_seconds = rows[-1]["seconds"] if rows else 0.0
    else:
        init_device = place.devices[0] if jax.process_count() == 1 else jax.local_devices()[0]
        with jax.default_device(init_device):  # initialise where it will live
            state = place.put(create_state(c))
    rng = place.put(jax.random.PRNGKey(c.seed + 1))
    val_batches = [place.put_batch(b) for b in data.eval_batches(val_chunks, c.batch_size)]
    step = int(state.step)
    tokens = rows[-1]["tokens"] if rows else 0
    status = "ok"
    bar = tqdm(total=total, initial=step, desc=f"{exp.name} [{place.label}]", disable=not lead,
               position=position, unit="step", dynamic_ncols=True, leave=True)

    def progress() -> dict:
        return {"next_batch": step, "rows": rows, "val_rows": val_rows}

    def save() -> None:
        checkpoint.save(mngr, state, c, progress())
        if lead:
            report.write_metrics(out_dir, exp.name, rows)

    t0 = time.perf_counter() - prior_seconds
    batches = data.batch_iterator(ds, step, c.num_workers)
    try:
        while step < total:
            end = block_end(step, total, c)
            state, host = run_block(state, batches, end - step, rng, place, fuse)
            bad = [i for i, m in enumerate(host) if not math.isfinite(float(m["loss"]))]
            if bad:
                raise NonFiniteLoss(f"{exp.name}: non-finite loss at step {step + bad[0] + 1}")
            now = round(time.perf_counter() - t0, 4)
            for m in host:
                tokens += int(m["tokens"])
                rows.append({"step": len(rows) + 1, "tokens": tokens, "loss": float(m["loss"]),
                             "perplexity": float(m["perplexity"]), "seconds": now})
            step = end
            if step % c.eval_every == 0 or step == total:
                vl, vp = evaluate(state, val_batches) if val_batches else (math.nan, math.nan)
                val_rows.append({"step": step, "tokens": tokens, "val_loss": vl, "val_perplexity": vp})
            stopping = any_process(stop is not None and stop.is_set()) and step < total
            if step % c.ckpt_every == 0 or step == total or stopping:
                save()
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", ppl=f"{rows[-1]['perplexity']:.1f}",
                            tok_s=f"{tokens / max(now, 1e-9):.0f}")
            bar.update(end - bar.n)
            if stopping:
                status = f"stopped at step {step}"
                break
    except Exception as e:  # one experiment's failure must not end the others
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, NonFiniteLoss):
            traceback.print_exc()
        status = f"failed: {reason}"
        state = None
        if rows and lead:  # keep what was measured up to the last good block
            report.write_metrics(out_dir, exp.name, rows)
    finally:
        bar.close()
    devices = frozenset(d for leaf in jax.tree_util.tree_leaves(state) for d in leaf.devices()) \
        if state is not None else frozenset()
    return Result(exp.name, c, place.label, rows, val_rows, time.perf_counter() - start,
                  status, exp.overrides, devices, state)


def run_all(
    experiments: list[Experiment],
    chunks_for: callable,
    out_dir: pathlib.Path,
    max_steps: int | None = None,
    resume: bool = False,
    stop: threading.Event | None = None,
    on_result: callable = None,
) -> list[Result]:
    """Run experiments, those on distinct devices at the same time; results in input order.

    chunks_for(config) -> (train_chunks, val_chunks). on_result(result) is called
    in the experiment's thread as soon as it finishes (exports, per-experiment plots).
    """
    results: dict[int, Result] = {}
    by_device: dict[tuple, list[int]] = {}
    for i, e in enumerate(experiments):
        by_device.setdefault(e.devices, []).append(i)

    def worker(indices: list[int]) -> None:
        for i in indices:
            e = experiments[i]
            if stop is not None and stop.is_set():
                results[i] = Result(e.name, e.config, e.label, [], [], 0.0, "stopped before start", e.overrides)
                continue
            try:
                train_chunks, val_chunks = chunks_for(e.config)
                r = run_experiment(e, train_chunks, val_chunks, out_dir, max_steps, resume, i, stop)
            except Exception as ex:
                reason = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
                r = Result(e.name, e.config, e.label, [], [], 0.0, f"failed: {reason}", e.overrides)
            if on_result is not None:
                try:
                    on_result(r)
                except Exception as ex:
                    r.status = f"failed: writing outputs: {ex}"
            results[i] = r

    threads = [threading.Thread(target=worker, args=(idx,), name=f"minigpt-{n}", daemon=True)
               for n, idx in enumerate(by_device.values())]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.2)  # short joins keep the main thread responsive to signals
    return [results[i] for i in range(len(experiments))]


def describe(name: str) -> str:
    """An experiment's own override as text: 'lr=0.001'."""
    from minigpt_jax.config import EXPERIMENTS

    return ", ".join(f"{k}={v}" for k, v in EXPERIMENTS[name].items())


def check_resumable(out_dir: pathlib.Path, configs: dict[str, Config]) -> None:
    """Before any training: each existing latest checkpoint must be complete, readable
    in full and of the same config; CheckpointError (one line, with what to do) if not."""
    for name, c in configs.items():
        path = checkpoint_dir(out_dir, name)
        if not path.exists():
            continue
        if not path.is_dir():
            raise checkpoint.CheckpointError(
                f"--resume: {path} is not a folder; expected the Orbax checkpoints of {name}")
        mngr = checkpoint.manager(path)
        steps = mngr.all_steps()
        if not steps:
            continue
        step = steps[-1]
        try:
            saved = checkpoint.read_config(mngr, step)
            diffs = checkpoint.config_differences(saved, c)
            if not diffs:
                checkpoint.verify(mngr, step, c)
        except checkpoint.CheckpointError as e:
            instead = f"resume from step {steps[-2]}" if len(steps) > 1 else f"start {name} afresh"
            raise checkpoint.CheckpointError(
                f"--resume: checkpoint {e}; expected a complete checkpoint: delete {path / str(step)}"
                f" to {instead}, or run without --resume") from None
        if diffs:
            raise checkpoint.CheckpointError(
                f"--resume: checkpoint {path}/{step} was made with another config"
                f" ({'; '.join(diffs)} [saved vs now]); expected the same config: --set the saved"
                " values, or run without --resume to start afresh"
            )


def export_state_dict(out_dir: pathlib.Path, r: Result) -> pathlib.Path | None:
    """outcome/mini_gpt_<name>.pt, or one notice and None without torch."""
    try:
        import torch_compat
        torch_compat.require_torch(f"exporting mini_gpt_{r.name}.pt")
    except ImportError as e:
        tqdm.write(f"{r.name}: no mini_gpt_{r.name}.pt ({str(e).splitlines()[0]})")
        return None
    path = pathlib.Path(out_dir) / f"mini_gpt_{r.name}.pt"
    torch_compat.save_state_dict(jax.device_get(r.state.params), path)
    return path


def write_experiment_outputs(out_dir: pathlib.Path, r: Result) -> None:
    """Metrics CSV, its two curves and the PyTorch export, as soon as it finishes."""
    if jax.process_index() != 0:
        return
    if r.rows:
        report.write_metrics(out_dir, r.name, r.rows)
        report.plot_experiment(out_dir, r.name, r.rows, r.val_rows)
    if r.state is not None:
        export_state_dict(out_dir, r)


def write_summary(out_dir: pathlib.Path, results: list[Result]) -> None:
    """The comparison plots and the results tables."""
    if jax.process_index() != 0:
        return
    report.plot_comparison(out_dir, {r.name: (r.rows, r.val_rows) for r in results if r.rows})
    report.write_results_table(out_dir, [r.table_row() for r in results])
