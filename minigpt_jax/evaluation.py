"""Held-out evaluation: the loss of a train state over batches of held-out segments, with its
standard error.

- Periodic evaluation (every eval_every steps) uses `data.eval_sample`: eval_batches
  batches, fixed and seeded. The final evaluation uses `final_batches`: at most
  eval_final_batches batches of a seeded permutation of the held-out segments, so its
  cost does not grow with the data (0: every segment, in order). The permutation
  depends on the held-out segments and the seed only: experiments of the same data and
  seed evaluate the same segments (a smaller batch size, a prefix of them), and a resume
  evaluates what the uninterrupted run would.
- The eval step returns each row's summed loss and label count, so the figure comes
  with the standard error of a ratio estimate over held-out segments (the unit that is
  sampled: a segment's tokens are not independent of each other).
- A stack's lanes (stack.py) are evaluated in one program (`evaluate_stack`): the vmapped
  eval step over each lane's own batches, one dispatch per group for all lanes.
- Batches go to the device `group` at a time, all-PAD batches filling the last group
  (they carry no label), so every group is one dispatch of one program; the whole
  held-out set is never on the device at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from minigpt_jax import data, stats
from minigpt_jax.config import PAD_TOKEN_ID
from minigpt_jax.train import eval_steps, stacked_eval_steps


@dataclasses.dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross entropy over every label token evaluated
    perplexity: float  # exp(loss)
    tokens: int  # label (non-PAD target) tokens evaluated
    segments: int  # held-out segments with at least one label
    stderr: float  # standard error of `loss` over segments; NaN with fewer than two
    # (segments, 2): each evaluated segment's summed loss and label count, in sample order, for
    # paired comparisons of two runs on the same segments
    per_segment: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "per_segment"}


def summarize(loss_sums: np.ndarray, counts: np.ndarray) -> Evaluation:
    """Per-segment summed losses and label counts -> the evaluation (float64 on the host): the
    ratio estimate and its standard error over segments (`stats.ratio_estimate`)."""
    s, n = np.asarray(loss_sums, np.float64).ravel(), np.asarray(counts, np.float64).ravel()
    keep = n > 0
    s, n = s[keep], n[keep]
    total = float(n.sum())
    loss, stderr, m = stats.ratio_estimate(s, n)  # sum s / sum n over m sampled segments
    with np.errstate(over="ignore"):  # a diverged model's perplexity is inf, not a warning
        ppl = float(np.exp(loss))
    return Evaluation(loss, ppl, int(total), m, stderr, np.stack([s, n], axis=1))


def final_batches(segments: np.ndarray, max_batches: int, batch_size: int, seed: int) -> list:
    """The final evaluation's batches: at most max_batches of a seeded permutation of the
    held-out segments (sorted, for locality), or all of them in order when max_batches is 0
    or they fit."""
    rows = max_batches * batch_size
    if max_batches == 0 or rows >= len(segments):
        return data.eval_batches(segments, batch_size)
    pick = np.sort(np.random.default_rng(seed).permutation(len(segments))[:rows])
    return data.eval_batches(segments[pick], batch_size)


def groups(batches: list[np.ndarray], place, size: int) -> Iterable:
    """Batches stacked `size` at a time onto the placement's devices, lazily."""
    for a in range(0, len(batches), size):
        group = batches[a : a + size]
        fill = [np.full_like(group[0], PAD_TOKEN_ID)] * (size - len(group))
        yield place.put(np.stack(group + fill), place.stacked_rows)


def evaluate(state, device_groups: Iterable, progress: tqdm | None = None) -> Evaluation:
    """Evaluate `state` over groups of batches already on its devices (`groups`)."""
    sums, counts = [], []
    for g in device_groups:
        m = eval_steps(state, g)
        if jax.process_count() > 1:  # each process holds only its own devices' rows
            from jax.experimental import multihost_utils

            m = multihost_utils.process_allgather(m, tiled=True)
        m = jax.device_get(m)
        sums.append(m["loss_sum"])
        counts.append(m["tokens"])
        if progress is not None:
            progress.update(min(len(m["tokens"]), progress.total - progress.n))  # not the fill
    if not sums:
        return summarize(np.zeros(0), np.zeros(0))
    return summarize(np.concatenate(sums, axis=None), np.concatenate(counts, axis=None))


def progress(total: int, desc: str | None, position: int = 0) -> tqdm:
    """The bar of an evaluation over `total` batches, on line `position`; hidden when desc is
    None (a process that writes no output)."""
    return tqdm(total=total, desc=desc, unit="batch", position=position, leave=False,
                dynamic_ncols=True, disable=desc is None)


def evaluate_batches(state, batches: list[np.ndarray], place, group: int,
                     progress: tqdm | None = None) -> Evaluation:
    """Evaluate `state` over host batches, `group` per dispatch; `progress` (a bar the caller
    owns, placed where it likes) advances by batch."""
    return evaluate(state, groups(batches, place, group), progress)


def evaluate_stack(state_V, batches: list[list[np.ndarray]], place, group: int,
                   progress: tqdm | None = None) -> list[Evaluation]:
    """V stacked lanes, lane v over its own host batches `batches[v]`, in one vmapped program
    per group of batches -> one Evaluation per lane (a lane with no batches: all PAD, empty)."""
    V, n = len(batches), max(map(len, batches), default=0)
    like = next(b[0] for b in batches if b) if n else None
    sums, counts = [], []
    for a in range(0, n, group):
        g = np.full((V, group, *like.shape), PAD_TOKEN_ID, like.dtype)
        for v, lane in enumerate(batches):
            part = lane[a:a + group]
            if part:
                g[v, :len(part)] = np.stack(part)
        m = jax.device_get(stacked_eval_steps(state_V, place.put(g)))
        sums.append(m["loss_sum"].reshape(V, -1))
        counts.append(m["tokens"].reshape(V, -1))
        if progress is not None:
            progress.update(min(group, progress.total - progress.n))
    if not sums:
        return [summarize(np.zeros(0), np.zeros(0)) for _ in batches]
    sums, counts = np.concatenate(sums, axis=1), np.concatenate(counts, axis=1)
    return [summarize(sums[v], counts[v]) for v in range(V)]
