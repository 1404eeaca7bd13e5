"""Benchmark what the harness adds around the training step, at a small and the users' size.

For each data size, in one process, on the same device and batches:
  bare     train_step on batches already on the device, metrics read every 10 steps
  harness  loop.run_experiment: the grain pipeline, metrics to CSV/JSONL/TensorBoard,
           the sampled evaluation every eval_every steps, checkpoints every ckpt_every
           steps, and the final evaluation over the whole held-out set (timed apart)
Both are timed in steady state, from step SKIP on: the harness from its own
metrics (`elapsed` at each row, which includes the periodic evaluations and
checkpoints in between), the bare steps the same way. The overhead is the
difference per step; evaluation's share is the periodic evaluations' time over
the training time. Start and end (initialisation, the final checkpoint and the
final evaluation over the whole held-out set) are reported apart: they do not
grow with the steps. The small data is the
default corpus; the large is a synthetic source shaped like the users' data
(chunks of up to 512 random ids, most exactly 512) of --tokens tokens, of which
the same val_fraction is held out, so the final evaluation grows with it and the
rest must not.

Examples:
  python -m benchmarks.bench_harness             # -> BENCHMARKS.md, "Measured: harness"
  python -m benchmarks.bench_harness --set embed_dim=64 --steps 300 --tokens 28000000
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from minigpt_jax import cli
from minigpt_jax import config as cfg
from minigpt_jax.options import RunOptions


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("benchmarks.bench_harness", __doc__)
    p.add_argument("--steps", type=int, default=200,
                   help="training steps per measurement (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=28_000_000,
                   help="tokens of the large synthetic source (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides (default: the baseline with eval_every=50,"
                        " ckpt_every=50, so that a short measurement holds evaluations and"
                        " checkpoints)")
    p.add_argument("--out", default="BENCHMARKS.md",
                   help="markdown file to update (default: %(default)s)")
    return p.parse_args(argv)


SKIP = 10  # steps left out of the steady-state times (the first block)


def sample_batches(prepared, c, n: int = 8) -> list:
    """n batches of random training segments, for bare_seconds."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [prepared.train[rng.choice(len(prepared.train), c.batch_size)] for _ in range(n)]


def bare_seconds(c, batches, steps: int) -> float:
    """Seconds per step of train_step alone on device-resident batches, metrics read every 10
    steps, after the first SKIP steps."""
    import jax

    from minigpt_jax import train

    state = train.create_state(c)
    rng = jax.random.key(c.seed + 1)
    dev = [jax.device_put(b) for b in batches]
    pending, t = [], None
    for i in range(steps):
        if i == SKIP:
            t = time.perf_counter()
        state, m = train.train_step(state, dev[i % len(dev)], rng)
        pending.append(m)
        if len(pending) == 10:
            jax.device_get(pending)
            pending = []
    jax.device_get(pending)
    return (time.perf_counter() - t) / (steps - SKIP)


def steady_seconds(rows: list[dict]) -> float:
    """Training seconds from step SKIP on, from a run's metrics rows (`elapsed` at each row,
    the periodic evaluations and checkpoints in between included)."""
    return float(rows[-1]["elapsed"]) - float(rows[SKIP - 1]["elapsed"])


def harness_seconds(c, prepared, steps: int, out: pathlib.Path) -> dict:
    """loop.run_experiment for `steps`: seconds per step in steady state (from its metrics),
    the periodic evaluations' and the final one's time, and the rest of the wall time."""
    import jax

    from minigpt_jax import evaluation, loop

    timings = {"eval": 0.0, "evals": 0}
    real = evaluation.evaluate  # the periodic evaluations and (last) the final one

    def timed(state, groups, progress=None):
        t = time.perf_counter()
        got = real(state, groups, progress)
        timings["eval"] += time.perf_counter() - t
        timings["evals"] += 1
        timings["last_eval"] = time.perf_counter() - t
        return got

    evaluation.evaluate = timed
    try:
        exp = loop.Experiment("bench", c, jax.devices()[0])
        # compile everything first
        loop.run_experiment(exp, prepared, RunOptions(out=out, max_steps=2))
        timings.update(eval=0.0, evals=0)
        t = time.perf_counter()
        r = loop.run_experiment(exp, prepared, RunOptions(out=out, max_steps=steps))
        wall = time.perf_counter() - t
    finally:
        evaluation.evaluate = real
    assert r.status == "ok", r.status
    final = timings["last_eval"]  # the final evaluation (at most eval_final_batches)
    steady = steady_seconds(r.rows)
    return {"wall": wall, "final_eval": final, "periodic_eval": timings["eval"] - final,
            "per_step": steady / (len(r.rows) - SKIP), "steady": steady,
            "fixed": wall - steady - final}


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from benchmarks import benchlib
    from minigpt_jax import data, host

    host.tune_host_allocator(jax.default_backend())
    overrides = {"eval_every": 50, "ckpt_every": 50, **cfg.parse_overrides(args.overrides)}
    c = cfg.BASELINE.replace(**overrides)
    rows = []
    for label, seqs in (("default corpus", data.default_corpus()),
                        ("users'-shaped", benchlib.users_shaped(args.tokens))):
        prepared = data.prepare(seqs, c)
        steps = args.steps  # over as many epochs as it takes (the corpus: 47 steps an epoch)
        per_epoch = data.steps_per_epoch(len(prepared.train), c.batch_size)
        cx = c.replace(max_epochs=-(-steps // per_epoch))
        batches = sample_batches(prepared, c)
        with tempfile.TemporaryDirectory() as out:
            h = harness_seconds(cx, prepared, steps, pathlib.Path(out))
        bare = bare_seconds(cx, batches, steps)
        rows.append((label, len(seqs.tokens), len(prepared.train), len(prepared.val), steps,
                     bare, h))
        print(f"{label}: bare {1e3 * bare:.1f} ms/step, harness {1e3 * h['per_step']:.1f}"
              f" ms/step, periodic eval {h['periodic_eval']:.2f} s, final eval"
              f" {h['final_eval']:.2f} s, start and end {h['fixed']:.1f} s", file=sys.stderr)
    dev = jax.devices()[0]
    lines = [
        "<!-- bench:begin harness -->",
        "### Measured: harness",
        "",
        f"`python -m benchmarks.bench_harness{''.join(' --set ' + s for s in args.overrides)}"
        f" --steps {args.steps} --tokens {args.tokens}` on {dev.platform} ({dev.device_kind}),"
        " config: baseline with "
        + ", ".join(f"{k}={v}" for k, v in overrides.items()) + f", eval_batches={c.eval_batches}.",
        "",
        "| data | tokens | train / held-out segments | steps | bare ms/step | harness ms/step |"
        " overhead | periodic eval share | start and end | final eval (whole held-out set) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, tokens, n_train, n_val, steps, bare, h in rows:
        over = (h["per_step"] - bare) / bare
        lines.append(
            f"| {label} | {tokens:,} | {n_train:,} / {n_val:,} | {steps} | {1e3 * bare:.1f} |"
            f" {1e3 * h['per_step']:.1f} | {100 * over:+.1f}%"
            f" ({1e3 * (h['per_step'] - bare):+.1f} ms/step) |"
            f" {100 * h['periodic_eval'] / h['steady']:.1f}% | {h['fixed']:.1f} s |"
            f" {h['final_eval']:.2f} s |")
    lines += ["<!-- bench:end harness -->"]
    return benchlib.publish(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
