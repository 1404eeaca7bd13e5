"""The training data: any source -> checked token sequences -> segments -> batches.

Modules, each importing only those above it:

- sequences: `Sequences` (flat tokens and offsets), their checks and DataError;
- readers: `Readers`, the file readers passed in for what only torch reads;
- corpus, text, token_cache: the embedded corpus, .txt text, the .pt token
  cache and prepared folders;
- sources: `load`, the one entry point that dispatches on the kind of source;
- segment: segmentation into a `Segments` table;
- split: the held-out split and `prepare` (memoised per data setting);
- batches: training batches through grain, and held-out batches.

The names the rest of the library uses are re-exported here, so
`from minigpt_jax import data; data.load(...); data.prepare(...)` reads one
package; docs/data.md describes the whole.
"""

from minigpt_jax.data.batches import (
    EpochBatches,
    batch_dataset,
    batch_iterator,
    epoch_order,
    eval_batches,
    eval_sample,
    steps_per_epoch,
)
from minigpt_jax.data.readers import DATA_FILES, Readers, find_data_file
from minigpt_jax.data.segment import Segments, chunk_sequences
from minigpt_jax.data.sequences import (
    DataError,
    Sequences,
    content_digest,
    from_arrays,
    storage_dtype,
)
from minigpt_jax.data.sources import default_corpus, load
from minigpt_jax.data.split import Prepared, clear_prepared, prepare, prepare_key
from minigpt_jax.data.token_cache import PREPARED_FILE, read_prepared, write_prepared

__all__ = [
    "DATA_FILES", "PREPARED_FILE", "DataError", "EpochBatches", "Prepared", "Readers", "Segments",
    "Sequences", "batch_dataset", "batch_iterator", "chunk_sequences", "clear_prepared",
    "content_digest", "default_corpus", "epoch_order", "eval_batches", "eval_sample",
    "find_data_file", "from_arrays", "load", "prepare", "prepare_key", "read_prepared",
    "steps_per_epoch", "storage_dtype", "write_prepared",
]
