"""Writing results: per-step metrics CSVs (plots and tables join here later).

Every file is written to a temporary name in the same folder and renamed, so a
reader (or a crash) never sees a half-written file.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
import tempfile

METRIC_FIELDS = ("step", "tokens", "loss", "perplexity", "seconds")


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(rows: list[dict], fields: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: pathlib.Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    atomic_write_bytes(path, csv_text(rows, fields).encode())


def write_metrics(out_dir: pathlib.Path, name: str, rows: list[dict]) -> pathlib.Path:
    path = pathlib.Path(out_dir) / f"metrics_{name}.csv"
    write_csv(path, rows, METRIC_FIELDS)
    return path
