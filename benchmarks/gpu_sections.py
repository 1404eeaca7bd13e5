"""The sections of the GPU check (gpu_check.py): each takes a Ctx and returns its figures (a
dict with a one-line "summary"), or raises; a failed check raises CheckFailed. The mechanisms
are the benchmarks' (contenders, bench_head, bench_harness, bench_stack); this module only sizes
and strings them together. The profiles size every section: GPU (one H200) and the tiny
CPU smoke.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import subprocess
import sys
import time

from benchmarks import benchlib
from minigpt_jax import config as cfg

REPO = benchlib.REPO
ALL = ("jax", "jax_fused", "torch", "torch_compile")
NO_COMPILE = ("jax", "jax_fused", "torch")
TINY = {"embed_dim": 16, "n_heads": 2, "seq_len": 32, "batch_size": 2, "eval_batches": 2}
COMPARED = ("step", "tokens", "loss", "perplexity", "lr", "grad_norm")  # metrics, not timings


class CheckFailed(Exception):
    """A section ran but what it checks does not hold."""


@dataclasses.dataclass(frozen=True)
class Profile:
    smoke: bool
    base: dict  # overrides of every config
    expected_min: dict  # section -> expected minutes on one H200 (the plan in BENCHMARKS.md)
    budget_s: dict  # section -> seconds after which it starts no new item
    precision_steps: int
    parity_k: str | None  # pytest -k for the parity tests (None: all of them)
    step_configs: tuple  # (bench.py config spec, contenders)
    rounds: int
    block: int
    torch_block: int
    ceiling_n: int
    head_chunks: tuple  # rows per chunk swept (and the whole batch)
    eval_rows: tuple  # evaluation's rows of logits at a time, swept (losses.ACCEL_EVAL_ROWS)
    harness_steps: int
    bare_steps: int
    concurrent_experiments: tuple | None  # None: make run's five
    concurrent_n: int
    concurrent_steps: int | None  # None: one epoch, as make run
    stack_ns: tuple
    stack_steps: int
    stack_rounds: int
    det_steps: int
    det_together: bool  # the two determinism workers at the same time (their timings then mean
    # nothing: the smoke, where only the mechanism is checked)


GPU = Profile(
    smoke=False, base={},
    expected_min={"correctness": 1.0, "step": 2.0, "harness": 1.0, "concurrent": 1.0,
                  "stack": 1.0, "determinism": 1.5},
    budget_s={"correctness": 150, "step": 180, "harness": 90, "concurrent": 90, "stack": 75,
              "determinism": 150},
    precision_steps=100, parity_k=None,
    step_configs=(("baseline", ALL), ("baseline:dtype=bfloat16", ALL),
                  ("batch_size_16", NO_COMPILE), ("n_layers_1", NO_COMPILE),
                  ("embed_dim_64", NO_COMPILE)),
    rounds=5, block=50, torch_block=20, ceiling_n=8192, head_chunks=(256, 512, 1024),
    eval_rows=(8, 16, 32),
    harness_steps=2000, bare_steps=300,
    concurrent_experiments=None, concurrent_n=5, concurrent_steps=None,
    stack_ns=(1, 2, 4, 8), stack_steps=100, stack_rounds=2, det_steps=200,
    det_together=False)

SMOKE = Profile(
    smoke=True, base=TINY,
    expected_min=GPU.expected_min,
    budget_s={k: 60 for k in GPU.budget_s},
    precision_steps=5, parity_k="round_trip_params_state_dict",
    step_configs=(("baseline", NO_COMPILE), ("baseline:dtype=bfloat16", ("jax",))),
    rounds=2, block=2, torch_block=1, ceiling_n=256, head_chunks=(32,), eval_rows=(1, 2),
    harness_steps=20, bare_steps=12,
    concurrent_experiments=("baseline", "lr_1e-3"), concurrent_n=2, concurrent_steps=4,
    stack_ns=(2,), stack_steps=10, stack_rounds=1, det_steps=12, det_together=True)


@dataclasses.dataclass
class Ctx:
    profile: Profile
    machine: dict
    tmp: pathlib.Path
    deadline: float = math.inf  # perf_counter() at which the whole check's budget is spent
    section: str = ""
    started: float = 0.0

    def over(self) -> bool:
        """Whether this section's budget, or the check's, is spent (it starts no new item)."""
        now = time.perf_counter()
        return now - self.started > self.profile.budget_s[self.section] or now > self.deadline

    def say(self, message: str) -> None:
        print(f"gpu_check: {self.section}: {message}", file=sys.stderr, flush=True)

    def config(self, name: str = "baseline", **more) -> cfg.Config:
        return cfg.experiment_config(name, {**self.profile.base, **more})


def child_env(**extra) -> dict:
    """The environment of a child process: the checkout importable, no GPU preallocation
    (the parent already holds the device)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def one_line(text: str) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return lines[-1][:200] if lines else ""


