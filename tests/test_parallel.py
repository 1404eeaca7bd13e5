"""Data parallelism: one device vs a 4-device mesh vs two processes of two devices.

Tolerance: per-step losses agree to 1e-5 relative. The sharded step sums the
same numbers in another order (per-device partial sums, then an all-reduce),
so float32 results differ in the last bits (about 3e-7 relative seen here),
and the difference stays far below 1e-5 over the few steps compared.
"""

import csv
import socket

import jax
import numpy as np
import pytest
from conftest import start_script, tiny_args

from minigpt_jax import data, loop
from minigpt_jax.config import Config
from minigpt_jax.options import RunOptions

RTOL = 1e-5
TINY = tiny_args(batch_size=8)


@pytest.fixture(scope="module")
def chunks():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 50000, n) for n in rng.integers(40, 200, 60)]
    return data.prepare(data.from_arrays(seqs, "test"), Config(seq_len=32, val_fraction=0.1, seed=0))


def losses(rows):
    return np.array([r["loss"] for r in rows])


def test_mesh_of_four_equals_one_device(tmp_path, chunks, monkeypatch):
    c = Config(embed_dim=32, n_heads=2, seq_len=32, batch_size=8, dropout=0.0)
    devs = jax.devices()[:4]
    one = loop.run_experiment(loop.Experiment("one", c, devs[:1]), chunks, RunOptions(out=tmp_path / "a", max_steps=5))
    four = loop.run_experiment(loop.Experiment("four", c, devs), chunks, RunOptions(out=tmp_path / "b", max_steps=5))
    assert one.status == four.status == "ok"
    assert four.state_devices == set(devs) and four.device == "cpu:0-3"
    np.testing.assert_allclose(losses(four.rows), losses(one.rows), rtol=RTOL)
    assert [r["tokens"] for r in four.rows] == [r["tokens"] for r in one.rows]
    np.testing.assert_allclose(four.val_rows[-1]["val_loss"], one.val_rows[-1]["val_loss"], rtol=RTOL)
    # parameters are replicated: every device holds the whole tensor
    kernel = four.state.params["head"]["kernel"]
    assert kernel.sharding.is_fully_replicated


def test_batch_not_divisible_is_an_error():
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 data-parallel devices"):
        loop.Experiment("x", Config(batch_size=6), jax.devices()[:4])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out):
    return [(int(r["step"]), int(r["tokens"]), float(r["loss"]))
            for r in csv.DictReader(open(out / "metrics_baseline.csv"))]


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    common = ["--experiments", "baseline", "--max-steps", 4, "--data-parallel", *TINY,
              "--set", "ckpt_every=2"]
    single = start_script("run.py", *common, "--out", tmp_path / "single", devices=4)
    out_single = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out_single[-2000:]
    port = free_port()
    procs = [start_script("run.py", *common, "--out", tmp_path / "multi",
                          "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                          "--process-id", i, devices=2) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "multi")
    assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) == 4
    np.testing.assert_allclose([r[2] for r in b], [r[2] for r in a], rtol=RTOL)
    # process 0 wrote the outputs; the checkpoints were written together
    assert (tmp_path / "multi" / "results_table.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "baseline").iterdir()) == ["2", "4"]
    rows = list(csv.DictReader(open(tmp_path / "multi" / "results_table.csv")))
    assert rows[0]["status"] == "ok"
    assert len(rows[0]["device"].split(":")[1].split(",")) == 4  # e.g. cpu:0,1,2048,2049: ids are per process
