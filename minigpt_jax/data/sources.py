"""`load`: the one entry point that reads any training source the command line takes.

It dispatches on the kind of source, each read by its own module:

- None: the embedded default corpus (corpus.py), as "tokenized" Sequences;
- a folder from scripts/prepare_data.py, or its sequences.bin:
  token_cache.read_prepared, memory-mapped and verified, no torch needed;
- a .txt file or a folder of them: text.py (one document per file or per
  blank-line-separated block; cached by content);
- a .pt file, or a folder with tokenized_data.pt or sample_dataset.pt:
  `readers.pt`, passed in (torch_compat.data.read_sequences), through the
  token cache.

Whatever the source, the result is checked against the vocabulary, and
anything unusable is a DataError, one line.
"""

from __future__ import annotations

import os
import pathlib

from minigpt_jax.config import VOCAB_SIZE
from minigpt_jax.data import corpus, text, token_cache
from minigpt_jax.data.readers import DATA_FILES, Readers
from minigpt_jax.data.sequences import DataError, Sequences, from_arrays
from minigpt_jax.data.token_cache import PREPARED_FILE


def default_corpus(vocab_size: int = VOCAB_SIZE) -> Sequences:
    """The embedded default corpus (data/corpus.py) as checked "tokenized" Sequences."""
    return from_arrays(corpus.default_corpus(), "default corpus", "tokenized", vocab_size)


def is_prepared(path: pathlib.Path) -> bool:
    """A folder written by scripts/prepare_data.py, or the file in it."""
    path = pathlib.Path(path)
    if path.is_dir():
        return (path / PREPARED_FILE).is_file()
    return path.name == PREPARED_FILE and path.is_file()


def is_text(path: pathlib.Path) -> bool:
    """A .txt file, or a folder of .txt files without the PyTorch project's data files (or a
    prepared folder's file)."""
    path = pathlib.Path(path)
    if path.is_dir():
        names = (*DATA_FILES, PREPARED_FILE)
        return not any((path / name).is_file() for name in names) and any(path.rglob("*.txt"))
    return path.suffix == ".txt"


def load(
    path: str | os.PathLike | None,
    vocab_size: int = VOCAB_SIZE,
    text_docs: str = "file",
    readers: Readers = Readers(),
    cache: bool = True,
) -> Sequences:
    """The training data once, checked against vocab_size.

    path: None for the default corpus; a prepared folder (scripts/prepare_data.py)
    or its file, memory-mapped and verified, no torch needed; a .txt file or a
    folder of them (text_docs: "file" or "block", see data/text.py; cached by
    content); else a .pt file or data folder, read by `readers.pt` (e.g.
    torch_compat.data.read_sequences) through the token cache, or every time
    with cache=False. DataError (one line) for anything unusable, a missing
    reader included.
    """
    if path is None:
        return default_corpus(vocab_size)
    path = pathlib.Path(path)
    if is_prepared(path):
        return token_cache.read_prepared(path, vocab_size)
    if is_text(path):
        docs = text.load_text(path, text_docs)
        return from_arrays(docs, f"{path} (text)", "tokenized", vocab_size)
    if readers.pt is None and not path.exists():  # else the reader names what is wrong
        raise DataError(
            f"{path}: no such file or folder; expected a .pt file, a folder with"
            f" {' or '.join(DATA_FILES)}, .txt text or a folder from scripts/prepare_data.py"
        )
    read_pt = readers.need("pt", path)
    if not cache:
        return read_pt(path, vocab_size)
    return token_cache.cached(path, vocab_size, read_pt)
