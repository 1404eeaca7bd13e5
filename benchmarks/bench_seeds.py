"""Benchmark N seeds of one experiment as one stack (--seeds, the default) against the same seeds
run one after another (--seeds-apart): the whole run call's wall time, compilation, training,
the evaluations and the outputs included.

Each mode is one `runner.run(["baseline"], seeds=N, ...)` into a fresh folder; the modes are
measured in turn for --rounds rounds (so a busy spell on the machine hits both) and the faster
of each is kept. On the CPU a stack gains little (the cores are busy either way); on a GPU the
stack's one program replaces N small ones (the GPU check's stack section measures that).

Examples:
  python -m benchmarks.bench_seeds                       # -> BENCHMARKS.md, "Measured: seeds"
  python -m benchmarks.bench_seeds --seeds 3 --max-steps 20 --set embed_dim=64
"""

from __future__ import annotations

import sys
import tempfile
import time

from benchmarks import benchlib
from minigpt_jax import config as cfg

PROG = "benchmarks.bench_seeds"


def parse_args(argv=None):
    p = benchlib.parser(PROG, __doc__)
    p.add_argument("--seeds", type=int, default=3, help="seeds (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=30, help="steps per seed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of both modes, in turn; the"
                   " fastest of each is kept (default: %(default)s)")
    benchlib.add_common(p)
    args = p.parse_args(argv)
    if args.seeds < 2 or args.max_steps < 1 or args.rounds < 1:
        benchlib.fail(PROG, "--seeds must be >= 2, --max-steps and --rounds >= 1")
    return args


def wall(overrides: dict, seeds: int, steps: int, apart: bool) -> tuple[float, list]:
    """Seconds of one run call, and its results."""
    from minigpt_jax import runner

    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as out:
        t = time.perf_counter()
        results = runner.run(["baseline"], overrides=overrides, seeds=seeds, max_steps=steps,
                             seeds_apart=apart, out=out)
        seconds = time.perf_counter() - t
    bad = [r.name for r in results if r.status != "ok"]
    if bad:
        benchlib.fail(PROG, f"{', '.join(bad)} did not finish")
    return seconds, results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = cfg.parse_overrides(args.overrides)
    except cfg.ConfigError as e:
        benchlib.fail(PROG, str(e))
    best = {"stacked": float("inf"), "apart": float("inf")}
    phases = {}
    for _ in range(args.rounds):
        for mode in best:
            seconds, results = wall(overrides, args.seeds, args.max_steps, mode == "apart")
            best[mode] = min(best[mode], seconds)
            phases[mode] = {k: sum(r.phases.get(k, 0.0) for r in results) / len(results)
                            for k in ("compile", "train", "final_eval")}
            print(f"{mode}: {seconds:.1f} s", file=sys.stderr)
    ratio = best["apart"] / best["stacked"]
    shape = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "baseline"
    begin, end = benchlib.section_marks("seeds")
    lines = [begin, "### Measured: seeds stacked against seeds one after another", "",
             f"{benchlib.measured(PROG, argv)}; shape: {shape}; {args.seeds} seeds x"
             f" {args.max_steps} steps, the embedded corpus; the faster of {args.rounds}"
             " round(s) per mode.", "",
             "| mode | wall s | compile s (per seed) | train s (per seed) |"
             " final evaluation s (per seed) |", "| --- | ---: | ---: | ---: | ---: |"]
    for mode, label in (("stacked", "one stack (`--seeds`)"), ("apart", "`--seeds-apart`")):
        p = phases[mode]
        lines.append(f"| {label} | {best[mode]:.1f} | {p['compile']:.1f} | {p['train']:.1f} |"
                     f" {p['final_eval']:.1f} |")
    lines += ["", f"One after another takes {ratio:.2f}x the stack's wall time.", end]
    benchlib.write_section(args.out, lines)
    print(f"apart / stacked: {ratio:.2f}x; written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
