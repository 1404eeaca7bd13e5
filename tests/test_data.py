import re

import numpy as np
import pytest

from minigpt_jax import data
from minigpt_jax.config import PAD_TOKEN_ID, SEQ_MAX, SEQ_MIN, Config

LENGTHS = [0, 1, 10, 31, 32, 33, 63, 64, 65, 127, 128, 129, 159, 160, 161, 200, 512, 1000]


def rule(seq: list, seq_len: int, rows: bool) -> list[list]:
    """docs/spec.md's segmentation, transcribed from the PyTorch project's loop, one sequence at a time."""
    L = len(seq)
    if not rows and SEQ_MIN <= L <= SEQ_MAX:
        kept = [seq]
    elif rows or L > SEQ_MAX:
        kept = []
        start = 0
        while start <= L - SEQ_MIN:
            segment = seq[start : start + seq_len]
            if len(segment) >= SEQ_MIN:
                kept.append(segment)
            start += seq_len
    else:
        kept = []
    return [k[:seq_len] + [PAD_TOKEN_ID] * (seq_len - len(k[:seq_len])) for k in kept]


def numbered(lengths, first=1):
    """Sequences of distinct ids, so every segment says where it came from."""
    out, nxt = [], first
    for n in lengths:
        out.append(np.arange(nxt, nxt + n))
        nxt += n
    return out


def labels(rows) -> int:
    return sum(sum(t != PAD_TOKEN_ID for t in r[1:]) for r in rows)


@pytest.mark.parametrize("seq_len", [32, 64, 128])
def test_pytorch_rule_on_tokenized_sequences(seq_len):
    seqs = numbered(LENGTHS)
    expected = [r for s in seqs for r in rule(s.tolist(), seq_len, rows=False)]
    p = data.prepare(data.from_arrays(seqs, "t.pt"), Config(seq_len=seq_len, val_fraction=0.0))
    assert p.train.dtype == np.int32 and p.train.shape == (len(expected), seq_len)
    np.testing.assert_array_equal(p.train, np.array(expected))
    assert p.label_tokens == labels(expected) and len(p.val) == 0
    assert p.sequences == len(LENGTHS) and p.dropped_sequences == 4  # 0, 1, 10, 31
    assert p.tokens == sum(LENGTHS)
    assert p.pad_share == pytest.approx(np.mean(np.array(expected) == PAD_TOKEN_ID))
    if seq_len == 64:  # counted by hand; 129, 159 and 200 leave tails of 1, 31 and 8 tokens
        assert len(expected) == 44 and p.dropped_tails == 3


