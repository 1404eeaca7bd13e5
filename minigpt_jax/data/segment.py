"""Segmentation (docs/data.md): token sequences -> fixed-length segments, as a table.

- Per sequence of L tokens, segmentation="pytorch": 32 <= L <= 128 is kept
  whole ("tokenized" sources only); longer sequences, and every "rows"
  sequence, are cut into segments starting at 0, seq_len, 2*seq_len, ...
  while the start is <= L - 32; shorter ones are dropped. Each segment is
  truncated or PAD-filled to seq_len. segmentation="chunks": every token, in
  consecutive seq_len chunks, the last one PAD-filled.
- All of it is NumPy over the flat `Sequences`: a table of segment starts and
  lengths (`Segments`), no Python loop per sequence. The segments are never
  copied out of the tokens (which may be the token cache's memory-mapped
  uint16): a `Segments` behaves as an (N, seq_len) int32 array whose rows are
  gathered through a sliding-window view when indexed, so a run holds the
  tokens once, plus 16 bytes per segment.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np

from minigpt_jax.config import PAD_TOKEN_ID, SEQ_MAX, SEQ_MIN

_ROWS = 1 << 16  # segments per block where a pass needs temporaries: bounds their memory


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


def count(segments, cols: slice, pad: bool) -> int:
    """PAD (pad=True) or non-PAD entries of segments[:, cols], counted in blocks."""
    hits = sum(
        int(np.count_nonzero(segments[a : a + _ROWS, cols] == PAD_TOKEN_ID))
        for a in range(0, len(segments), _ROWS)
    )
    return hits if pad else len(segments) * len(range(segments.shape[1])[cols]) - hits


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


