"""The token cache and prepared folders: hits, every staleness case, damage, unwritable
folders, concurrent builders, and training that cannot tell the cache from a fresh read."""

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_script, script_env, tiny_args

from minigpt_jax import data
from minigpt_jax.config import VOCAB_SIZE, Config
from minigpt_jax.data import DataError, token_cache
from minigpt_jax.options import RunOptions

torch = pytest.importorskip("torch")
from torch_compat.data import read_sequences  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache folder per test; files just written may be cached (RACY_S has its test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(token_cache, "RACY_S", 0.0)
    return tmp_path / "cache" / "minigpt_jax" / "tokens"


class Reader:
    """read_sequences, counting its calls: a call is a miss."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path, vocab_size):
        self.calls += 1
        return read_sequences(path, vocab_size)


def load(path, vocab_size=VOCAB_SIZE, *, read_pt=None, cache=True):
    """data.load with a .pt reader passed in the one way, as data.Readers(pt=...)."""
    return data.load(path, vocab_size, readers=data.Readers(pt=read_pt), cache=cache)


def save(path, seed=0, n=12, ids_seed=None):
    """n sequences of 20..149 ids; ids_seed other ids in the same lengths (the same file size)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 150, n)
    ids = np.random.default_rng(seed if ids_seed is None else ids_seed)
    torch.save([torch.tensor(ids.integers(0, 50000, int(k))) for k in lengths], path)
    return path


@pytest.fixture
def pt(tmp_path):
    return save(tmp_path / "tokenized_data.pt")


def entries(cache):
    return sorted(cache.glob("*.bin"))


def test_miss_writes_an_entry_and_a_hit_reads_no_pt(pt, cache):
    read = Reader()
    first = load(pt, read_pt=read)
    second = load(pt, read_pt=read)
    assert read.calls == 1 and len(entries(cache)) == 1
    direct = read_sequences(pt)
    for s in (first, second):
        assert isinstance(s.tokens, np.memmap) and s.tokens.dtype == np.uint16
        np.testing.assert_array_equal(s.tokens, direct.tokens)
        np.testing.assert_array_equal(s.offsets, direct.offsets)
        assert s.kind == direct.kind and s.source == direct.source == str(pt)
        assert s.fingerprint == direct.fingerprint
    assert load(pt.parent, read_pt=read).fingerprint == direct.fingerprint  # the folder
    assert read.calls == 1


def test_opt_out_reads_every_time_and_writes_nothing(pt, cache):
    read = Reader()
    for _ in range(2):
        s = load(pt, read_pt=read, cache=False)
    assert read.calls == 2 and not cache.exists() and s.tokens.dtype == np.int32


