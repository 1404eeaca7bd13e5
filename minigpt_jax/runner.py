"""Training one experiment end to end: data in, per-step metrics out.

- The loop is a function. Metrics stay on the device and are read in blocks
  of `LOG_EVERY` steps, so the host never waits on the device every step.
- Tokens counted are label tokens (non-PAD targets), so curves of experiments
  with different batch sizes share an x axis.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from minigpt_jax import data
from minigpt_jax.config import Config
from minigpt_jax.train import create_state, eval_step, train_step

LOG_EVERY = 10  # steps between host reads of the metrics (and bar updates)


@dataclasses.dataclass
class Result:
    name: str
    config: Config
    rows: list[dict]  # one per step: step, tokens, loss, perplexity, seconds
    seconds: float

    @property
    def tokens(self) -> int:
        return int(self.rows[-1]["tokens"]) if self.rows else 0


def evaluate(state, chunks: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Mean loss over every label of the held-out chunks -> (loss, perplexity)."""
    sums = [eval_step(state, b) for b in data.eval_batches(chunks, batch_size)]
    loss_sum = float(sum(s["loss_sum"] for s in sums))
    n = float(sum(s["tokens"] for s in sums))
    loss = loss_sum / max(n, 1.0)
    return loss, float(np.exp(loss))


def train_experiment(
    name: str,
    config: Config,
    train_chunks: np.ndarray,
    max_steps: int | None = None,
    position: int = 0,
) -> Result:
    """Train one experiment for max_epochs (or max_steps) and return its per-step metrics."""
    ds = data.batch_dataset(train_chunks, config.batch_size, config.seed, config.max_epochs)
    total = len(ds) if max_steps is None else min(max_steps, len(ds))
    state = create_state(config)
    rng = jax.random.key(config.seed + 1)
    rows: list[dict] = []
    pending: list[dict] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=name, position=position, unit="step", dynamic_ncols=True)
    batches = data.batch_iterator(ds, 0, config.num_workers)
    for step in range(total):
        state, metrics = train_step(state, next(batches), rng)
        pending.append(metrics)
        if len(pending) == LOG_EVERY or step == total - 1:
            for m in jax.device_get(pending):
                tokens += int(m["tokens"])
                rows.append({
                    "step": len(rows) + 1,
                    "tokens": tokens,
                    "loss": float(m["loss"]),
                    "perplexity": float(m["perplexity"]),
                    "seconds": round(time.perf_counter() - start, 4),
                })
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", ppl=f"{rows[-1]['perplexity']:.1f}",
                            tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            bar.update(len(pending))
            pending = []
    bar.close()
    return Result(name, config, rows, time.perf_counter() - start)
