"""Experiments on their devices at the same time.

- Experiments on distinct devices run in parallel threads (JAX releases the
  GIL while a computation runs and the host work per step is small);
  experiments sharing a device run one after another in that device's thread.
- A failure (an exception, a non-finite loss) ends only its own experiment;
  a stop request makes every running experiment save at its next block
  boundary and return, and the ones not started yet are not started.
- `prepare(config)` gives an experiment its data (data.Prepared); the caller
  memoises it, so experiments that agree on the data settings share one copy.
- stack=True: experiments that share a device and differ only in values
  (stack.groups) train together as one vmapped program (stack.run_stacked);
  the others as usual.
- opts.writers(experiment) -> extra metric writers (e.g. W&B) beside the CSV,
  JSONL and TensorBoard ones (options.RunOptions holds the run's options).
- concurrent=N: up to N threads per device, each taking the device's experiments
  in turn, so up to N of them train on one device at the same time (users with
  fewer GPUs than experiments). The default, 1, is one after another: on the CPU
  the cores are already full (BENCHMARKS.md).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from tqdm.auto import tqdm

from minigpt_jax import stack as stacking
from minigpt_jax.loop import Experiment, Result, run_experiment
from minigpt_jax.options import RunOptions


def run_all(experiments: list[Experiment], prepare: Callable, opts: RunOptions) -> list[Result]:
    """Run experiments, those on distinct devices at the same time; results in input order.

    opts.on_result(result) is called in the experiment's thread as soon as it (or its
    stack) finishes (exports, per-experiment plots); an exception there marks the
    result failed. Each device's thread draws its progress bar on its own line.
    """
    stop, on_result, concurrent = opts.stop, opts.on_result, opts.concurrent
    results: dict[int, Result] = {}
    if opts.stack:  # any experiments of one shape on one device
        groups = stacking.groups(experiments)
    elif not opts.seeds_apart:  # the seeds of one experiment
        groups = stacking.groups(experiments, key=lambda e: e.experiment or e.name)
    else:
        groups = [[i] for i in range(len(experiments))]
    by_device: dict[tuple, list[list[int]]] = {}
    for g in groups:
        by_device.setdefault(experiments[g[0]].devices, []).append(g)
    queues = [gs[k::concurrent] for gs in by_device.values() for k in range(min(concurrent, len(gs)))]

    def failed(i: int, status: str) -> Result:
        e = experiments[i]
        return Result(e.name, e.config, e.label, [], [], 0.0, status, e.overrides,
                      experiment=e.experiment)

    def worker(device_groups: list[list[int]]) -> None:
        for g in device_groups:
            if stop is not None and stop.is_set():
                results.update({i: failed(i, "stopped before start") for i in g})
                continue
            segment = 0.0
            try:
                exps = [experiments[i] for i in g]
                t = time.perf_counter()
                preps = [prepare(e.config) for e in exps]
                segment = time.perf_counter() - t
                if segment >= 0.5:  # a shared setting's second call is memoised: no line
                    tqdm.write(f"{exps[0].name}: data split and segmented in {segment:.1f} s", file=sys.stderr)
                mine = opts.replace(position=opts.position + g[0])
                if len(g) > 1:
                    got = stacking.run_stacked(exps, preps, mine)
                else:
                    got = [run_experiment(exps[0], preps[0], mine)]
            except Exception as ex:  # one group's failure must not end the others
                reason = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
                got = [failed(i, f"failed: {reason}") for i in g]
            for i, r in zip(g, got):
                r.phases.setdefault("segment", segment)
                if on_result is not None:
                    try:
                        on_result(r)
                    except Exception as ex:
                        r.status = f"failed: writing outputs: {str(ex).splitlines()[0] if str(ex) else ex!r}"
                results[i] = r

    threads = [threading.Thread(target=worker, args=(gs,), name=f"minigpt-{n}", daemon=True)
               for n, gs in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.2)  # short joins keep the main thread responsive to signals
    return [results[i] for i in range(len(experiments))]
