"""Everything a GPU must show, in one command: correctness, the step, the harness,
five experiments on one device, stacked variants, determinism and resume.

Writes DIR/gpu_check.json (every figure) and DIR/gpu_check.md (a BENCHMARKS.md section),
prints one line as each section starts and ends and a table at the end; exit code 1 if any
section failed or was skipped (each failure is one line in both files; the other sections
still run), 2 on bad input. Expected minutes per section on one H200 (the plan: BENCHMARKS.md, "GPU
check: the plan"): correctness 1, step 2, harness 1, concurrent 1, stack 1,
determinism 1.5; each section stops starting new items once its own budget or the check's
(--budget-s) is spent, and a section is skipped (and recorded so) when less of --budget-s is
left than its expected minutes.

  python3 -m benchmarks.gpu_check --out /tmp/gc              # the full check, on a GPU
  python3 -m benchmarks.gpu_check --only step,stack --out /tmp/gc
  python -m benchmarks.gpu_check --cpu-smoke --out /tmp/gc    # every section, tiny, on the CPU
  bash benchmarks/gpu/run_check.sh                           # on the device machine (wheels)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

from benchmarks import benchlib
from benchmarks import gpu_sections as gs

PROG = "benchmarks.gpu_check"


def parse_args(argv=None) -> argparse.Namespace:
    p = benchlib.parser(PROG, __doc__)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--only", default=",".join(gs.SECTIONS),
                   help="comma-separated sections, in this order: %(default)s")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="every section on the CPU, tiny model, few steps (the slow test)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="sections not started by then are skipped (default: 480 on a GPU,"
                        " 300 with --cpu-smoke)")
    p.add_argument("--worker", choices=["determinism"], help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in gs.SECTIONS]
    if unknown or not args.sections:
        benchlib.fail(PROG, f"--only {args.only!r}: choose from {', '.join(gs.SECTIONS)}")
    return args


def run_section(ctx: gs.Ctx, name: str) -> dict:
    """One section, timed; an exception is a failed section with its one-line reason."""
    ctx.section, ctx.started = name, time.perf_counter()
    ctx.say(f"start (expected {ctx.profile.expected_min[name]:g} min on an H200, budget"
            f" {ctx.profile.budget_s[name]} s)")
    entry = {"expected_min": ctx.profile.expected_min[name]}
    try:
        entry.update(status="ok", figures=gs.SECTIONS[name](ctx))
    except Exception as e:  # noqa: BLE001  (every section degrades to a line, the rest go on)
        import traceback
        traceback.print_exc(file=sys.stderr)
        kind = "" if isinstance(e, gs.CheckFailed) else f"{type(e).__name__}: "
        entry.update(status="failed", error=(kind + gs.one_line(str(e)))[:300] or kind)
    entry["seconds"] = time.perf_counter() - ctx.started
    ctx.say(f"{entry['status']} in {entry['seconds']:.1f} s"
            + (f": {entry['error']}" if "error" in entry else ""))
    return entry


def summary(entry: dict) -> str:
    if entry["status"] == "ok":
        return entry["figures"].get("summary", "")
    return entry.get("error") or entry.get("reason", "")


def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {cell(x)}" for k, x in v.items())
    return "-" if v is None else str(v).replace("|", "/")


def table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(cell(r.get(k)) for k in cols) + " |" for r in rows])


def markdown(report: dict) -> list[str]:
    """The BENCHMARKS.md section: the run, a table of sections, then each section's figures."""
    begin, end = benchlib.section_marks("gpu-check")
    m, peak = report["machine"], report["device_peak_bytes"]
    lines = [begin, "### Measured: GPU check", "",
             f"- Machine: {m['host']}; JAX device `{m['platform']}` ({m['kind']});"
             f" {m['versions']}.",
             f"- Command: `{report['command']}` ({report['mode']}); {report['wall_s']:.0f} s in"
             f" all; JAX's device peak {cell(peak and peak / 2**20)} MiB (the whole check; JAX's"
             " allocator, not PyTorch's).",
             "", *table([{"section": n, "status": e["status"], "seconds": e.get("seconds"),
                          "expected min (H200)": e["expected_min"], "summary": summary(e)}
                         for n, e in report["sections"].items()])]
    for name, e in report["sections"].items():
        lines += ["", f"#### {name}", "", f"Status: {e['status']}"
                  + (f" ({summary(e)})" if e["status"] != "ok" else ""), ""]
        for key, value in e.get("figures", {}).items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                lines += ["", f"{key}:", "", *table(value), ""]
            elif key != "summary":
                lines.append(f"- {key}: {cell(value)}")
    return lines + ["", end]


def print_table(report: dict) -> None:
    print(f"\n{'section':<12} {'status':<8} {'seconds':>8}  summary")
    for name, e in report["sections"].items():
        print(f"{name:<12} {e['status']:<8} {e.get('seconds', 0):>8.1f}  {summary(e)}")


def write(out: pathlib.Path, report: dict, t0: float) -> None:
    """gpu_check.json and gpu_check.md as they stand (the device's peak memory so far too)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    report["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    report["wall_s"] = time.perf_counter() - t0
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text("\n".join(markdown(report)) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the device
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.worker:
        out.mkdir(parents=True, exist_ok=True)
        from benchmarks import gpu_determinism
        return gpu_determinism.determinism_worker(out, args.steps, args.cpu_smoke)
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check-")
    # one persistent compilation cache for this run and its child processes (before JAX starts)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(tmp.name) / "jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import jax

    from minigpt_jax import host
    machine = benchlib.describe_machine(host.tune_host_allocator(jax.default_backend()))
    profile = gs.SMOKE if args.cpu_smoke else gs.GPU
    if not machine["gpu"] and not args.cpu_smoke:
        print(f"{PROG}: JAX sees no GPU ({machine['platform']}); the full-size figures are this"
              " machine's (--cpu-smoke is the quick CPU run)", file=sys.stderr)
    budget = args.budget_s or (300 if args.cpu_smoke else 480)
    report = {"command": benchlib.command_line(PROG, argv), "machine": machine,
              "mode": "cpu-smoke" if args.cpu_smoke else "full", "sections": {}}
    out.mkdir(parents=True, exist_ok=True)
    with tmp:
        ctx = gs.Ctx(profile, machine, pathlib.Path(tmp.name), deadline=t0 + budget)
        for name in args.sections:
            left = t0 + budget - time.perf_counter()
            if left < (0 if args.cpu_smoke else 60 * profile.expected_min[name]):
                report["sections"][name] = {"status": "skipped", "expected_min":
                                            profile.expected_min[name], "reason":
                                            f"{max(left, 0):.0f} s of --budget-s {budget:g} left"}
            else:
                report["sections"][name] = run_section(ctx, name)
            write(out, report, t0)  # after every section: a run killed later keeps these
    print_table(report)
    print(f"{PROG}: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
          f" in {report['wall_s']:.0f} s")
    return int(any(e["status"] != "ok" for e in report["sections"].values()))


if __name__ == "__main__":
    sys.exit(main())
