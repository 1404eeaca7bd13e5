import numpy as np
import pytest

from minigpt_jax import tokenizer
from minigpt_jax.data import DataError, text

FIRST = "The quick brown fox jumps over the lazy dog.\nIt was not amused.\n"
SECOND = "Café au lait, naïve résumé: 42 ünïcödé words.\n\nA second paragraph.\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache folder per test (cache_dir() reads XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "minigpt_jax" / "text"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(FIRST, encoding="utf-8")
    (d / "sub" / "b.txt").write_text(SECOND, encoding="utf-8")
    (d / "notes.md").write_text("not a .txt file")
    (d / ".ipynb_checkpoints").mkdir()
    (d / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("hidden: left out")
    return d


def ids(s):
    return np.asarray(tokenizer.encode(s), dtype=np.int32)


def test_folder_tokenizes_to_the_tokenizer_ids_one_document_per_file(folder):
    seqs = text.load_text(folder, progress=False)
    assert len(seqs) == 2
    for got, want in zip(seqs, [FIRST, SECOND]):
        assert got.dtype == np.int32 and got.ndim == 1
        np.testing.assert_array_equal(got, ids(want))
    assert not any((s == 50256).any() for s in seqs)  # documents are joined by nothing


def test_single_file_and_blocks(folder):
    seqs = text.load_text(folder / "sub" / "b.txt", per="block", progress=False)
    assert [tokenizer.decode(s) for s in seqs] == [
        "Café au lait, naïve résumé: 42 ünïcödé words.", "A second paragraph."]


def test_blocks_split_on_blank_lines_only(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\ntwo\n\n\nthree\r\n  \r\nfour\n\n", encoding="utf-8")
    assert text.split_documents(f.read_text(), "block") == ["one\ntwo", "three", "four"]
    seqs = text.load_text(f, per="block", progress=False)
    assert [tokenizer.decode(s) for s in seqs] == ["one\ntwo", "three", "four"]


def test_second_call_reads_the_cache_and_tokenizes_nothing(folder, cache, monkeypatch):
    first = text.load_text(folder, progress=False)
    assert len(list(cache.glob("*.npy"))) == 2
    monkeypatch.setattr(tokenizer, "encode", lambda text: pytest.fail("tokenized again"))
    again = text.load_text(folder, progress=False)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_cache_key_follows_content_and_options(folder, cache):
    text.load_text(folder, progress=False)
    text.load_text(folder, per="block", progress=False)
    (folder / "a.txt").write_text(FIRST + "More.\n", encoding="utf-8")
    seqs = text.load_text(folder, progress=False)
    np.testing.assert_array_equal(seqs[0], ids(FIRST + "More.\n"))
    assert len(list(cache.glob("*.tokens.npy"))) == 3


def test_long_text_in_pieces_equals_one_encode(tmp_path, monkeypatch):
    sample = ("Line  with   spaces\n\n  indented\tline\nword\nx\n\n\ntrailing  \nspace\n\nnext "
              + "Ünï 123 'll ok?\n") * 40
    monkeypatch.setattr(text, "PIECE_CHARS", 1)  # a cut at every safe point
    assert len(list(text.pieces(sample, 1))) > 100
    assert "".join(text.pieces(sample, 1)) == sample
    np.testing.assert_array_equal(text.encode_document(sample), ids(sample))


def test_not_utf8_names_the_file_and_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("abc caf".encode() + b"\xe9 ok")
    with pytest.raises(DataError) as e:
        text.load_text(tmp_path, progress=False)
    msg = str(e.value)
    assert str(f) in msg and "not UTF-8" in msg and "0xe9 at byte offset 7" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("content, fact", [(b"", "empty file"), (b" \n\n\t\n", "only whitespace")])
def test_files_without_text(tmp_path, content, fact):
    f = tmp_path / "blank.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=f"{f}: {fact}; expected"):
        text.load_text(tmp_path, progress=False)


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "notes.md").write_text("text")
    with pytest.raises(DataError, match=f"{tmp_path}: no .txt files in this folder or below"):
        text.load_text(tmp_path, progress=False)


def test_missing_path_wrong_suffix_and_bad_option(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        text.load_text(tmp_path / "nope", progress=False)
    (tmp_path / "x.md").write_text("text")
    with pytest.raises(DataError, match=r"x.md: not a .txt file"):
        text.load_text(tmp_path / "x.md", progress=False)
    with pytest.raises(DataError, match="per='line': expected one of file, block"):
        text.load_text(tmp_path, per="line")
