"""Time the training step with each LM-head path (losses.HEAD_PATH) on this machine.

Contenders, each a `train_step` compiled with one path, on the same batches from
the same parameters, in interleaved rounds (a machine shared with other work
slows all alike): `sorted` (the CPU path, what "auto" picks on the CPU),
`static` with the CPU chunk (HEAD_CHUNK rows) and with the accelerator chunk
(ACCEL_HEAD_CHUNK rows), and with --reference FILE the `train_step` of another
revision's train.py (e.g. `git show main:minigpt_jax/train.py > /tmp/train_main.py`),
to check that a change kept the CPU step's speed. Prints a markdown table.

  python -m benchmarks.bench_head --reference /tmp/train_main.py --rounds 6
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import benchlib
from benchmarks.contenders import compiled_step
from minigpt_jax import cli, host, losses, train
from minigpt_jax import config as cfg


def time_steps(runs: dict, batches, rng, rounds: int, steps: int) -> dict:
    """{name: {"fn": compiled step, "state", "i": next batch}}, timed in interleaved rounds
    of `steps` steps each -> {name: [seconds per step, one per round]}."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, r in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                r["state"], m = r["fn"](r["state"], batches[r["i"] % len(batches)], rng)
                r["i"] += 1
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t) / steps)
    return times


def head_runs(c, params, batches, rng, contenders: dict) -> dict:
    """{name: (module or None, path, chunk)} -> {name: run} for time_steps, each compiled from
    the same parameters and stepped once (its first loss in run["loss"])."""
    runs = {}
    for name, (module, path, chunk) in contenders.items():
        state = train.create_state(c, jax.tree_util.tree_map(np.array, params))
        fn = compiled_step(state, batches[0], rng, path, chunk, module or train)
        state, m = fn(state, batches[0], rng)
        runs[name] = {"fn": fn, "state": state, "loss": float(m["loss"]), "i": 1}
    return runs


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("train_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = cli.parser("benchmarks.bench_head", __doc__)
    p.add_argument("--kinds", default="corpus,dense", help="batch kinds (bench.py's): %(default)s")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds: %(default)s")
    p.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    p.add_argument("--reference", help="a train.py of another revision, timed alongside")
    args = p.parse_args(argv)
    tuned = host.tune_host_allocator(jax.default_backend())
    c = cfg.experiment_config("baseline")
    rng = jax.random.key(c.seed + 1)
    params = jax.device_get(train.create_state(c).params)
    print(f"device {jax.devices()[0].device_kind}, allocator tuned: {tuned}, "
          f"HEAD_CHUNK {losses.HEAD_CHUNK}, ACCEL_HEAD_CHUNK {losses.ACCEL_HEAD_CHUNK}")
    print("| batches | contender | step ms (median) | min | first loss |")
    print("|---|---|---:|---:|---:|")
    for kind in args.kinds.split(","):
        batches = [jax.device_put(b) for b in benchlib.make_batches(c, kind)[0]]
        contenders = {
            "sorted (CPU path)": (None, "sorted", None),
            f"static, {losses.HEAD_CHUNK}-row chunks": (None, "static", losses.HEAD_CHUNK),
            f"static, {losses.ACCEL_HEAD_CHUNK}-row chunks": (None, "static", None),
        }
        if args.reference:
            contenders["reference train.py"] = (load_reference(args.reference), None, None)
        runs = head_runs(c, params, batches, rng, contenders)
        times = time_steps(runs, batches, rng, args.rounds, args.steps)
        for name, r in runs.items():
            print(f"| {kind} | {name} | {1e3 * statistics.median(times[name]):.1f} | "
                  f"{1e3 * min(times[name]):.1f} | {r['loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
