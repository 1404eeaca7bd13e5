"""Batches: shuffled, PAD-filled training batches through grain, and held-out batches.

- The batch stream is a grain `MapDataset`: element b is batch b of the whole
  run (epochs consecutive, each with its own seeded permutation, its last
  partial batch filled with all-PAD rows), built by one gather of its rows; a
  resumed run continues at exactly batch b, and every batch has one shape.
"""

from __future__ import annotations

import functools
import math

import grain
import numpy as np

from minigpt_jax.config import PAD_TOKEN_ID
from minigpt_jax.data.sequences import DataError


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


# --- held-out batches --------------------------------------------------------------------------


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

