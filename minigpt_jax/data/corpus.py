"""The embedded default corpus: English text that ships with Python itself.

- Documents are the pydoc topics (`pydoc_data.topics`) and the docstrings of
  the standard library's modules, classes and functions, read with `ast` from
  the source files (nothing is imported, test modules are left out).
- Deterministic for a given Python: documents are shuffled with a fixed seed
  and taken until DEFAULT_CORPUS_TOKENS tokens, so the README's run finishes in
  its measured time.
- Built once, then cached under the user's cache folder ($XDG_CACHE_HOME or
  ~/.cache), written to a temporary name and renamed so a crash never leaves a
  half-written cache.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import sysconfig

import numpy as np

from minigpt_jax import tokenizer
from minigpt_jax.config import SEQ_MIN
from minigpt_jax.files import atomic_path, cache_dir

DEFAULT_CORPUS_TOKENS = 98_304  # cap on the default corpus; sets the README run's time
CORPUS_SEED = 0
_FORMAT = 2  # bump when the way documents are built changes
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [topics[k] for k in sorted(topics)]


def is_test_module(rel_parts: tuple[str, ...]) -> bool:
    """True for test modules and third-party folders, given a path relative to the stdlib."""
    return bool(_TEST_DIRS.intersection(rel_parts[:-1])) or rel_parts[-1].startswith("test_")


def _stdlib_docstrings() -> list[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if is_test_module(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # lib2to3 fixtures and the like
        nodes = [tree] + [
            n for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:  # skip one-word docstrings
                docs.append(doc)
    return docs


def documents() -> list[str]:
    """All candidate documents, in a fixed order."""
    return _pydoc_topics() + _stdlib_docstrings()


def build_default_corpus(max_tokens: int = DEFAULT_CORPUS_TOKENS) -> list[np.ndarray]:
    """Tokenize documents in a seeded order until max_tokens; one array per document.

    Documents under SEQ_MIN tokens are left out: docs/spec.md's segmentation would drop
    them, and the budget is meant for tokens that train."""
    docs = documents()
    order = np.random.default_rng(CORPUS_SEED).permutation(len(docs))
    out, total = [], 0
    for i in order:
        ids = tokenizer.encode(docs[i])
        if len(ids) < SEQ_MIN:
            continue
        ids = ids[: max_tokens - total]
        out.append(np.asarray(ids, dtype=np.int32))
        total += len(ids)
        if total >= max_tokens:
            break
    return out


def default_corpus(max_tokens: int = DEFAULT_CORPUS_TOKENS) -> list[np.ndarray]:
    """The default corpus, from the cache when it is there."""
    version = ".".join(map(str, sys.version_info[:3]))
    path = cache_dir() / f"default_corpus_py{version}_v{_FORMAT}_{max_tokens}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                tokens, offsets = f["tokens"], f["offsets"]
            return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        except Exception:  # a damaged cache is rebuilt, not trusted
            pass
    seqs = build_default_corpus(max_tokens)
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, tokens=np.concatenate(seqs), offsets=offsets)
    except OSError:
        pass  # an unwritable cache only costs a rebuild next time
    return seqs
