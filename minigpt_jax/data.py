"""Sequences -> held-out split -> fixed-length segments -> shuffled, padded batches through grain.

- Segmentation (SPEC, Data), per sequence of L tokens, segmentation="pytorch":
  32 <= L <= 128 is kept whole ("tokenized" sources only); longer sequences,
  and every "rows" sequence, are cut into segments starting at 0, seq_len,
  2*seq_len, ... while the start is <= L - 32; shorter ones are dropped. Each
  segment is truncated or PAD-filled to seq_len. segmentation="chunks": every
  token, in consecutive seq_len chunks, the last one PAD-filled.
- All of it is NumPy over the flat `sources.Sequences`: a table of segment
  starts and lengths (`Segments`), no Python loop per sequence. The segments
  are never copied out of the tokens (which may be the token cache's
  memory-mapped uint16): a `Segments` behaves as an (N, seq_len) int32 array
  whose rows are gathered through a sliding-window view when indexed, so a
  run holds the tokens once, plus 16 bytes per segment.
- The held-out split is by whole source sequence, before segmentation, so no
  validation segment shares a sequence with training. `prepare` is memoised
  by `prepare_key(config)`: experiments that agree on it share one copy.
- The batch stream is a grain `MapDataset`: element b is batch b of the whole
  run (epochs consecutive, each with its own seeded permutation, its last
  partial batch filled with all-PAD rows), built by one gather of its rows; a
  resumed run continues at exactly batch b, and every batch has one shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import threading
from collections.abc import Sequence

import grain
import numpy as np

from minigpt_jax.config import PAD_TOKEN_ID, SEQ_MAX, SEQ_MIN
from minigpt_jax.sources import DataError, Sequences

_ROWS = 1 << 16  # segments per block where a pass needs temporaries: bounds their memory


# --- segmentation ------------------------------------------------------------------------


def segments_per_sequence(
    lengths: np.ndarray, kind: str, seq_len: int, segmentation: str
) -> np.ndarray:
    """How many segments each sequence gives (0: dropped)."""
    lengths = np.asarray(lengths, np.int64)
    if segmentation == "chunks":
        return -(-lengths // seq_len)
    cut = np.where(lengths >= SEQ_MIN, (lengths - SEQ_MIN) // seq_len + 1, 0)
    if kind == "rows":
        return cut
    return np.where(lengths > SEQ_MAX, cut, (lengths >= SEQ_MIN).astype(np.int64))


def segment_table(lengths: np.ndarray, counts: np.ndarray, seq_len: int):
    """-> (sequence index, start within it, tokens taken) of every segment, in sequence order."""
    seq = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    start = (np.arange(len(seq), dtype=np.int64) - first[seq]) * seq_len
    return seq, start, np.minimum(seq_len, np.asarray(lengths, np.int64)[seq] - start)


def gather(tokens: np.ndarray, starts: np.ndarray, takes: np.ndarray, seq_len: int,
           window: np.ndarray | None = None) -> np.ndarray:
    """Rows tokens[s:s + t], PAD-filled to seq_len -> (N, seq_len) int32.

    Rows come from one fancy index into a sliding-window view of the tokens
    (no index array of N x seq_len; `window` passes one already made); the
    few shorter ones are PAD-filled in blocks, and the last rows of the
    tokens, which the window cannot start at, indexed directly.
    """
    n, total = len(starts), len(tokens)
    if n == 0:
        return np.zeros((0, seq_len), np.int32)
    if total >= seq_len:
        if window is None:
            window = np.lib.stride_tricks.sliding_window_view(tokens, seq_len)
        out = window[np.minimum(starts, total - seq_len)].astype(np.int32, copy=False)
    else:
        out = np.empty((n, seq_len), np.int32)
    part = np.flatnonzero(takes < seq_len)
    cols = np.arange(seq_len)
    for a in range(0, len(part), _ROWS):
        p = part[a : a + _ROWS]
        valid = cols < takes[p, None]
        rows = out[p]
        late = starts[p] > total - seq_len  # the window starts them earlier: index the tokens
        if late.any():
            index = np.where(valid[late], starts[p[late], None] + cols, 0)
            rows[late] = tokens[index]
        out[p] = np.where(valid, rows, PAD_TOKEN_ID)
    return out


class Segments(np.lib.mixins.NDArrayOperatorsMixin):
    """(N, seq_len) int32 segments as a table into the flat tokens: row i is
    tokens[starts[i]:starts[i] + takes[i]], PAD-filled to seq_len.

    Indexing gathers the rows asked for (an ndarray: `segments[rows]`,
    `segments[a:b]`, `segments[rows, cols]`); `np.asarray(segments)` gathers
    all of them, for small data and tests. Pickled (to grain's worker
    processes) with memory-mapped tokens by file name, not by copy.
    """

    dtype = np.dtype(np.int32)
    ndim = 2

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, takes: np.ndarray, seq_len: int):
        self.tokens, self.starts, self.takes, self.seq_len = tokens, starts, takes, seq_len
        self._window = (np.lib.stride_tricks.sliding_window_view(tokens, seq_len)
                        if len(tokens) >= seq_len else None)  # made once: batches are small

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.starts), self.seq_len)

    @property
    def size(self) -> int:
        return len(self.starts) * self.seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, key):
        rows, cols = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, (int, np.integer)):
            return self[np.array([rows]), (*cols,)][0] if cols else self[np.array([rows])][0]
        out = gather(self.tokens, self.starts[rows], self.takes[rows], self.seq_len, self._window)
        return out[(slice(None), *cols)] if cols else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(np.asarray(x) if isinstance(x, Segments) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __reduce__(self):
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap):  # a whole mapping
            tokens = (_mapped, (t.filename, t.dtype.str, t.offset, len(t)))
            return (_segments, (tokens, self.starts, self.takes, self.seq_len))
        return (Segments, (t, self.starts, self.takes, self.seq_len))


def _mapped(filename: str, dtype: str, offset: int, n: int) -> np.ndarray:
    return np.memmap(filename, np.dtype(dtype), "r", offset=offset, shape=(n,))


def _segments(tokens: tuple, starts, takes, seq_len: int) -> Segments:
    """Unpickles a Segments over tokens mapped again from their file."""
    return Segments(tokens[0](*tokens[1]), starts, takes, seq_len)


def _count(segments, cols: slice, pad: bool) -> int:
    """PAD (pad=True) or non-PAD entries of segments[:, cols], counted in blocks."""
    hits = sum(
        int(np.count_nonzero(segments[a : a + _ROWS, cols] == PAD_TOKEN_ID))
        for a in range(0, len(segments), _ROWS)
    )
    return hits if pad else len(segments) * len(range(segments.shape[1])[cols]) - hits


# --- the held-out split and the prepared data --------------------------------------------


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
        label_tokens=_count(train, slice(1, None), pad=False),
        pad_share=_count(train, slice(None), pad=True) / max(train.size, 1),
    )


# --- batches -----------------------------------------------------------------------------


def steps_per_epoch(num_chunks: int, batch_size: int) -> int:
    return math.ceil(num_chunks / batch_size)


@functools.lru_cache(maxsize=4)  # shared by pipelines over the same segment count and seed
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of n segments for one epoch."""
    return np.random.default_rng((seed, epoch)).permutation(n).astype(np.min_scalar_type(n))


