"""Time one evaluation batch (train.eval_step) with each number of rows of logits at a time.

The final evaluation's cost is its batches times this: at the shipped
eval_final_batches=200 it decides how long the end of every run takes. Each
contender is eval_step traced with losses.EVAL_ROWS (the CPU's) or
losses.ACCEL_EVAL_ROWS (an accelerator's) set to R, on the same batches from the
same parameters, timed in interleaved rounds (a machine shared with other work
slows all alike); the per-row losses are checked equal across contenders. Prints
a markdown table and writes it into --out between the `eval-rows` marks.

  python -m benchmarks.bench_eval                   # rows 1, 2, 4, 8, 32 at baseline
  python -m benchmarks.bench_eval --rows 2,8 --set batch_size=64 --out /tmp/b.md
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time

import jax
import numpy as np

from benchmarks import benchlib
from minigpt_jax import config as cfg
from minigpt_jax import losses, train

PROG, SECTION = "benchmarks.bench_eval", "eval-rows"


def compiled_eval(rows: int, state, batch):
    """eval_step traced with R rows of logits at a time (on whichever platform runs it)."""
    saved = losses.EVAL_ROWS, losses.ACCEL_EVAL_ROWS
    losses.EVAL_ROWS = losses.ACCEL_EVAL_ROWS = rows

    def eval_step(state, batch):  # a new function each time: jit reuses a function's trace
        return train.eval_step.__wrapped__(state, batch)

    try:
        return jax.jit(eval_step).lower(state, batch).compile()
    finally:
        losses.EVAL_ROWS, losses.ACCEL_EVAL_ROWS = saved


def timed(fn, state, batches, steps: int) -> float:
    t = time.perf_counter()
    for i in range(steps):
        jax.block_until_ready(fn(state, batches[i % len(batches)]))
    return (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = benchlib.parser(PROG, __doc__)
    p.add_argument("--rows", default="1,2,4,8,32", help="rows of logits at a time: %(default)s")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds: %(default)s")
    p.add_argument("--steps", type=int, default=4, help="batches per contender per round")
    benchlib.add_common(p)
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
        c = cfg.BASELINE.replace(**cfg.parse_overrides(args.overrides))
    except (ValueError, cfg.ConfigError) as e:
        benchlib.fail(PROG, str(e))
    state = train.create_state(c)
    batches, _ = benchlib.make_batches(c, "dense")
    fns = {r: compiled_eval(r, state, batches[0]) for r in rows}
    ref = np.asarray(fns[rows[0]](state, batches[0])["loss_sum"])
    for r, fn in fns.items():  # the same numbers, whatever the rows at a time
        np.testing.assert_allclose(np.asarray(fn(state, batches[0])["loss_sum"]), ref, rtol=1e-5)
        timed(fn, state, batches, 1)  # warm
    times = benchlib.interleaved(
        {r: functools.partial(timed, fn, state, batches, args.steps) for r, fn in fns.items()},
        args.rounds)
    best = min(rows, key=lambda r: benchlib.median(times[r]))
    begin, end = benchlib.section_marks(SECTION)
    lines = [begin, f"{benchlib.measured(PROG, argv)}: one (batch_size"
             f" {c.batch_size}, seq_len {c.seq_len}) evaluation batch at width {c.embed_dim},"
             f" median of {args.rounds} interleaved rounds of {args.steps}.", "",
             "| rows of logits at a time | ms per batch | vs fastest |", "|---:|---:|---:|"]
    fastest = benchlib.median(times[best])
    lines += [f"| {r} | {1e3 * benchlib.median(times[r]):.0f} |"
              f" {benchlib.median(times[r]) / fastest:.2f}x |" for r in rows]
    lines += ["", f"Fastest: {best} rows (losses.EVAL_ROWS = {losses.EVAL_ROWS},"
              f" ACCEL_EVAL_ROWS = {losses.ACCEL_EVAL_ROWS} as shipped).", end]
    print("\n".join(lines[1:-1]))
    benchlib.write_section(pathlib.Path(args.out), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
