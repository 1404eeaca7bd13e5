"""Experiments on their devices at the same time.

- Experiments on distinct devices run in parallel threads (JAX releases the
  GIL while a computation runs and the host work per step is small);
  experiments sharing a device run one after another in that device's thread.
- A failure (an exception, a non-finite loss) ends only its own experiment;
  a stop request makes every running experiment save at its next block
  boundary and return, and the ones not started yet are not started.
- `prepare(config)` gives an experiment its data (data.Prepared); the caller
  memoises it, so experiments that agree on the data settings share one copy.
"""

from __future__ import annotations

import pathlib
import threading
from typing import Callable

from minigpt_jax.loop import Experiment, Result, run_experiment


def run_all(
    experiments: list[Experiment],
    prepare: Callable,
    out_dir: pathlib.Path,
    max_steps: int | None = None,
    resume: bool = False,
    stop: threading.Event | None = None,
    on_result: Callable | None = None,
) -> list[Result]:
    """Run experiments, those on distinct devices at the same time; results in input order.

    on_result(result) is called in the experiment's thread as soon as it
    finishes (exports, per-experiment plots); an exception there marks the
    result failed.
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
                r = run_experiment(e, prepare(e.config), out_dir, max_steps, resume, i, stop)
            except Exception as ex:
                reason = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
                r = Result(e.name, e.config, e.label, [], [], 0.0, f"failed: {reason}", e.overrides)
            if on_result is not None:
                try:
                    on_result(r)
                except Exception as ex:
                    r.status = f"failed: writing outputs: {str(ex).splitlines()[0] if str(ex) else ex!r}"
            results[i] = r

    threads = [threading.Thread(target=worker, args=(idx,), name=f"minigpt-{n}", daemon=True)
               for n, idx in enumerate(by_device.values())]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.2)  # short joins keep the main thread responsive to signals
    return [results[i] for i in range(len(experiments))]