def test_changed_in_place_with_mtime_set_back_is_read_again(pt, cache, tmp_path):
    read = Reader()
    before = load(pt, read_pt=read)
    st = pt.stat()
    (tmp_path / "b").mkdir()  # the same name: torch.save writes it into the archive
    other = save(tmp_path / "b" / pt.name, ids_seed=5).read_bytes()
    assert len(other) == st.st_size
    with open(pt, "r+b") as f:  # same size, same inode, other ids
        f.write(other)
    os.utime(pt, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as it was; ctime cannot be
    assert pt.stat().st_size == st.st_size and pt.stat().st_ino == st.st_ino
    after = load(pt, read_pt=read)
    assert read.calls == 2 and after.fingerprint != before.fingerprint
    np.testing.assert_array_equal(after.tokens, read_sequences(pt).tokens)
    assert len(entries(cache)) == 1, "a file keeps one entry, not one per version"


def test_replaced_by_another_file_is_read_again(pt, cache, tmp_path):
    read = Reader()
    load(pt, read_pt=read)
    os.replace(save(tmp_path / "other.pt", seed=1), pt)
    s = load(pt, read_pt=read)
    assert read.calls == 2 and s.fingerprint == read_sequences(pt).fingerprint


def test_touched_is_read_again_same_fingerprint(pt, cache):
    read = Reader()
    a = load(pt, read_pt=read)
    time.sleep(0.01)
    pt.touch()
    b = load(pt, read_pt=read)
    assert read.calls == 2 and a.fingerprint == b.fingerprint and len(entries(cache)) == 1


def test_a_file_changed_just_now_is_not_cached(pt, cache, monkeypatch):
    monkeypatch.setattr(token_cache, "RACY_S", 60.0)
    read = Reader()
    load(pt, read_pt=read)
    load(pt, read_pt=read)
    assert read.calls == 2 and not entries(cache)


@pytest.mark.parametrize("damage", ["truncated", "token bit", "offset bit", "header bit", "empty"])
def test_a_damaged_entry_is_named_once_and_rebuilt(pt, cache, capsys, damage):
    read = Reader()
    good = load(pt, read_pt=read)
    (entry,) = entries(cache)
    raw = bytearray(entry.read_bytes())
    header_len = int.from_bytes(raw[len(token_cache.MAGIC) : len(token_cache.MAGIC) + 8], "little")
    offsets_at = token_cache._layout(header_len, len(good), len(good.tokens), 2)[0]
    at = {"token bit": len(raw) - 3, "offset bit": offsets_at + 9, "header bit": 40}.get(damage)
    if at is not None:
        raw[at] ^= 0x10
    elif damage == "truncated":
        raw = raw[:-2]
    else:
        raw = b""
    entry.write_bytes(bytes(raw))
    capsys.readouterr()
    again = load(pt, read_pt=read)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(entry) in err[0] and "damaged" in err[0] and str(pt) in err[0]
    assert read.calls == 2 and again.fingerprint == good.fingerprint
    load(pt, read_pt=read)
    assert read.calls == 2 and not capsys.readouterr().err, "rebuilt: the next load is a hit"


def test_an_unwritable_cache_folder_falls_back_to_reading_with_one_notice(pt, cache, capsys):
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the folder would be")  # root writes through chmod
    read = Reader()
    s = load(pt, read_pt=read)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and str(pt) in err[0]
    assert s.fingerprint == read_sequences(pt).fingerprint
    load(pt, read_pt=read)
    assert read.calls == 2


def test_an_entry_is_checked_against_a_smaller_vocabulary(tmp_path):
    pt = tmp_path / "big.pt"
    torch.save([torch.arange(40), torch.tensor([1] * 10 + [55000] + [2] * 30)], pt)
    assert len(load(pt, 60000, read_pt=read_sequences)) == 2  # built with a larger one
    with pytest.raises(DataError, match=r"sequence 1 has token id 55000 at position 10;"):
        load(pt, 50257, read_pt=Reader())


def test_ids_past_uint16_are_cached_as_int32(tmp_path):
    pt = tmp_path / "wide.pt"
    torch.save([torch.arange(70000, 70040)], pt)
    load(pt, 80000, read_pt=read_sequences)
    s = load(pt, 80000, read_pt=Reader())
    assert s.tokens.dtype == np.int32 and int(s.tokens[-1]) == 70039


def test_one_entry_serves_every_seq_len_with_the_same_segments(pt):
    read = Reader()
    fresh = read_sequences(pt)
    for seq_len in (32, 64):
        c = Config(seq_len=seq_len, val_fraction=0.2)
        a, b = data.prepare(fresh, c), data.prepare(load(pt, read_pt=read), c)
        np.testing.assert_array_equal(np.asarray(a.train), np.asarray(b.train))
        np.testing.assert_array_equal(np.asarray(a.val), np.asarray(b.val))
        assert (a.label_tokens, a.pad_share) == (b.label_tokens, b.pad_share)
    assert read.calls == 1


def test_mapped_segments_pickle_by_file_name_to_a_worker(pt):
    s = load(pt, read_pt=read_sequences)
    s = load(pt, read_pt=Reader())
    p = data.prepare(s, Config(seq_len=32, val_fraction=0.0))
    assert len(pickle.dumps(p.train)) < p.train.starts.nbytes * 2 + 1000, "tokens not copied"
    ds = data.batch_dataset(p.train, 4, 7, 2)
    inline = list(data.batch_iterator(ds, 3, 0))
    worker = list(data.batch_iterator(ds, 3, 1))
    assert len(worker) == len(inline) and all(np.array_equal(x, y) for x, y in zip(inline, worker))


def test_prepared_folder_loads_without_a_reader_and_is_verified(pt, tmp_path):
    fresh = read_sequences(pt)
    file = token_cache.write_prepared(fresh, tmp_path / "prepared")
    s = load(tmp_path / "prepared")  # no read_pt: no torch needed
    assert s.fingerprint == fresh.fingerprint and isinstance(s.tokens, np.memmap)
    assert load(file).fingerprint == fresh.fingerprint
    header = json.loads(file.read_bytes()[len(token_cache.MAGIC) + 8 :].split(b"}", 1)[0] + b"}")
    assert header["dtype"] == "uint16" and header["tokens"] == len(fresh.tokens)
    file.write_bytes(file.read_bytes()[:-1])
    with pytest.raises(DataError) as e:
        load(tmp_path / "prepared")
    assert str(e.value).startswith(f"{file}: ") and "prepare_data.py" in str(e.value)
    assert "\n" not in str(e.value)


def test_pt_data_without_a_reader_is_one_line(pt):
    with pytest.raises(DataError) as e:
        data.load(pt)
    message = str(e.value)
    assert message.startswith(f"{pt}: ") and "no reader" in message and "\n" not in message
    assert "read_pt=torch_compat.read_sequences" in message


def test_a_run_on_pt_data_without_a_reader_is_one_line_before_training(pt, tmp_path):
    from minigpt_jax import runner

    with pytest.raises(DataError) as e:
        runner.run(["baseline"], data=pt, out=tmp_path / "out", max_steps=1)
    assert str(e.value).startswith(f"{pt}: ") and "read_pt=" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_from_the_cache_equals_training_from_a_fresh_read(pt, tmp_path, tiny):
    import jax

    from minigpt_jax import loop

    fresh = read_sequences(pt)
    load(pt, read_pt=read_sequences)  # builds the entry
    cached = load(pt, read_pt=Reader())
    prepared = load(token_cache.write_prepared(fresh, tmp_path / "prep").parent)
    c = tiny.replace(eval_every=2, eval_batches=1, val_fraction=0.2)
    rows = []
    for i, s in enumerate((fresh, cached, prepared)):
        r = loop.run_experiment(loop.Experiment("baseline", c, jax.devices()[0]), data.prepare(s, c),
                                RunOptions(out=tmp_path / f"out{i}", max_steps=4))
        assert r.status == "ok", r.status
        rows.append([(x["step"], x["loss"], x["grad_norm"]) for x in r.rows]
                    + [(x["step"], x["val_loss"]) for x in r.val_rows])
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) > 4


