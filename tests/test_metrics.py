import json
import math
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from minigpt_jax import metrics


def read_events(logdir) -> list[Event]:
    """Events of every file in logdir, in file order (TFRecord: length, crc, data, crc)."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            events.append(Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)], honouring purge events as TensorBoard does."""
    out: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e.HasField("session_log") and e.session_log.status == e.session_log.START:
            out = {t: [(s, v) for s, v in pts if s < e.step] for t, pts in out.items()}
        for v in e.summary.value:
            out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


FIELDS = {"loss": "train/loss", "perplexity": "train/perplexity", "tokens": "train/tokens"}


def train_row(step):
    loss = 10.0 / (step + 1)
    return {"train/loss": np.float32(loss), "train/perplexity": math.exp(loss),
            "train/tokens": jnp.int32(100 * step)}


def test_csv_appends_rows_under_one_header(tmp_path):
    with metrics.CsvWriter(tmp_path, "run", FIELDS) as w:
        for step in (1, 2, 3):
            w.write_scalars(step, train_row(step))
        w.write_scalars(3, {"val/loss": 1.0})  # none of its fields: no row
    lines = (tmp_path / "metrics_run.csv").read_text().splitlines()
    assert lines[0] == "step,loss,perplexity,tokens"
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]
    step, loss, ppl, tokens = lines[2].split(",")
    assert (float(loss), float(ppl), tokens) == (float(np.float32(10 / 3)), math.exp(10 / 3), "200")


@pytest.mark.parametrize("tail_bytes", [metrics.TAIL_BYTES, 40])  # 40: the tail cuts a row
def test_csv_resume_cuts_back_to_the_checkpoint_step(tmp_path, monkeypatch, tail_bytes):
    monkeypatch.setattr(metrics, "TAIL_BYTES", tail_bytes)
    path = tmp_path / "metrics_run.csv"
    with metrics.CsvWriter(tmp_path, "run", FIELDS) as w:
        for step in range(1, 11):
            w.write_scalars(step, train_row(step))
    with open(path, "a") as f:
        f.write("11,0.5,1.")  # a row torn by a crash
    with metrics.CsvWriter(tmp_path, "run", FIELDS, resume_step=6) as w:
        for step in range(7, 9):
            w.write_scalars(step, train_row(step))
    lines = path.read_text().splitlines()
    assert lines[0] == "step,loss,perplexity,tokens"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 9))


def test_csv_resume_rewrites_only_when_needed(tmp_path, monkeypatch):
    with metrics.CsvWriter(tmp_path, "run", FIELDS) as w:
        for step in range(1, 6):
            w.write_scalars(step, train_row(step))
    monkeypatch.setattr(metrics.os, "replace", lambda *a: pytest.fail("rewrote a clean log"))
    with metrics.CsvWriter(tmp_path, "run", FIELDS, resume_step=5) as w:
        w.write_scalars(6, train_row(6))
    lines = (tmp_path / "metrics_run.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4, 5, 6]


def test_csv_without_resume_starts_afresh_and_resume_checks_the_columns(tmp_path):
    with metrics.CsvWriter(tmp_path, "run", FIELDS) as w:
        w.write_scalars(1, train_row(1))
    with metrics.CsvWriter(tmp_path, "run", ["train/loss"]) as w:
        w.write_scalars(1, train_row(1))
    assert (tmp_path / "metrics_run.csv").read_text().splitlines()[0] == "step,train/loss"
    with pytest.raises(ValueError, match=r"metrics_run.csv: header 'step,train/loss' differs"):
        metrics.CsvWriter(tmp_path, "run", FIELDS, resume_step=1)


def test_jsonl_holds_one_object_per_write_and_cuts_back(tmp_path):
    with metrics.JsonlWriter(tmp_path, "run") as w:
        for step in (1, 2, 3):
            w.write_scalars(step, train_row(step))
        w.write_scalars(3, {"val/loss": 2.5})
    with metrics.JsonlWriter(tmp_path, "run", resume_step=2) as w:
        w.write_scalars(3, {"val/loss": 2.25})
    rows = [json.loads(x) for x in (tmp_path / "metrics_run.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1] == {"step": 2, "train/loss": float(np.float32(10 / 3)),
                       "train/perplexity": math.exp(10 / 3), "train/tokens": 200}
    assert isinstance(rows[1]["train/tokens"], int)
    assert rows[2] == {"step": 3, "val/loss": 2.25}


def test_tensorboard_event_files_hold_the_scalars_at_their_steps(tmp_path):
    w = metrics.TensorBoardWriter(tmp_path, "run")
    for step in range(1, 6):
        w.write_scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-3})
    w.write_scalars(5, {"val/loss": 0.75, "val/perplexity": math.exp(0.75)})
    w.close()
    logdir = tmp_path / "tensorboard" / "run"
    got = scalars(read_events(logdir))
    assert got["train/loss"] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert got["train/lr"] == [(s, pytest.approx(1e-3)) for s in range(1, 6)]
    assert got["val/loss"] == [(5, 0.75)]
    assert got["val/perplexity"] == [(5, pytest.approx(math.exp(0.75)))]


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    with metrics.TensorBoardWriter(tmp_path, "run") as w:
        for step in range(1, 7):
            w.write_scalars(step, {"train/loss": float(step)})
    with metrics.TensorBoardWriter(tmp_path, "run", resume_step=3) as w:
        for step in range(4, 6):
            w.write_scalars(step, {"train/loss": 10.0 * step})
    got = scalars(read_events(tmp_path / "tensorboard" / "run"))
    assert got["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_multiwriter_fans_out_and_closes_all(tmp_path):
    csv_w = metrics.CsvWriter(tmp_path, "run", FIELDS)
    jsonl_w = metrics.JsonlWriter(tmp_path, "run")
    with metrics.MultiWriter([csv_w, jsonl_w]) as w:
        w.write_scalars(1, train_row(1))
        w.flush()
        assert (tmp_path / "metrics_run.jsonl").read_text().count("\n") == 1
    assert csv_w._file.closed and jsonl_w._file.closed
    assert len((tmp_path / "metrics_run.csv").read_text().splitlines()) == 2


def test_wandb_writer_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match="WandbWriter needs the wandb package"):
        metrics.WandbWriter(project="p")


def test_wandb_writer_logs_by_step(monkeypatch):
    logged = []

    class Run:
        def log(self, row, step):
            logged.append((step, row))

        def finish(self):
            logged.append("finished")

    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with metrics.WandbWriter(project="p") as w:
        w.write_scalars(3, {"train/loss": np.float32(0.5)})
    assert logged == [(3, {"train/loss": 0.5}), "finished"]