def test_sample_dataset_rows_give_8_segments_each_pad_tails_included(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_compat.data import read_sequences

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        ids = np.full((16, 512), PAD_TOKEN_ID, np.int64)
        for r, n in enumerate(rng.integers(20, 513, 16)):
            ids[r, :n] = rng.integers(0, PAD_TOKEN_ID, n)
        batches.append({"input_ids": torch.tensor(ids)})
    torch.save(batches, tmp_path / "sample_dataset.pt")
    s = read_sequences(tmp_path)
    assert s.kind == "rows" and len(s) == 32 and s.source == str(tmp_path / "sample_dataset.pt")
    p = data.prepare(s, Config(seq_len=64, val_fraction=0.0))
    rows = [r for b in batches for r in b["input_ids"].tolist()]
    expected = [seg for r in rows for seg in rule(r, 64, rows=True)]
    assert len(p.train) == 8 * 32 == len(expected)
    np.testing.assert_array_equal(p.train, np.array(expected))
    assert (p.train == PAD_TOKEN_ID).all(1).any(), "all-PAD tail segments are kept for rows"
    assert p.label_tokens == labels(expected)


def test_chunks_rule_keeps_every_token():
    seqs = numbered([0, 1, 63, 64, 65, 150])
    chunks = data.chunk_sequences(seqs, 64)
    assert chunks.shape == (8, 64) and chunks.dtype == np.int32
    assert (chunks == PAD_TOKEN_ID).sum(1).tolist() == [63, 1, 0, 0, 63, 0, 0, 42]
    np.testing.assert_array_equal(chunks[1, :63], seqs[2])
    np.testing.assert_array_equal(chunks[7, :22], seqs[5][128:])
    p = data.prepare(
        data.from_arrays(seqs, "t"), Config(seq_len=64, segmentation="chunks", val_fraction=0.0)
    )
    np.testing.assert_array_equal(p.train, chunks)
    assert p.dropped_sequences == 1 and p.dropped_tails == 0 and p.dropped_tokens == 0


def test_split_is_by_whole_sequence_seeded_and_leaves_training():
    seqs = [np.full(n, i) for i, n in enumerate(np.random.default_rng(0).integers(32, 600, 200))]
    s = data.from_arrays(seqs, "t")
    c = Config(val_fraction=0.1, data_seed=1)
    p = data.prepare(s, c)
    train_ids, val_ids = set(p.train[:, 0].tolist()), set(p.val[:, 0].tolist())
    assert not train_ids & val_ids and len(val_ids) == p.held_out == 20
    assert len(train_ids) + len(val_ids) == 200
    assert set(data.prepare(s, c.replace(seed=2, seq_len=32)).val[:, 0].tolist()) == val_ids
    assert set(data.prepare(s, c.replace(data_seed=2)).val[:, 0].tolist()) != val_ids
    # sequences that give no segment take no part; one that does always stays for training
    two = data.from_arrays([np.arange(5), np.arange(40)], "t")
    p = data.prepare(two, Config(val_fraction=0.5))
    assert p.held_out == 0 and len(p.train) == 1 and len(p.val) == 0


def test_prepare_is_memoised_by_key():
    s = data.from_arrays(numbered([100, 300]), "t")
    a = data.prepare(s, Config())
    assert data.prepare(s, Config(lr=1e-3, batch_size=16, n_layers=1)) is a  # not in the key
    assert data.prepare(s, Config(seq_len=32)) is not a


def test_nothing_left_is_one_line():
    s = data.from_arrays([np.arange(31), np.arange(5)], "short.pt")
    with pytest.raises(data.DataError) as e:
        data.prepare(s, Config())
    assert str(e.value).startswith(
        "short.pt: no sequence gives a segment (the longest has 31 tokens)"
    )
    assert "expected at least one of 32 or more tokens" in str(e.value) and "\n" not in str(e.value)


def test_bad_id_in_a_pt_names_file_sequence_position_value(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_compat.data import read_sequences

    f = tmp_path / "tokenized_data.pt"
    torch.save([torch.arange(40), torch.arange(40), torch.tensor([1, 2, 3, 70000])], f)
    with pytest.raises(
        data.DataError, match=rf"^{re.escape(str(f))}: sequence 2 has token id 70000 at position 3;"
    ):
        read_sequences(f)


def test_pt_read_in_groups_is_the_same_flat_data(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from torch_compat import data as pt_data

    monkeypatch.setattr(pt_data, "_GROUP", 50)  # many torch.cat groups, one tensor longer than one
    seqs = numbered([7, 30, 120, 0, 45, 3, 60, 33, 2, 90])
    f = tmp_path / "t.pt"
    torch.save(
        [torch.tensor(s, dtype=torch.int32 if i % 2 else torch.int64) for i, s in enumerate(seqs)],
        f,
    )
    s = pt_data.read_sequences(f)
    np.testing.assert_array_equal(s.tokens, np.concatenate(seqs))
    assert np.diff(s.offsets).tolist() == [len(x) for x in seqs] and s.kind == "tokenized"
    seqs[7][20] = -4
    torch.save([torch.tensor(x) for x in seqs], f)
    with pytest.raises(data.DataError, match=r"sequence 7 has token id -4 at position 20;"):
        pt_data.read_sequences(f)


# --- batches -----------------------------------------------------------------------------


def _chunks(n, L=32):
    return np.arange(n * L, dtype=np.int32).reshape(n, L)


def firsts(batches):
    return [int(x) for b in batches for x in b[:, 0]]


def test_batches_cover_each_epoch_once_and_pad_the_last():
    chunks = _chunks(10)
    ds = data.batch_dataset(chunks, batch_size=4, seed=3, num_epochs=2)
    batches = list(data.batch_iterator(ds, 0, 0))
    assert len(batches) == 6 == len(ds)
    assert all(b.shape == (4, 32) and b.dtype == np.int32 for b in batches)
    for epoch in (batches[:3], batches[3:]):
        got = [f for f in firsts(epoch) if f != PAD_TOKEN_ID]
        assert sorted(got) == chunks[:, 0].tolist()
        assert (epoch[-1][2:] == PAD_TOKEN_ID).all()  # two all-PAD rows fill the last batch
        for b in epoch:  # whole rows, not mixed ones
            real = b[b[:, 0] != PAD_TOKEN_ID]
            np.testing.assert_array_equal(real, chunks[real[:, 0] // 32])
    assert firsts(batches[:3]) != firsts(batches[3:]), "the order must change between epochs"


def test_shuffle_is_seeded_and_resumable_from_any_batch():
    chunks = _chunks(13)
    a = list(data.batch_iterator(data.batch_dataset(chunks, 4, 5, 3), 0, 0))
    b = list(data.batch_iterator(data.batch_dataset(chunks, 4, 5, 3), 0, 0))
    c = list(data.batch_iterator(data.batch_dataset(chunks, 4, 6, 3), 0, 0))
    assert firsts(a) == firsts(b) and firsts(a) != firsts(c)
    for start in range(len(a) + 1):
        tail = list(data.batch_iterator(data.batch_dataset(chunks, 4, 5, 3), start, 0))
        assert len(tail) == len(a) - start and firsts(tail) == firsts(a[start:])


def test_one_worker_process_gives_the_same_batches():
    chunks = _chunks(21)
    ds = data.batch_dataset(chunks, 4, 7, 2)
    inline = list(data.batch_iterator(ds, 3, 0))
    worker = list(data.batch_iterator(ds, 3, 1))
    assert len(worker) == len(inline) == len(ds) - 3
    assert all(np.array_equal(x, y) for x, y in zip(inline, worker))


def test_eval_sample_is_fixed_seeded_and_padded():
    val = _chunks(50)
    s = data.eval_sample(val, 3, 8, seed=1)
    assert len(s) == 3 and all(b.shape == (8, 32) for b in s)
    assert len(set(firsts(s))) == 24 and set(firsts(s)) <= set(val[:, 0].tolist())
    assert firsts(s) == firsts(data.eval_sample(val, 3, 8, seed=1))
    assert firsts(s) != firsts(data.eval_sample(val, 3, 8, seed=2))
    everything = data.eval_sample(val, 10, 8, seed=1)  # more than there is: all of it
    assert len(everything) == 7 and (everything[-1][2:] == PAD_TOKEN_ID).all()


def test_eval_batches_are_all_in_order_pad_last():
    b = data.eval_batches(_chunks(5), 4)
    assert len(b) == 2 and b[1].shape == (4, 32) and (b[1][1:] == PAD_TOKEN_ID).all()
    assert firsts(b)[:5] == _chunks(5)[:, 0].tolist()


@pytest.mark.parametrize(
    "seqs, message",
    [
        ([], "no sequences found"),
        ([np.array([1, 2]), np.zeros((2, 2), int)], "sequence 1 has shape (2, 2); expected a 1-D"),
        ([np.array([1, 2]), np.array([50257])], "sequence 1 has token id 50257"),
        ([np.array([1]), np.array([], int)], "every sequence is shorter than 2 tokens"),
    ],
)
def test_sequences_from_a_list_are_checked(seqs, message):
    with pytest.raises(data.DataError) as e:
        data.from_arrays(seqs, "x.pt", "tokenized")
    assert str(e.value).startswith("x.pt: ") and message in str(e.value)