BUILD = """
import sys, time
from minigpt_jax import data
from minigpt_jax.data import token_cache
from torch_compat.data import read_sequences
token_cache.RACY_S = 0.0
def slow(path, vocab_size):
    seqs = read_sequences(path, vocab_size)
    time.sleep(1.0)  # both processes are between reading and writing at once
    return seqs
s = data.load(sys.argv[1], readers=data.Readers(pt=slow))
print(s.fingerprint, type(s.tokens).__name__)
"""


@pytest.mark.slow
def test_two_processes_building_one_entry_both_end_with_a_good_one(pt, cache):
    env = script_env()
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(pt)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    want = read_sequences(pt).fingerprint
    assert [o.split() for o, _ in outs] == [[want, "memmap"]] * 2
    assert not [e for _, e in outs if e.strip()], "no notice: neither saw damage"
    assert len(entries(cache)) == 1 and not list(cache.glob(".*.tmp"))
    read = Reader()
    assert load(pt, read_pt=read).fingerprint == want and read.calls == 0


@pytest.mark.slow
def test_prepare_data_output_trains_to_the_same_metrics(pt, tmp_path):
    r = run_script("prepare_data.py", pt, tmp_path / "prep", timeout=600)
    assert r.returncode == 0 and "sequences.bin" in r.stderr, r.stderr
    bad = run_script("prepare_data.py", tmp_path / "missing.pt", tmp_path / "x", timeout=600)
    assert bad.returncode == 2 and "missing.pt" in bad.stderr and not (tmp_path / "x").exists()
    tiny = ["--experiments", "baseline", "--max-steps", 3, *tiny_args(eval_every=2)]
    metrics = []
    for i, d in enumerate((pt, tmp_path / "prep")):
        r = run_script("run.py", "--data", d, "--out", tmp_path / f"out{i}", *tiny, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        with open(tmp_path / f"out{i}" / "metrics_baseline.csv") as f:
            rows = [line.split(",") for line in f.read().splitlines()]
        keep = [j for j, name in enumerate(rows[0]) if name in ("step", "loss", "grad_norm")]
        metrics.append([[row[j] for j in keep] for row in rows])
    assert len(metrics[0]) == 4 and metrics[0] == metrics[1]
