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
- The evaluation keeps each segment's summed loss, label count and an id (a hash of its
  tokens), so two runs evaluated on the same segments are compared segment by segment
  (`stats.segment_paired`, through `same_segments`).
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
from minigpt_jax.train import eval_steps


def _per_segment():
    return dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross entropy over every label token evaluated
    perplexity: float  # exp(loss)
    tokens: int  # label (non-PAD target) tokens evaluated
    segments: int  # held-out segments with at least one label
    stderr: float  # standard error of `loss` over segments; NaN with fewer than two
    # per evaluated segment (those with a label), in order: summed loss, label count, token hash
    segment_losses: np.ndarray | None = _per_segment()
    segment_counts: np.ndarray | None = _per_segment()
    segment_ids: np.ndarray | None = _per_segment()

    def as_dict(self) -> dict:
        """The figures (the per-segment arrays left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}


def summarize(loss_sums: np.ndarray, counts: np.ndarray, ids: np.ndarray | None = None
              ) -> Evaluation:
    """Per-segment summed losses and label counts (and ids, `segment_ids`) -> the evaluation
    (float64 on the host): the ratio estimate over segments (`stats.ratio_estimate`)."""
    s, n = np.asarray(loss_sums, np.float64).ravel(), np.asarray(counts, np.float64).ravel()
    keep = n > 0
    loss, stderr, m = stats.ratio_estimate(s, n)
    with np.errstate(over="ignore"):  # a diverged model's perplexity is inf, not a warning
        ppl = float(np.exp(loss))
    ids = None if ids is None else np.asarray(ids, np.uint64).ravel()[keep]
    return Evaluation(loss, ppl, int(n[keep].sum()), m, stderr, s[keep], n[keep], ids)


_HASH = np.random.default_rng(0x5EED).integers(1, 2**63, 8192, dtype=np.uint64) | np.uint64(1)


def segment_ids(batches: list[np.ndarray]) -> np.ndarray:
    """A 64-bit hash of each row of each batch, in order: equal for equal segments."""
    if not batches:
        return np.zeros(0, np.uint64)
    rows = np.concatenate([np.asarray(b).reshape(len(b), -1) for b in batches])
    k = _HASH[np.arange(rows.shape[1]) % len(_HASH)] + np.arange(rows.shape[1], dtype=np.uint64)
    return (rows.astype(np.uint64) * k).sum(axis=1, dtype=np.uint64)  # wraps modulo 2**64


def same_segments(a: Evaluation, b: Evaluation) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices (ia, ib) pairing the segments a and b both evaluated (the k-th occurrence of
    an id with its k-th occurrence), or None when either lacks per-segment ids or they share
    fewer than two segments with equal label counts."""
    if a.segment_ids is None or b.segment_ids is None:
        return None
    ka, kb = _occurrence_keys(a.segment_ids), _occurrence_keys(b.segment_ids)
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    ia, ib = np.sort(ia), ib[np.argsort(ia)]
    if len(ia) < 2 or not np.array_equal(a.segment_counts[ia], b.segment_counts[ib]):
        return None
    return ia, ib


def _occurrence_keys(ids: np.ndarray) -> np.ndarray:
    """(id, how many equal ids came before) as one structured key per segment."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    first = np.searchsorted(sorted_ids, sorted_ids, side="left")
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids)) - first
    out = np.empty(len(ids), dtype=[("id", np.uint64), ("k", np.int64)])
    out["id"], out["k"] = ids, rank
    return out


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


def evaluate(state, device_groups: Iterable, progress: tqdm | None = None,
             ids: np.ndarray | None = None) -> Evaluation:
    """Evaluate `state` over groups of batches already on its devices (`groups`); `ids`, one
    per row of the batches in order (`segment_ids`), are kept with the per-segment losses."""
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
    s, n = np.concatenate(sums, axis=None), np.concatenate(counts, axis=None)
    if ids is not None:  # the fill batches of the last group: no labels, dropped with them
        ids = np.concatenate([ids, np.zeros(len(n) - len(ids), np.uint64)])
    return summarize(s, n, ids)


def evaluate_batches(state, batches: list[np.ndarray], place, group: int, desc: str | None = None,
                     position: int = 0) -> Evaluation:
    """Evaluate `state` over host batches, `group` per dispatch; a progress bar when `desc`."""
    bar = tqdm(total=len(batches), desc=desc, unit="batch", position=position, leave=False,
               dynamic_ncols=True, disable=desc is None)
    try:
        return evaluate(state, groups(batches, place, group), bar, segment_ids(batches))
    finally:
        bar.close()