# --- correctness -------------------------------------------------------------------------

def _pytest(ctx: Ctx, runs: list[list[str]]) -> list[dict]:
    """pytest runs (argument lists), at the same time, in child processes -> one dict each:
    exit code, summary line and its counts."""
    gpu = not ctx.profile.smoke
    env = child_env(**({"MINIGPT_TEST_GPU": "1"} if gpu else {"JAX_PLATFORMS": "cpu"}))
    if not gpu:
        env.pop("MINIGPT_TEST_GPU", None)
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args in runs]
    out = []
    for args, proc in zip(runs, procs):
        summary = one_line(proc.communicate(timeout=600)[0])
        counts = {k.rstrip("s"): int(n) for n, k in
                  re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
        out.append({"command": " ".join(["pytest", *args]), "rc": proc.returncode,
                    "summary": summary, "seconds": time.perf_counter() - t, **counts})
    return out


def precision_losses(c: cfg.Config, steps: int) -> dict:
    """The losses of `steps` steps from the same parameters and batches with each float32
    matmul precision: "default" (TF32 on NVIDIA GPUs) and "float32"."""
    import jax
    import numpy as np

    from minigpt_jax import train
    batches = benchlib.make_batches(c, "dense")[0]
    params = jax.device_get(train.create_state(c).params)
    out = {}
    for precision in ("default", "float32"):
        cc = c.replace(matmul_precision=precision)
        state = train.create_state(cc, jax.tree_util.tree_map(np.array, params))
        rng, got = jax.random.key(c.seed + 1), []
        for i in range(steps):
            state, m = train.train_step(state, jax.device_put(batches[i % len(batches)]), rng)
            got.append(m["loss"])
        out[precision] = np.asarray(jax.device_get(got), np.float64)
    return out


def correctness(ctx: Ctx) -> dict:
    gpu_files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "pytest.mark.gpu" in p.read_text())
    parity = ["tests/test_parity.py"] + (["-k", ctx.profile.parity_k] if ctx.profile.parity_k
                                         else [])
    runs = _pytest(ctx, [["-m", "gpu", *gpu_files], parity])
    ctx.say(f"gpu tests: {runs[0]['summary']}; parity tests: {runs[1]['summary']}")
    losses = precision_losses(ctx.config(), ctx.profile.precision_steps)
    a, b = losses["default"], losses["float32"]
    rel = abs(a - b) / abs(b)
    figures = {"pytest": runs, "precision_steps": len(a), "tf32_vs_fp32_max_rel": float(rel.max()),
               "at_step": int(rel.argmax()) + 1, "final_loss_default": float(a[-1]),
               "final_loss_float32": float(b[-1])}
    figures["summary"] = (f"gpu tests {runs[0]['summary']}; parity {runs[1]['summary']};"
                          f" TF32 vs float32 loss over {len(a)} steps: max rel"
                          f" {figures['tf32_vs_fp32_max_rel']:.2e}")
    bad = [r["command"] for r in runs if r["rc"] != 0]
    if not ctx.profile.smoke and (not runs[0].get("passed") or runs[0].get("skipped")):
        bad.append("the gpu tests did not all run on the GPU")
    if bad:
        raise CheckFailed("; ".join(bad) + f" ({figures['summary']})")
    return figures


# --- the step ----------------------------------------------------------------------------

