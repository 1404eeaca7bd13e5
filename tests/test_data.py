import numpy as np
import pytest

from minigpt_jax import data
from minigpt_jax.config import PAD_TOKEN_ID


def test_chunking_lengths_and_pads():
    lengths = [0, 1, 63, 64, 65, 150]
    seqs = [np.arange(1, n + 1) for n in lengths]
    chunks = data.chunk_sequences(seqs, 64)
    # 0 -> none, 1 -> 1, 63 -> 1, 64 -> 1, 65 -> 2, 150 -> 3
    assert chunks.shape == (8, 64) and chunks.dtype == np.int32
    assert (chunks == PAD_TOKEN_ID).sum(1).tolist() == [63, 1, 0, 0, 63, 0, 0, 42]
    np.testing.assert_array_equal(chunks[3], np.arange(1, 65))
    assert chunks[4, 0] == 65
    np.testing.assert_array_equal(chunks[5], np.arange(1, 65))
    np.testing.assert_array_equal(chunks[6], np.arange(65, 129))
    np.testing.assert_array_equal(chunks[7, :22], np.arange(129, 151))


def _chunks(n, L=32):
    return np.arange(n * L, dtype=np.int32).reshape(n, L)


def test_batches_cover_each_epoch_once_and_pad_the_last():
    chunks = _chunks(10)
    ds = data.batch_dataset(chunks, batch_size=4, seed=3, num_epochs=2)
    batches = list(data.batch_iterator(ds, 0, 0))
    assert len(batches) == 6 == len(ds)
    assert all(b.shape == (4, 32) for b in batches)
    for epoch in (batches[:3], batches[3:]):
        firsts = np.concatenate([b[:, 0] for b in epoch])
        assert sorted(firsts[firsts != PAD_TOKEN_ID].tolist()) == chunks[:, 0].tolist()
        assert (epoch[-1][2:] == PAD_TOKEN_ID).all()  # two all-PAD rows fill the last batch
    order = lambda e: np.concatenate([b[:, 0] for b in e]).tolist()
    assert order(batches[:3]) != order(batches[3:]), "the shuffle must change between epochs"


def test_shuffle_is_seeded_and_resumable():
    chunks = _chunks(13)
    a = list(data.batch_iterator(data.batch_dataset(chunks, 4, 5, 3), 0, 0))
    b = list(data.batch_iterator(data.batch_dataset(chunks, 4, 5, 3), 0, 0))
    c = list(data.batch_iterator(data.batch_dataset(chunks, 4, 6, 3), 0, 0))
    tail = list(data.batch_iterator(data.batch_dataset(chunks, 4, 5, 3), 5, 0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(np.array_equal(x, y) for x, y in zip(a[5:], tail)) and len(tail) == len(a) - 5


def test_split_is_seeded_and_disjoint():
    chunks = _chunks(100, 4)
    tr, va = data.split_chunks(chunks, 0.05, seed=1)
    assert len(va) == 5 and len(tr) == 95
    assert not set(tr[:, 0]) & set(va[:, 0])
    tr2, va2 = data.split_chunks(chunks, 0.05, seed=1)
    np.testing.assert_array_equal(va, va2)
    _, one = data.split_chunks(chunks[:1], 0.5, seed=1)
    assert len(one) == 0  # never hold out the only chunk


def test_eval_batches_pad_last():
    b = data.eval_batches(_chunks(5), 4)
    assert len(b) == 2 and b[1].shape == (4, 32) and (b[1][1:] == PAD_TOKEN_ID).all()


@pytest.mark.parametrize("seqs, message", [
    ([], "no sequences found"),
    ([np.array([1, 2]), np.zeros((2, 2), int)], "sequence 1 has shape (2, 2); expected a 1-D"),
    ([np.array([1.0, 2.0])], "dtype float64; expected integer"),
    ([np.array([1, -3])], "sequence 0 has token id -3 at position 1; expected ids in [0, 50257)"),
    ([np.array([1, 2]), np.array([50257])], "sequence 1 has token id 50257"),
    ([np.array([1]), np.array([], int)], "every sequence is shorter than 2 tokens"),
])
def test_bad_sequences_are_named(seqs, message):
    with pytest.raises(data.DataError) as e:
        data.check_sequences(seqs, "x.pt")
    assert str(e.value).startswith("x.pt: ") and message in str(e.value)
