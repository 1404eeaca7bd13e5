"""Token sequences as one flat array, the checks every source passes, and DataError.

- `Sequences` holds n sequences as a flat `tokens` array (int32, or uint16 as
  the token cache maps it) and int64 `offsets` (n + 1): sequence i is
  tokens[offsets[i]:offsets[i + 1]]. Hundreds of thousands of sequences cost
  two arrays, not a Python object each, and every later stage (checks,
  segmentation, split) is NumPy over them.
- `fingerprint` is a content digest (sha256 over kind, offsets and the tokens
  in their canonical dtype, `storage_dtype`): equal for the same sequences
  however they were read (a .pt, its cache entry, a prepared folder, a copy on
  another machine), different when any id, boundary or the kind differs.
- `kind` says which segmentation case applies (docs/spec.md, Data): "tokenized"
  sequences (tokenized_data.pt, the default corpus) of 32..128 tokens are kept
  whole; "rows" (sample_dataset.pt) are always cut into segments.
- Checks are vectorised; a failure is a DataError, one line: "<source>: what
  was found; expected ...", naming the sequence, the position and the value.
- The lowest module of the data package: every other one imports it, it
  imports none of them. `from_arrays` takes any list of 1-D arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from minigpt_jax.config import VOCAB_SIZE

KINDS = ("tokenized", "rows")
_BLOCK = 1 << 24  # tokens per block where a check needs temporaries: bounds their memory
_DIGEST_FORMAT = 1  # bump when what the fingerprint covers changes


class DataError(ValueError):
    """Training data that cannot be used: empty, malformed or out of range."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so it can key a cache
class Sequences:
    """n token sequences: tokens[offsets[i]:offsets[i + 1]] is sequence i."""

    tokens: np.ndarray  # (T,) int32 or uint16 token ids, every sequence back to back
    offsets: np.ndarray  # (n + 1,) int64, offsets[0] == 0, offsets[-1] == T, non-decreasing
    kind: str  # "tokenized" (kept whole when 32..128 tokens) or "rows" (always cut)
    source: str  # where they came from, as errors and reports name it
    fingerprint: str = ""  # content_digest(tokens, offsets, kind); computed when not given

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.tokens.dtype not in (np.int32, np.uint16) or self.tokens.ndim != 1:
            raise ValueError(
                f"tokens: {self.tokens.dtype} {self.tokens.shape}; expected 1-D int32 or uint16"
            )
        if self.offsets.dtype != np.int64 or self.offsets.ndim != 1 or len(self.offsets) == 0:
            raise ValueError(
                f"offsets: {self.offsets.dtype} {self.offsets.shape}; expected 1-D int64"
            )
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens):
            raise ValueError(
                f"offsets run {self.offsets[0]}..{self.offsets[-1]}; expected 0..{len(self.tokens)}"
            )
        if not self.fingerprint:  # frozen: set once, here
            digest = content_digest(self.tokens, self.offsets, self.kind)
            object.__setattr__(self, "fingerprint", digest)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def to_list(self) -> list[np.ndarray]:
        """One view per sequence (for callers of the list API; not for large data)."""
        return np.split(self.tokens, self.offsets[1:-1]) if len(self) else []

    def describe(self) -> str:
        return f"{self.source} ({len(self)} sequences, {len(self.tokens)} tokens)"

    def check(self, vocab_size: int = VOCAB_SIZE) -> Sequences:
        """DataError unless a sequence has 2 or more tokens and every id is in range."""
        check_nonempty(self.offsets, self.source)
        check_range(self.tokens, self.offsets, 0, self.source, vocab_size)
        return self


def check_nonempty(offsets: np.ndarray, source: str) -> None:
    """DataError for no sequences, or none with the two tokens a next-token label needs."""
    if len(offsets) < 2:
        raise DataError(
            f"{source}: no sequences found; expected at least one sequence of token ids"
        )
    if np.diff(offsets).max() < 2:
        raise DataError(
            f"{source}: every sequence is shorter than 2 tokens; expected at least one with 2 or"
            " more"
            " (a next-token label needs two tokens)"
        )


