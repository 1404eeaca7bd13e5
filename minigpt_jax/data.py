"""Sequences -> fixed-length chunks -> shuffled, padded batches through grain.

- Each sequence is cut into consecutive chunks of seq_len; the last, shorter
  chunk is padded with PAD (the PyTorch SeqDataset's rule).
- The batch stream is a grain `MapDataset`: random access, so a resumed run
  continues at exactly the batch it stopped before, and the iterator state that
  goes into a checkpoint is a single index.
- Each epoch is shuffled anew (grain reseeds its shuffle per epoch) and is
  padded with all-PAD rows to a whole number of batches: every batch has the
  same shape, so the step never recompiles, and PAD rows carry no loss.
"""

from __future__ import annotations

import math
from typing import Sequence

import grain
import numpy as np

from minigpt_jax.config import PAD_TOKEN_ID, VOCAB_SIZE


class DataError(ValueError):
    """Training data that cannot be used: empty, malformed or out of range."""


def check_sequences(seqs: Sequence[np.ndarray], source: str, vocab_size: int = VOCAB_SIZE) -> None:
    """Raise DataError unless seqs is a non-empty list of 1-D integer arrays in range."""
    if len(seqs) == 0:
        raise DataError(f"{source}: no sequences found; expected at least one sequence of token ids")
    longest = 0
    for i, s in enumerate(seqs):
        s = np.asarray(s)
        if s.ndim != 1:
            raise DataError(f"{source}: sequence {i} has shape {s.shape}; expected a 1-D sequence of token ids")
        if s.size and not np.issubdtype(s.dtype, np.integer):
            raise DataError(f"{source}: sequence {i} has dtype {s.dtype}; expected integer token ids")
        if s.size:
            bad = np.flatnonzero((s < 0) | (s >= vocab_size))
            if bad.size:
                raise DataError(
                    f"{source}: sequence {i} has token id {int(s[bad[0]])} at position {int(bad[0])};"
                    f" expected ids in [0, {vocab_size})"
                )
        longest = max(longest, s.size)
    if longest < 2:
        raise DataError(
            f"{source}: every sequence is shorter than 2 tokens; expected at least one with 2 or more"
            " (a next-token label needs two tokens)"
        )


def chunk_sequences(seqs: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
    """Cut each sequence into consecutive seq_len chunks, PAD-filling the last -> (N, seq_len) int32."""
    rows = []
    for s in seqs:
        s = np.asarray(s, dtype=np.int32)
        n = math.ceil(len(s) / seq_len)
        if n == 0:
            continue
        padded = np.full(n * seq_len, PAD_TOKEN_ID, np.int32)
        padded[: len(s)] = s
        rows.append(padded.reshape(n, seq_len))
    if not rows:
        return np.zeros((0, seq_len), np.int32)
    return np.concatenate(rows)


def split_chunks(chunks: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded held-out split -> (train, val); at least one chunk stays for training."""
    n_val = int(round(len(chunks) * val_fraction))
    n_val = min(n_val, len(chunks) - 1)
    perm = np.random.default_rng(seed).permutation(len(chunks))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return chunks[train_idx], chunks[val_idx]


def steps_per_epoch(num_chunks: int, batch_size: int) -> int:
    return math.ceil(num_chunks / batch_size)


def batch_dataset(chunks: np.ndarray, batch_size: int, seed: int, num_epochs: int) -> grain.MapDataset:
    """Random-access stream of (batch_size, seq_len) int32 batches over num_epochs.

    Element b is batch b: epochs are consecutive, each shuffled with its own
    seed, its last partial batch filled with all-PAD rows.
    """
    n = len(chunks)
    if n == 0:
        raise DataError("no chunks to batch; expected at least one sequence of 2 or more tokens")
    rows_per_epoch = steps_per_epoch(n, batch_size) * batch_size
    shuffled = grain.MapDataset.source(chunks).shuffle(seed=seed).repeat(num_epochs)
    pad_row = np.full(chunks.shape[1], PAD_TOKEN_ID, np.int32)

    def row(i: int) -> np.ndarray:
        epoch, j = divmod(i, rows_per_epoch)
        return shuffled[epoch * n + j] if j < n else pad_row

    return grain.MapDataset.range(num_epochs * rows_per_epoch).map(row).batch(batch_size)


def eval_batches(chunks: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The held-out chunks in order, in PAD-filled batches of batch_size."""
    return list(grain.MapDataset.source(chunks).batch(batch_size).map(
        lambda b: np.concatenate([b, np.full((batch_size - len(b), b.shape[1]), PAD_TOKEN_ID, np.int32)])
    ))


def batch_iterator(ds: grain.MapDataset, start: int, num_workers: int):
    """Iterate ds from batch `start`, reading ahead on threads (or worker processes)."""
    it = ds.slice(slice(start, None)).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    )
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)