class EpochBatches:
    """Batch b of the run -> (batch_size, seq_len) int32: one gather over the epoch's permutation.

    A plain object (not a closure) so grain can send it to worker processes.
    segments: a Segments table, or any (N, seq_len) int32 array.
    """

    def __init__(self, segments, batch_size: int, seed: int):
        self.segments, self.batch_size, self.seed = segments, batch_size, seed
        self.per_epoch = steps_per_epoch(len(segments), batch_size)

    def __call__(self, b: int) -> np.ndarray:
        epoch, j = divmod(int(b), self.per_epoch)
        rows = epoch_order(len(self.segments), self.seed, epoch)[
            j * self.batch_size : (j + 1) * self.batch_size
        ]
        batch = self.segments[rows]
        if len(rows) < self.batch_size:
            fill = np.full((self.batch_size - len(rows), batch.shape[1]), PAD_TOKEN_ID, np.int32)
            batch = np.concatenate([batch, fill])
        return batch


def batch_dataset(
    segments: np.ndarray, batch_size: int, seed: int, num_epochs: int
) -> grain.MapDataset:
    """Random-access stream of (batch_size, seq_len) int32 batches over num_epochs: element b
    is batch b."""
    if len(segments) == 0:
        raise DataError("no segments to batch; expected at least one sequence that gives a segment")
    batches = EpochBatches(segments, batch_size, seed)
    return grain.MapDataset.range(num_epochs * batches.per_epoch).map(batches)


def _parse_absl_flags() -> None:
    """grain's worker processes read absl flags, which only an absl app parses (grain #1360)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def batch_iterator(ds: grain.MapDataset, start: int, num_workers: int):
    """Iterate ds from batch `start`: in the calling thread, or in num_workers processes.

    In-process batches are made on demand, without read-ahead threads: a batch
    is one small gather, and handing it over between threads costs more than
    making it (BENCHMARKS.md, "Measured: data"); the step's asynchronous
    dispatch already overlaps it with device work. Worker processes are sent
    the dataset, segments included, and need the calling script's
    `if __name__ == "__main__"` guard (they are spawned).
    """
    ds = ds.slice(slice(start, None))
    if num_workers > 0:
        _parse_absl_flags()
        options = grain.MultiprocessingOptions(num_workers=num_workers)
        return iter(ds.to_iter_dataset().mp_prefetch(options))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


# --- evaluation --------------------------------------------------------------------------


def _batched(segments: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Views of batch_size rows; the last batch PAD-filled (a copy)."""
    out = [segments[a : a + batch_size] for a in range(0, len(segments), batch_size)]
    if out and len(out[-1]) < batch_size:
        fill = np.full((batch_size - len(out[-1]), segments.shape[1]), PAD_TOKEN_ID, np.int32)
        out[-1] = np.concatenate([out[-1], fill])
    return out


def eval_batches(segments: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every held-out segment in order, in PAD-filled batches of batch_size (the final pass)."""
    return _batched(segments, batch_size)


def eval_sample(segments: np.ndarray, n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """A fixed, seeded sample of n PAD-filled batches of held-out segments (periodic evaluation);
    all of them when there are no more than n batches' worth."""
    rows = n * batch_size
    if rows >= len(segments):
        return _batched(segments, batch_size)
    pick = np.sort(np.random.default_rng(seed).choice(len(segments), rows, replace=False))
    return _batched(segments[pick], batch_size)


# --- the old every-token rule as a list function, the tests' independent reference ------


def chunk_sequences(seqs: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
    """Each sequence in consecutive seq_len chunks, the last PAD-filled -> (N, seq_len) int32."""
    arrays = [np.asarray(s, np.int32).reshape(-1) for s in seqs]
    offsets = np.cumsum([0] + [len(s) for s in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    lengths = np.diff(offsets)
    seq, start, take = segment_table(
        lengths, segments_per_sequence(lengths, "tokenized", seq_len, "chunks"), seq_len
    )
    return gather(tokens, offsets[seq] + start, take, seq_len)

