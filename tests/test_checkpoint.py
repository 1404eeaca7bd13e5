"""checkpoint.read_saved and scripts/inspect_checkpoint.py against the layout checkpoint.save
writes: an item renamed, added or dropped on one side fails here, not silently."""

import dataclasses
import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from minigpt_jax import checkpoint
from minigpt_jax.config import Config
from minigpt_jax.train import create_state

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "inspect_checkpoint.py"
STEP = 7


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny experiment folder saved at STEP, with its state, config and progress record."""
    c = Config(embed_dim=16, n_heads=2, n_layers=1, seq_len=32)
    state = create_state(c).replace(step=STEP)
    progress = checkpoint.progress_record(STEP, next_batch=3, tokens=96, seconds=1.5, data="f00d")
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoints" / "tiny"
    checkpoint.save(checkpoint.manager(folder), state, c, progress)
    return folder, state, c, progress


def test_read_saved_reads_every_item_the_layout_writes(saved):
    folder, state, c, progress = saved
    got = checkpoint.read_saved(folder)
    items = {p.name for p in got.path.iterdir() if p.is_dir()}
    fields = {f.name for f in dataclasses.fields(checkpoint.Saved)} - {"path", "steps"}
    assert items == fields, "checkpoint.save writes items that read_saved does not read (or back)"
    assert got.path == folder.absolute() / str(STEP) and got.steps == [STEP]
    assert got.config == c.to_dict() and got.progress == progress
    assert int(got.state["step"]) == STEP
    want = flatten_dict(jax.device_get(state.params))
    have = flatten_dict(got.state["params"])
    assert list(have) == list(want)
    assert all(np.array_equal(have[k], want[k]) for k in want)
    assert len(jax.tree_util.tree_leaves(got.state["opt_state"])) == len(
        jax.tree_util.tree_leaves(state.opt_state))
    assert checkpoint.read_saved(got.path).path == got.path  # a step folder reads the same


def _inspect(argv, capsys):
    spec = importlib.util.spec_from_file_location("inspect_checkpoint_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspection_shows_what_the_checkpoint_holds(saved, capsys):
    folder, state, c, progress = saved
    code, out, err = _inspect([folder], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert f"step        {STEP}   (saved steps: {STEP})" in lines
    assert "config      " + json.dumps(c.to_dict(), sort_keys=True) in lines
    assert "progress    " + json.dumps(progress, sort_keys=True) in lines
    params = flatten_dict(jax.device_get(state.params), sep=".")
    table = lines[lines.index(next(x for x in lines if x.startswith("parameter "))) + 1:]
    table = table[:next(i for i, x in enumerate(table) if x.startswith("total "))]
    assert [x.split()[0] for x in table] == sorted(params)
    for row in table:
        x = params[row.split()[0]]
        assert f"{x.shape} " in row and f"{x.size:,}" in row, row
    total = sum(x.size for x in params.values())
    assert any(line.startswith("total") and f"{len(params)} tensors" in line
               and f"{total:,}" in line
               for line in lines)
    assert f"second moment (nu): {total:,} numbers" in out
    assert f"first moment (mu): {total:,} numbers" in out


def test_an_unreadable_or_missing_checkpoint_is_one_line_and_exit_2(saved, tmp_path, capsys):
    folder = saved[0]
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    shutil.rmtree(damaged / str(STEP) / "progress")  # an item the layout has is missing
    cases = [(tmp_path / "nothing", "no such checkpoint folder"),
             (tmp_path, "no checkpoint found"),
             (damaged, "not a readable minigpt_jax checkpoint")]
    for path, message in cases:
        code, out, err = _inspect([path], capsys)
        assert code == 2 and out == "", (path, out)
        assert err.count("\n") == 1 and err.startswith("inspect_checkpoint.py: error: ")
        assert message in err, err
