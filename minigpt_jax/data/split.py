"""The held-out split and the prepared data: Sequences -> train and held-out Segments.

- The split is by whole source sequence, before segmentation, so no
  validation segment shares a sequence with training.
- `prepare` is memoised by `prepare_key(config)`: experiments that agree on it
  share one copy.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import numpy as np

from minigpt_jax.config import SEQ_MAX, SEQ_MIN
from minigpt_jax.data.segment import Segments, count, segment_table, segments_per_sequence
from minigpt_jax.data.sequences import DataError, Sequences


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Train and held-out segments of one source, with what a report says about them."""

    train: Segments  # (N, seq_len) int32 training segments, in source order
    val: Segments  # (M, seq_len) int32 held-out segments, from sequences training never sees
    sequences: int  # source sequences read
    held_out: int  # of them held out whole for validation
    dropped_sequences: int  # sequences that give no segment (shorter than SEQ_MIN, or empty)
    dropped_tails: int  # sequences whose last < SEQ_MIN tokens after the last segment were dropped
    tokens: int  # tokens read
    dropped_tokens: int  # tokens in no segment (dropped sequences, tails, truncation)
    label_tokens: int  # non-PAD targets (positions 1..seq_len-1) in the training segments
    pad_share: float  # share of PAD among the training segments' tokens

    def summary(self) -> str:
        return (
            f"{self.sequences:,} sequences ({self.held_out:,} held out, {self.dropped_sequences:,}"
            f" dropped, {self.dropped_tails:,} tails dropped) -> {len(self.train):,} training and"
            f" {len(self.val):,} held-out segments; {self.label_tokens:,} training labels,"
            f" {100 * self.pad_share:.1f}% PAD"
        )


def prepare_key(config) -> tuple:
    """The config fields `prepare` depends on: equal keys, one shared copy of the segments."""
    return (config.seq_len, config.segmentation, float(config.val_fraction), config.data_seed)


def split_sequences(counts: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Seeded held-out mask over sequences: val_fraction of those that give segments, leaving
    at least one of them for training (sequences that give none play no part)."""
    kept = np.flatnonzero(counts > 0)
    n_val = min(int(round(len(kept) * val_fraction)), len(kept) - 1)
    held = np.zeros(len(counts), bool)
    held[kept[np.random.default_rng(seed).permutation(len(kept))[:n_val]]] = True
    return held


_PREPARE_LOCK = threading.Lock()  # experiments in threads compute a shared key once


def prepare(sources: Sequences, config) -> Prepared:
    """Split, segment and count `sources` for config (seq_len, segmentation, val_fraction,
    data_seed).

    Memoised on (sources, prepare_key(config)), the last four kept: a second
    call with the same source object and key returns the same Prepared, arrays
    shared. `clear_prepared()` lets them go.
    """
    with _PREPARE_LOCK:
        return _prepare(sources, *prepare_key(config))


def clear_prepared() -> None:
    """Forget every memoised Prepared (their memory goes once no caller holds them)."""
    _prepare.cache_clear()


@functools.lru_cache(maxsize=4)
def _prepare(
    sources: Sequences, seq_len: int, segmentation: str, val_fraction: float, seed: int
) -> Prepared:
    lengths = sources.lengths
    counts = segments_per_sequence(lengths, sources.kind, seq_len, segmentation)
    if not counts.any():
        need = SEQ_MIN if segmentation == "pytorch" else 1
        raise DataError(
            f"{sources.source}: no sequence gives a segment (the longest has"
            f" {int(lengths.max(initial=0))} tokens); expected at least one of {need} or more"
            f" tokens for segmentation={segmentation}"
        )
    held = split_sequences(counts, val_fraction, seed)
    seq, start, take = segment_table(lengths, counts, seq_len)
    starts = sources.offsets[seq] + start
    to_val = held[seq]
    train = Segments(sources.tokens, starts[~to_val], take[~to_val], seq_len)
    val = Segments(sources.tokens, starts[to_val], take[to_val], seq_len)
    tails = 0  # cut sequences whose last < SEQ_MIN tokens, after the last segment, are dropped
    if segmentation == "pytorch":
        cut = (counts > 0) if sources.kind == "rows" else (lengths > SEQ_MAX)
        tails = int(np.count_nonzero(cut & (lengths > counts * seq_len)))
    return Prepared(
        train=train,
        val=val,
        sequences=len(sources),
        held_out=int(held.sum()),
        dropped_sequences=int(np.count_nonzero(counts == 0)),
        dropped_tails=tails,
        tokens=len(sources.tokens),
        dropped_tokens=len(sources.tokens) - int(take.sum()),
        label_tokens=count(train, slice(1, None), pad=False),
        pad_share=count(train, slice(None), pad=True) / max(train.size, 1),
    )

