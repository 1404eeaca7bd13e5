"""The GPU check's determinism and resume section: child processes (XLA_FLAGS must be set
before JAX starts) run the same steps twice and a stopped-and-resumed run, with and without
--xla_gpu_deterministic_ops=true; the parent compares their metrics number for number."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

from benchmarks.gpu_sections import (
    COMPARED,
    GPU,
    REPO,
    SMOKE,
    CheckFailed,
    Ctx,
    child_env,
    one_line,
)
from minigpt_jax import config as cfg
from minigpt_jax.options import RunOptions

# --------------------------------------------------------------

FLAGS = (("default", ""), ("deterministic_ops", "--xla_gpu_deterministic_ops=true"))


def determinism_worker(out: pathlib.Path, steps: int, smoke: bool) -> int:
    """In a child process (XLA_FLAGS set before JAX starts): two identical runs a and b, and r
    stopped at steps // 2 then resumed; writes worker.json (b's steady seconds per step)."""
    import jax

    from benchmarks import bench_harness as bh
    from minigpt_jax import data, loop
    base = (SMOKE if smoke else GPU).base
    c = cfg.experiment_config("baseline", base)
    prepared = data.prepare(data.default_corpus(), c)
    c = c.replace(max_epochs=math.ceil(steps / data.steps_per_epoch(len(prepared.train),
                                                                      c.batch_size)))
    exp = loop.Experiment("baseline", c, jax.devices()[0])
    got = {k: loop.run_experiment(exp, prepared, RunOptions(out=out / k, max_steps=steps)) for k in "ab"}
    loop.run_experiment(exp, prepared, RunOptions(out=out / "r", max_steps=steps // 2))
    got["r"] = loop.run_experiment(exp, prepared, RunOptions(out=out / "r", max_steps=steps, resume=True))
    per_step = bh.steady_seconds(got["b"].rows) / (len(got["b"].rows) - bh.SKIP)
    (out / "worker.json").write_text(json.dumps({
        "per_step_s": per_step, "status": {k: r.status for k, r in got.items()},
        "xla_flags": os.environ.get("XLA_FLAGS", "")}))
    return 0


def compare(a: list[dict], b: list[dict]) -> dict:
    """Per-step metrics compared number for number -> identical, largest relative difference."""
    pairs = [(x[k], y[k]) for x, y in zip(a, b) for k in COMPARED]
    rel = max((abs(x - y) / max(abs(y), 1e-30) for x, y in pairs), default=math.nan)
    return {"identical": len(a) == len(b) and all(x == y for x, y in pairs), "max_rel": rel,
            "steps": len(a)}


def determinism(ctx: Ctx) -> dict:
    from minigpt_jax import loop
    steps = ctx.profile.det_steps
    procs, errs = {}, {}
    for label, flag in FLAGS:
        out = ctx.tmp / f"det_{label}"
        flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flag) if f)
        env = child_env(XLA_FLAGS=flags)
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", "determinism",
               "--out", str(out), "--steps", str(steps)] + (["--cpu-smoke"] if ctx.profile.smoke
                                                             else [])
        ctx.say(f"{label}: XLA_FLAGS={env['XLA_FLAGS']!r}")
        procs[label] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        if not ctx.profile.det_together:  # one after another: its timing is alone
            errs[label] = procs[label].communicate(timeout=400)[1]
    rows = []
    for label, proc in procs.items():
        out = ctx.tmp / f"det_{label}"
        err = errs[label] if label in errs else proc.communicate(timeout=400)[1]
        if proc.returncode != 0:
            raise RuntimeError(f"worker ({label}) exit {proc.returncode}: {one_line(err)}")
        w = json.loads((out / "worker.json").read_text())
        if any(s != "ok" for s in w["status"].values()):
            raise CheckFailed(f"{label}: runs {w['status']}")
        a, b, res = (loop.read_rows(out / k, "baseline")[0] for k in "abr")
        rows.append({"flags": label, "ms_per_step": 1e3 * w["per_step_s"],
                     "repeat": compare(a, b), "resume": compare(res, a)})
    cost = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    figures = {"steps": steps, "resume_at": steps // 2, "rows": rows,
               "deterministic_ops_cost": cost}
    figures["summary"] = "; ".join(
        f"{r['flags']}: repeat {'identical' if r['repeat']['identical'] else 'differs'}"
        f" (max rel {r['repeat']['max_rel']:.1e}), resume "
        f"{'identical' if r['resume']['identical'] else 'differs'}" for r in rows
    ) + f"; deterministic ops cost {cost:.2f}x"
    must = rows if ctx.profile.smoke or not ctx.machine["gpu"] else rows[1:]
    if not all(r["repeat"]["identical"] and r["resume"]["identical"] for r in must):
        raise CheckFailed("runs that must be identical differ: " + figures["summary"])
    return figures