def torch_status(gpu: bool) -> str | None:
    """None where the PyTorch contenders can run, else why not."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if gpu and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if gpu:
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's float32 matmuls on GPU
    return None


def _slim(r: dict) -> dict:
    keep = {"config": r["config"], "contender": r["contender"], "dtype": r["dtype"]}
    if "failed" in r:
        return {**keep, "failed": r["failed"]}
    pb = r.get("peak_bytes")
    return {**keep, "step_ms": 1e3 * r["step_s"], "tokens_s": r["tokens_s"], "mfu": r["mfu"],
            "x_torch_eager": r["vs_eager"], "peak_MiB": pb / 2**20 if pb else None,
            "first_loss": r["first_loss"], "warmup_s": r["warmup_s"]}


def head_sweep(ctx: Ctx) -> list[dict]:
    """The baseline step with the static head path at each chunk size, whole batch included."""
    import jax

    from benchmarks.bench_head import head_runs, time_steps
    from minigpt_jax import train
    c = ctx.config()
    whole = c.batch_size * c.seq_len
    chunks = sorted({ch for ch in ctx.profile.head_chunks if ch < whole} | {whole})
    batches = [jax.device_put(b) for b in benchlib.make_batches(c, "dense")[0]]
    rng = jax.random.key(c.seed + 1)
    params = jax.device_get(train.create_state(c).params)
    runs = head_runs(c, params, batches, rng, {ch: (None, "static", ch) for ch in chunks})
    times = time_steps(runs, batches, rng, ctx.profile.rounds, ctx.profile.block)
    return [{"chunk_rows": ch, "step_ms": 1e3 * benchlib.median(times[ch]),
             "first_loss": runs[ch]["loss"]} for ch in chunks]


def eval_sweep(ctx: Ctx) -> list[dict]:
    """One baseline evaluation batch at each rows-of-logits-at-a-time (bench_eval's)."""
    import functools

    import jax

    from benchmarks.bench_eval import compiled_eval, timed
    from minigpt_jax import train
    c = ctx.config()
    rows = [r for r in ctx.profile.eval_rows if c.batch_size % r == 0] + [c.batch_size]
    state = train.create_state(c)
    batches = [jax.device_put(b) for b in benchlib.make_batches(c, "dense")[0]]
    fns = {r: compiled_eval(r, state, batches[0]) for r in dict.fromkeys(rows)}
    for fn in fns.values():
        timed(fn, state, batches, 1)  # warm
    times = benchlib.interleaved({r: functools.partial(timed, fn, state, batches, ctx.profile.block)
                                  for r, fn in fns.items()}, ctx.profile.rounds)
    return [{"eval_rows": r, "batch_ms": 1e3 * benchlib.median(times[r])} for r in fns]


def step(ctx: Ctx) -> dict:
    from tqdm.auto import tqdm

    from benchmarks import bench
    from benchmarks import contenders as cons
    p, machine = ctx.profile, ctx.machine
    no_torch = torch_status(machine["gpu"])
    ceiling = cons.Ceiling(machine["gpu"], no_torch is None, p.ceiling_n)
    rows, skipped = [], []
    for spec, names in tqdm(p.step_configs, desc="step configs", file=sys.stderr):
        if ctx.over():
            skipped.append({"config": spec, "contender": "all", "reason": "section budget spent"})
            continue
        label, kind, c = bench.parse_configs(spec, p.base)[0]
        run = [n for n in names if no_torch is None or not n.startswith("torch")]
        skipped += [{"config": spec, "contender": n, "reason": no_torch}
                    for n in names if n not in run]
        rows += [_slim(r) for r in cons.measure_config(
            label, kind, c, run, p.rounds, p.block, p.torch_block, ceiling, machine,
            progress=ctx.say)]
    ctx.say(f"head chunk sweep: {ctx.profile.head_chunks} rows and the whole batch")
    head = head_sweep(ctx) if not ctx.over() else []
    best = min(head, key=lambda r: r["step_ms"]) if head else None
    ctx.say(f"evaluation rows sweep: {ctx.profile.eval_rows} rows and the whole batch")
    evals = eval_sweep(ctx) if not ctx.over() else []
    best_eval = min(evals, key=lambda r: r["batch_ms"]) if evals else None
    base = next((r for r in rows if r["config"] == "baseline" and r["contender"] == "jax"
                 and "step_ms" in r), None)
    figures = {"rows": rows, "skipped": skipped, "head_chunks": head,
               "head_chunk_best": best and best["chunk_rows"], "eval_rows": evals,
               "eval_rows_best": best_eval and best_eval["eval_rows"],
               "ceiling_flops": ceiling.flops()}
    figures["summary"] = (f"baseline jax {base['step_ms']:.2f} ms/step, {base['tokens_s']:,.0f}"
                          f" tokens/s, x eager {benchlib.fmt(base['x_torch_eager'], '.2f')}"
                          if base else "no baseline jax row") + (
        f"; best head chunk {best['chunk_rows']} rows" if best else "") + (
        f"; best evaluation rows {best_eval['eval_rows']}" if best_eval else "")
    if not rows or all("failed" in r for r in rows):
        raise CheckFailed("no contender ran: " + figures["summary"])
    return figures


# --- the harness, five experiments on one device, stacked variants -------------------------

def harness(ctx: Ctx) -> dict:
    from benchmarks import bench_harness as bh
    from minigpt_jax import data, runner
    c = ctx.config()
    prepared = data.prepare(data.default_corpus(), c)
    steps = ctx.profile.harness_steps
    epochs = math.ceil(steps / data.steps_per_epoch(len(prepared.train), c.batch_size))
    t = time.perf_counter()
    r = runner.run(["baseline"], max_steps=steps, out=ctx.tmp / "harness",
                   overrides={**ctx.profile.base, "max_epochs": epochs})[0]
    wall = time.perf_counter() - t
    if r.status != "ok":
        raise CheckFailed(f"runner.run: baseline {r.status}")
    per_step = bh.steady_seconds(r.rows) / (len(r.rows) - bh.SKIP)
    cx = c.replace(max_epochs=epochs)
    bare = bh.bare_seconds(cx, bh.sample_batches(prepared, cx), ctx.profile.bare_steps)
    tok = c.batch_size * c.seq_len
    figures = {"steps": r.steps, "wall_s": wall, "phases_s": dict(r.phases),
               "harness_ms_per_step": 1e3 * per_step, "bare_ms_per_step": 1e3 * bare,
               "harness_tokens_s": tok / per_step, "bare_tokens_s": tok / bare,
               "harness_share_steady": 1 - bare / per_step,
               "harness_share_wall": 1 - bare * r.steps / wall}
    figures["summary"] = (f"{r.steps} steps in {wall:.1f} s; {1e3 * per_step:.2f} ms/step vs bare"
                          f" {1e3 * bare:.2f}: harness share"
                          f" {100 * figures['harness_share_steady']:.0f}% steady,"
                          f" {100 * figures['harness_share_wall']:.0f}% of the wall time")
    return figures


def concurrent(ctx: Ctx) -> dict:
    from minigpt_jax import runner
    p = ctx.profile
    names = list(p.concurrent_experiments) if p.concurrent_experiments else None
    ctx.say("warm-up (compiles every experiment's programs)")
    runner.run(names, max_steps=2, overrides=p.base, out=ctx.tmp / "warm")
    rows, losses = [], {}
    for k in (1, p.concurrent_n):
        t = time.perf_counter()
        rs = runner.run(names, max_steps=p.concurrent_steps, overrides=p.base,
                        out=ctx.tmp / f"concurrent{k}", concurrent=k)
        wall = time.perf_counter() - t
        if any(r.status != "ok" for r in rs):
            raise CheckFailed(f"--concurrent {k}: " + ", ".join(f"{r.name} {r.status}" for r in rs))
        losses[k] = [r.final_loss for r in rs]
        rows.append({"concurrent": k, "experiments": len(rs), "wall_s": wall,
                     "steps": sum(r.steps for r in rs), "train_s": sum(r.phases.get("train", 0)
                                                                      for r in rs)})
    speedup = rows[0]["wall_s"] / rows[1]["wall_s"]
    figures = {"rows": rows, "speedup": speedup, "same_final_losses": losses[1] ==
               losses[p.concurrent_n], "recommended_concurrent": p.concurrent_n if speedup > 1.05
               else 1}
    figures["summary"] = (f"{rows[0]['experiments']} experiments: one after another"
                          f" {rows[0]['wall_s']:.1f} s, {p.concurrent_n} at a time"
                          f" {rows[1]['wall_s']:.1f} s ({speedup:.2f}x)")
    return figures


def stack(ctx: Ctx) -> dict:
    import numpy as np
    from tqdm.auto import tqdm

    from benchmarks import bench_stack as bs
    from minigpt_jax import data
    p = ctx.profile
    c = ctx.config()
    fuse = ctx.machine["gpu"]
    prepared = data.prepare(data.default_corpus(), c)
    tok = p.stack_steps * c.batch_size * c.seq_len
    rows = []
    for n in tqdm(p.stack_ns, desc="stacked variants", file=sys.stderr):
        if ctx.over():
            break
        configs = bs.variants(c, n)
        batches = np.stack([bs.batches(prepared, v, bs.BLOCK + p.stack_steps) for v in configs])
        st = se = math.inf
        for _ in range(p.stack_rounds):
            st = min(st, bs.stacked_seconds(configs, batches, p.stack_steps, fuse))
            se = min(se, bs.separate_seconds(configs, batches, p.stack_steps, fuse))
        rows.append({"n": n, "stacked_s": st, "separate_s": se, "ratio": se / st,
                     "tokens_s_per_variant_stacked": tok / st,
                     "tokens_s_total_stacked": n * tok / st,
                     "tokens_s_total_separate": n * tok / se})
        ctx.say(f"N={n}: stacked {st:.2f} s, separate {se:.2f} s: {se / st:.2f}x")
    if not rows:
        raise CheckFailed("no variant count measured within the budget")
    top = rows[-1]
    figures = {"rows": rows, "ratio_at_max": top["ratio"], "max_n": top["n"],
               "goal_4x_at_8": (top["ratio"] >= 4) if top["n"] == 8 else None}
    figures["summary"] = f"{top['n']} stacked vs separate: {top['ratio']:.2f}x (goal >= 4x at 8)"
    return figures


def determinism(ctx: Ctx) -> dict:
    from benchmarks import gpu_determinism
    return gpu_determinism.determinism(ctx)


SECTIONS = {"correctness": correctness, "step": step, "harness": harness,
            "concurrent": concurrent, "stack": stack, "determinism": determinism}
