"""The token cache: a .pt source read once, then memory-mapped in constant time; prepared folders.

- One entry per source file, one file per entry (so one rename commits it):
  MAGIC, a little-endian uint64 header length, a JSON header (format, kind,
  source, dtype, sequences, tokens, max_id, fingerprint, key) and its sha256,
  then, each at a
  64-byte-aligned offset, the (n + 1) int64 offsets and the T tokens in their
  canonical dtype (sequences.storage_dtype: uint16 where every id fits, else
  int32). The file ends exactly there. Entries live in
  `files.cache_dir()/tokens/<path hash>-<key hash>.bin`; writing one removes
  that file's older entries, so a file that changes keeps one entry, not one
  per version.
- The key: the format version and the source file's resolved path, device,
  inode, size, mtime_ns and ctime_ns. A change in place moves mtime and ctime
  (and usually the size); a replacement (a new file renamed over it, a copy,
  a restore) has a new inode; a `touch`, or a change whose mtime is set back
  by hand, moves ctime, which no user call can set. Every one of these is a
  miss, read again. Left is a rewrite of the same size within the
  filesystem's timestamp granularity (a few ms; seconds on some
  filesystems): a file changed less than RACY_S before it was read is not
  cached, and a file whose key differs after the read than before (changed
  while read) is not either, so no entry can stand for other bytes.
- Integrity: the header's own digest, its sizes against the file's size (a
  truncated entry), then the fingerprint (sequences.content_digest, a full sha256 of offsets and
  tokens) recomputed and compared on every open (a flipped bit anywhere;
  about as fast as reading the pages, which training reads anyway, and a
  small share of the torch.load it replaces). A damaged entry is named in one
  notice line and rebuilt, never trusted; ids were range-checked when the
  entry was built, and a later run with a smaller vocabulary checks against
  the header's max_id (a full check only when that is out of range).
- Concurrency: every writer writes its own temporary file and renames it
  over the entry, and every entry for one key holds the same bytes: two
  processes building at once both end with a good entry, and a reader that
  mapped an entry keeps its pages if another replaces it.
- A cache folder that cannot be written costs one notice and a read each run.
- Prepared folders (scripts/prepare_data.py) hold the same format as
  `<folder>/PREPARED_FILE`, without a key: memory-mapped and verified
  on every open, no torch needed, so a prepared data set copies to another
  machine as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
import sys
import time

import numpy as np
from tqdm import tqdm

from minigpt_jax.data.readers import PtReader, find_data_file
from minigpt_jax.data.sequences import (
    KINDS,
    DataError,
    Sequences,
    canonical_blocks,
    check_nonempty,
    storage_dtype,
)
from minigpt_jax.files import atomic_path, cache_dir

PREPARED_FILE = "sequences.bin"  # what scripts/prepare_data.py writes into its folder
MAGIC = b"minigpt-jax sequences\n"
FORMAT = 1  # bump when the layout or the key changes: older entries are then misses
RACY_S = 2.0  # a file changed this recently is read but not cached (see the key, above)
_ALIGN = 64
_MAX_HEADER = 1 << 20
_DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}


class Damaged(Exception):
    """An entry that must not be trusted; the message says what is wrong with it."""


def notice(message: str) -> None:
    tqdm.write(f"token cache: {message}", file=sys.stderr)


def source_key(file: pathlib.Path, st: os.stat_result) -> dict:
    """What an entry is valid for: this file, in this state (see the module docstring)."""
    return {"format": FORMAT, "path": str(file.resolve()), "dev": st.st_dev, "inode": st.st_ino,
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def entry_path(key: dict) -> pathlib.Path:
    def short(text: str, n: int) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:n]

    name = f"{short(key['path'], 16)}-{short(json.dumps(key, sort_keys=True), 24)}.bin"
    return cache_dir() / "tokens" / name


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(header_len: int, sequences: int, tokens: int, itemsize: int) -> tuple[int, int, int]:
    """-> (offsets at, tokens at, end) in bytes."""
    offsets_at = _align(len(MAGIC) + 8 + header_len + 32)
    tokens_at = _align(offsets_at + 8 * (sequences + 1))
    return offsets_at, tokens_at, tokens_at + itemsize * tokens


def write(seqs: Sequences, path: pathlib.Path, key: dict | None = None) -> None:
    """Checked Sequences -> one entry (or prepared file) at path, atomically."""
    dtype = storage_dtype(seqs.tokens)
    header = json.dumps({
        "format": FORMAT, "kind": seqs.kind, "source": seqs.source, "dtype": dtype.name,
        "sequences": len(seqs), "tokens": len(seqs.tokens),
        "max_id": int(seqs.tokens.max()) if len(seqs.tokens) else -1,
        "fingerprint": seqs.fingerprint, "key": key,
    }).encode()
    offsets_at, tokens_at, _ = _layout(len(header), len(seqs), len(seqs.tokens), dtype.itemsize)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        f.write(hashlib.sha256(header).digest())
        f.write(b"\0" * (offsets_at - f.tell()))
        f.write(np.ascontiguousarray(seqs.offsets, "<i8"))
        f.write(b"\0" * (tokens_at - f.tell()))
        f.writelines(canonical_blocks(seqs.tokens, dtype))


def read(path: pathlib.Path, source: str, key: dict | None = None) -> tuple[Sequences, dict] | None:
    """An entry -> (Sequences over its memory-mapped tokens, header); None when there is no
    entry; Damaged when it is not whole and exactly what its header says."""
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return None
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
            raise Damaged(f"{size} bytes without a header")
        (header_len,) = struct.unpack("<Q", head[len(MAGIC):])
        if header_len > _MAX_HEADER:
            raise Damaged(f"header length {header_len}")
        raw = f.read(header_len)
        if len(raw) < header_len or hashlib.sha256(raw).digest() != f.read(32):
            raise Damaged("its header differs from its digest")
        try:
            h = json.loads(raw)
            dtype = _DTYPES[h["dtype"]]
            n, total, kind = int(h["sequences"]), int(h["tokens"]), h["kind"]
            fingerprint = h["fingerprint"]
            int(h["max_id"])
        except (ValueError, KeyError, TypeError) as e:  # JSON, a field, a type
            raise Damaged(f"unreadable header ({type(e).__name__})") from None
    if h.get("format") != FORMAT or kind not in KINDS or n < 0 or total < 0:
        raise Damaged(f"header says format {h.get('format')}, kind {kind!r}")
    if key is not None and h.get("key") != key:
        raise Damaged("written for another file or state of it")
    offsets_at, tokens_at, end = _layout(header_len, n, total, dtype.itemsize)
    if size != end:
        raise Damaged(f"{size:,} bytes; its header says {end:,}")
    offsets = np.fromfile(path, "<i8", count=n + 1, offset=offsets_at).astype(np.int64)
    tokens = (np.memmap(path, dtype, "r", offset=tokens_at, shape=(total,)) if total
              else np.zeros(0, dtype))
    try:
        seqs = Sequences(tokens, offsets, kind, source)  # digests the contents
    except ValueError as e:
        raise Damaged(str(e)) from None
    if seqs.fingerprint != fingerprint:
        raise Damaged("its contents differ from its digest")
    return seqs, h


def _in_vocab(seqs: Sequences, header: dict, vocab_size: int) -> Sequences:
    """Checked once when built; again only where this vocabulary is smaller than an id."""
    check_nonempty(seqs.offsets, seqs.source)
    return seqs.check(vocab_size) if header["max_id"] >= vocab_size else seqs


def cached(path: str | os.PathLike, vocab_size: int, read_pt: PtReader) -> Sequences:
    """A .pt file or data folder -> checked Sequences: from its entry when there is a good one,
    else read by read_pt(path, vocab_size), written to a new entry and returned from it."""
    path = pathlib.Path(path)
    file = find_data_file(path) if path.is_dir() else path
    try:
        before = file.stat()
    except OSError:
        return read_pt(path, vocab_size)  # the reader names what is wrong with it
    key = source_key(file, before)
    entry = entry_path(key)
    try:
        got = read(entry, str(file), key)
        if got is not None:
            return _in_vocab(*got, vocab_size)
    except (Damaged, OSError) as e:
        notice(f"{entry} is damaged ({e}); rebuilding it from {file}")
    seqs = read_pt(path, vocab_size)
    if source_key(file, file.stat()) != key:
        notice(f"{file} changed while it was read; not cached")
        return seqs
    if time.time() - max(before.st_mtime_ns, before.st_ctime_ns) / 1e9 < RACY_S:
        return seqs  # too recent to key on its timestamps (module docstring); cached next time
    try:
        write(seqs, entry, key)
    except OSError as e:
        notice(f"cannot write {entry.parent} ({e.strerror or e}); reading {file} every run")
        return seqs
    for older in entry.parent.glob(entry.name.split("-")[0] + "-*.bin"):
        if older != entry:
            older.unlink(missing_ok=True)
    try:  # the mapped entry, not the read copy: its memory is the page cache's
        got = read(entry, str(file), key)
    except (Damaged, OSError):
        got = None
    return seqs if got is None else got[0]


def read_prepared(path: str | os.PathLike, vocab_size: int) -> Sequences:
    """A folder from scripts/prepare_data.py (or its file) -> checked, memory-mapped Sequences;
    DataError naming the file for one that is missing, damaged or not of this format."""
    path = pathlib.Path(path)
    file = path / PREPARED_FILE if path.is_dir() else path
    try:
        got = read(file, str(path))
    except (Damaged, OSError) as e:
        raise DataError(
            f"{file}: {e}; expected a complete file from scripts/prepare_data.py (prepare it again)"
        ) from None
    if got is None:
        raise DataError(f"{file}: no such file; expected one from scripts/prepare_data.py")
    return _in_vocab(*got, vocab_size)


def write_prepared(seqs: Sequences, out_dir: str | os.PathLike) -> pathlib.Path:
    """Checked Sequences -> out_dir/PREPARED_FILE (atomically), which `data.load(out_dir)`
    takes directly. OSError when out_dir cannot be written."""
    file = pathlib.Path(out_dir) / PREPARED_FILE
    write(seqs, file)
    return file
