import numpy as np
import pytest

from minigpt_jax import data
from minigpt_jax.config import VOCAB_SIZE
from minigpt_jax.data import DataError, sequences


def test_from_arrays_is_flat_and_in_order():
    s = data.from_arrays(
        [np.arange(3), np.array([], int), np.arange(10, 15, dtype=np.int16)], "x.pt"
    )
    assert s.tokens.dtype == np.int32 and s.offsets.dtype == np.int64
    assert s.offsets.tolist() == [0, 3, 3, 8] and len(s) == 3 and s.kind == "tokenized"
    np.testing.assert_array_equal(s[2], np.arange(10, 15))
    assert [a.tolist() for a in s.to_list()] == [[0, 1, 2], [], [10, 11, 12, 13, 14]]
    assert s.describe() == "x.pt (3 sequences, 8 tokens)"


@pytest.mark.parametrize(
    "seqs, message",
    [
        ([], "no sequences found; expected at least one sequence"),
        ([np.array([1, 2]), np.zeros((2, 2), int)], "sequence 1 has shape (2, 2); expected a 1-D"),
        ([np.array([1.0, 2.0])], "sequence 0 has dtype float64; expected integer"),
        (
            [np.array([1, -3])],
            "sequence 0 has token id -3 at position 1; expected ids in [0, 50257)",
        ),
        (
            [np.arange(5), np.array([7, 8, 9, VOCAB_SIZE])],
            "sequence 1 has token id 50257 at position 3",
        ),
        (
            [np.array([1, 2**32 + 3])],
            "sequence 0 has token id 4294967299 at position 1",
        ),  # no int32 wrap
        ([np.array([1]), np.array([], int)], "every sequence is shorter than 2 tokens"),
    ],
)
def test_bad_input_names_source_sequence_position_value(seqs, message):
    with pytest.raises(DataError) as e:
        data.from_arrays(seqs, "x.pt")
    assert (
        str(e.value).startswith("x.pt: ") and message in str(e.value) and "\n" not in str(e.value)
    )


def test_check_finds_the_first_bad_id_across_blocks(monkeypatch):
    monkeypatch.setattr(sequences, "_BLOCK", 7)  # several blocks, the bad id in a later one
    tokens = np.arange(40, dtype=np.int32)
    tokens[23], tokens[31] = VOCAB_SIZE + 5, -1
    s = data.Sequences(tokens, np.array([0, 10, 20, 40], np.int64), "rows", "d.pt")
    with pytest.raises(DataError, match=r"^d\.pt: sequence 2 has token id 50262 at position 3;"):
        s.check()
    with pytest.raises(DataError, match=r"^d\.pt: sequence 2 has token id -1 at position 11;"):
        s.check(vocab_size=VOCAB_SIZE + 6)


def test_check_vocab_size_is_the_callers():
    s = data.Sequences(
        np.array([1, 2, 60000], np.int32), np.array([0, 3], np.int64), "tokenized", "t"
    )
    assert s.check(vocab_size=60001) is s
    with pytest.raises(DataError, match="token id 60000 at position 2"):
        s.check()


def test_representation_is_validated():
    with pytest.raises(ValueError, match="kind"):
        data.Sequences(np.zeros(2, np.int32), np.array([0, 2], np.int64), "docs", "x")
    with pytest.raises(ValueError, match="offsets run 0..3; expected 0..2"):
        data.Sequences(np.zeros(2, np.int32), np.array([0, 3], np.int64), "rows", "x")


def test_default_corpus_is_tokenized_sequences():
    s = data.default_corpus()
    assert s.kind == "tokenized" and s.source == "default corpus" and len(s) > 100
    assert 0 <= s.tokens.min() and s.tokens.max() < VOCAB_SIZE and s.offsets[-1] == len(s.tokens)


@pytest.mark.parametrize("field, file, how", [
    ("pt", "data/tokenized_data.pt", "read_pt=torch_compat.read_sequences"),
    ("bin", "gpt2/pytorch_model.bin", "read_bin=torch_compat.read_numpy_state_dict"),
    ("state_dict", "mini_gpt_baseline.pt", "state_dict=torch_compat.load_params"),
])
def test_a_missing_reader_is_one_line_naming_the_file_and_the_reader(field, file, how):
    class Refused(ValueError):
        pass

    with pytest.raises(Refused) as e:
        data.Readers().need(field, file, Refused)
    message = str(e.value)
    assert message.startswith(f"{file}: ") and how in message and "\n" not in message
    reader = object()
    assert data.Readers(**{field: reader}).need(field, file, Refused) is reader


def test_torch_compat_readers_fill_every_field():
    import torch_compat

    r = torch_compat.readers(n_heads=2)
    assert (r.pt, r.bin) == (torch_compat.read_sequences, torch_compat.read_numpy_state_dict)
    assert r.state_dict.func is torch_compat.load_params and r.state_dict.keywords == {"n_heads": 2}
