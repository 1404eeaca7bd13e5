import numpy as np
import pytest

from minigpt_jax import tokenizer
from minigpt_jax.data import corpus


def test_hello_world_is_gpt2():
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_decode_inverts_encode():
    text = "Return the sum of *a* and b.\n\n    >>> add(2, 3)\n    5  — naïve café"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.slow
def test_default_corpus_is_deterministic_capped_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = corpus.build_default_corpus(4096)
    assert sum(len(s) for s in built) == 4096
    assert all(s.dtype == np.int32 and s.ndim == 1 and len(s) >= 2 for s in built)
    assert all(((s >= 0) & (s < 50257)).all() for s in built)
    first = corpus.default_corpus(4096)
    assert list((tmp_path / "minigpt_jax").glob("default_corpus_*_4096.npz"))
    second = corpus.default_corpus(4096)  # from the cache
    assert len(first) == len(second) == len(built)
    assert all(np.array_equal(a, b) for a, b in zip(built, second))
    # documents are English prose from the standard library, not code dumps
    text = tokenizer.decode(np.concatenate(built))
    assert text.count(" the ") > 20


def test_corpus_leaves_out_test_modules():
    assert corpus.is_test_module(("test", "test_os.py"))
    assert corpus.is_test_module(("unittest", "test", "test_case.py"))
    assert corpus.is_test_module(("idlelib", "idle_test", "htest.py"))
    assert corpus.is_test_module(("site-packages", "numpy", "__init__.py"))
    assert corpus.is_test_module(("test_foo.py",))
    assert not corpus.is_test_module(("json", "decoder.py"))
    assert not corpus.is_test_module(("contextlib.py",))
    assert len(corpus._pydoc_topics()) > 50