def check_range(
    tokens: np.ndarray, offsets: np.ndarray, base: int, source: str, vocab_size: int = VOCAB_SIZE
) -> None:
    """DataError naming the first id outside [0, vocab_size).

    tokens may be a slice of the flat array that starts at flat position
    `base`, and of any integer dtype: callers check before narrowing to int32,
    so an id past 2**31 is reported, not wrapped.
    """
    for a in range(0, len(tokens), _BLOCK):
        block = tokens[a : a + _BLOCK]
        if block.min() >= 0 and block.max() < vocab_size:  # no temporaries in the common case
            continue
        pos = base + a + int(np.flatnonzero((block < 0) | (block >= vocab_size))[0])
        seq = int(np.searchsorted(offsets, pos, side="right")) - 1
        raise DataError(
            f"{source}: sequence {seq} has token id {int(tokens[pos - base])} at position"
            f" {pos - int(offsets[seq])}; expected ids in [0, {vocab_size})"
        )


def check_dtype(arr: np.ndarray, source: str, i: int) -> None:
    """One sequence's array: 1-D and of an integer dtype, else DataError naming sequence i."""
    if arr.ndim != 1:
        raise DataError(
            f"{source}: sequence {i} has shape {arr.shape}; expected a 1-D sequence of token ids"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{source}: sequence {i} has dtype {arr.dtype}; expected integer token ids")


def storage_dtype(tokens: np.ndarray) -> np.dtype:
    """uint16 when every id fits in it (GPT-2's do), else int32: the canonical form in which
    tokens are cached, prepared and digested, so each is a function of the ids alone."""
    if tokens.dtype == np.uint16 or len(tokens) == 0:
        return np.dtype(np.uint16)
    fits = int(tokens.min()) >= 0 and int(tokens.max()) < 1 << 16
    return np.dtype(np.uint16 if fits else np.int32)


def canonical_blocks(tokens: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The tokens as little-endian `dtype`, block by block (a copy only where the dtype differs)."""
    for a in range(0, len(tokens), _BLOCK):
        yield np.ascontiguousarray(tokens[a : a + _BLOCK], dtype.newbyteorder("<"))


def content_digest(tokens: np.ndarray, offsets: np.ndarray, kind: str) -> str:
    """sha256 over the kind, the offsets and the tokens in their canonical dtype.

    Hashing runs at about memory speed with the CPU's SHA instructions
    (BENCHMARKS.md): a full digest, not a sample, so a flipped bit anywhere is
    seen, at a cost far below reading the .pt it stands for.
    """
    dtype = storage_dtype(tokens)
    h = hashlib.sha256(
        f"sequences v{_DIGEST_FORMAT}|{kind}|{dtype.name}|{len(offsets)}|{len(tokens)}|".encode()
    )
    h.update(np.ascontiguousarray(offsets, "<i8"))
    for block in canonical_blocks(tokens, dtype):
        h.update(block)
    return "sha256:" + h.hexdigest()


def offsets_from_lengths(lengths) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def from_arrays(
    seqs: Sequence[np.ndarray], source: str, kind: str = "tokenized", vocab_size: int = VOCAB_SIZE
) -> Sequences:
    """A list of 1-D integer arrays -> checked Sequences (ids checked before the int32 cast)."""
    arrays = [np.asarray(s) for s in seqs]
    for i, s in enumerate(arrays):
        check_dtype(s, source, i)
    offsets = offsets_from_lengths([s.size for s in arrays])
    check_nonempty(offsets, source)
    dtype = np.result_type(*{a.dtype for a in arrays}) if arrays else np.int64
    if not np.issubdtype(dtype, np.integer) or dtype == np.uint64:  # empty floats; uint64 + int
        dtype = np.int64  # an id past 2**63 wraps negative: still reported as out of range
    flat = np.concatenate(arrays, dtype=dtype, casting="unsafe") if arrays else np.zeros(0, dtype)
    check_range(flat, offsets, 0, source, vocab_size)
    return Sequences(flat.astype(np.int32, copy=False), offsets, kind, source)

