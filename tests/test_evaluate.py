"""scripts/evaluate.py: a run's own validation loss, and the reference models' numbers."""

import json
import os

import numpy as np
import pytest
from conftest import load_script

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")

from minigpt_jax import data, evaluation, trained  # noqa: E402
from minigpt_jax.config import Config  # noqa: E402

SMALL = {
    "embed_dim": 32,
    "n_heads": 2,
    "n_layers": 2,
    "seq_len": 32,
    "batch_size": 4,
    "dropout": 0.0,
}


def evaluate_main(capsys, *argv) -> dict:
    module = load_script("evaluate")
    capsys.readouterr()  # what ran before
    assert module.main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def reference_loss(logits_of, config: Config, max_batches: int) -> float:
    """The loss a PyTorch model computes on the batches evaluate.py takes (training's split)."""
    from torch_compat.reference import masked_lm_loss

    rows = trained.segments(data.default_corpus(config.vocab_size), config, "val")
    total = count = 0.0
    for batch in evaluation.final_batches(rows, max_batches, config.batch_size, config.seed):
        with torch.no_grad():
            tokens = torch.from_numpy(batch).long()
            loss, n = masked_lm_loss(logits_of(tokens), tokens)
        total, count = total + float(loss) * float(n), count + float(n)
    return total / count


@pytest.mark.slow
def test_on_a_runs_checkpoint_it_gives_that_runs_final_validation_loss(tmp_path, capsys):
    from minigpt_jax import loop, runner

    [r] = runner.run(
        ["baseline"], out=tmp_path, overrides={**SMALL, "eval_final_batches": 3}, max_steps=3
    )
    val = loop.read_rows(tmp_path, "baseline")[1][-1]
    got = evaluate_main(capsys, "--checkpoint", tmp_path / "checkpoints" / "baseline")
    assert abs(got["loss"] - val["val_loss"]) <= 1e-6
    assert (got["tokens"], got["segments"]) == (r.final_eval.tokens, r.final_eval.segments)
    assert got["split"] == "val" and got["notes"] == ["step 3"]


def test_on_the_users_pt_it_gives_the_reference_models_number(tmp_path, capsys):
    from torch_compat.reference import MiniGPT, causal_logits

    torch.manual_seed(0)
    config = Config(**SMALL)
    model = MiniGPT.from_config(config).eval()
    torch.save(model.state_dict(), tmp_path / "mini_gpt_theirs.pt")
    got = evaluate_main(
        capsys,
        "--checkpoint",
        tmp_path / "mini_gpt_theirs.pt",
        "--n-heads",
        2,
        "--max-batches",
        2,
        "--set",
        "batch_size=4",
    )
    want = reference_loss(lambda x: causal_logits(model, x), config, 2)
    assert got["loss"] == pytest.approx(want, abs=1e-5)
    assert got["tokens"] > 0 and got["stderr"] > 0


@pytest.mark.slow
def test_on_a_hugging_face_folder_it_gives_gpt2lmheadmodels_number(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(tmp_path / "hf")
    got = evaluate_main(
        capsys,
        "--checkpoint",
        tmp_path / "hf",
        "--max-batches",
        2,
        "--set",
        "seq_len=32",
        "--set",
        "batch_size=4",
    )
    config = Config(**{**SMALL, "dropout": 0.1})
    want = reference_loss(lambda x: model(x).logits, config, 2)
    assert got["loss"] == pytest.approx(want, abs=1e-5)
    assert any("first 32 rows" in n for n in got["notes"])


@pytest.mark.slow
def test_split_all_takes_every_segment_and_bad_input_is_one_line(tmp_path, capsys):
    from torch_compat.reference import MiniGPT

    torch.manual_seed(0)
    torch.save(MiniGPT.from_config(Config(**SMALL)).state_dict(), tmp_path / "m.pt")
    text = tmp_path / "notes.txt"
    text.write_text(
        "\n\n".join(
            f"Note {i}: " + "the list is returned in order, one item a line. " * 6
            for i in range(20)
        )
    )
    base = [
        "--checkpoint",
        tmp_path / "m.pt",
        "--n-heads",
        2,
        "--data",
        text,
        "--text-docs",
        "block",
        "--max-batches",
        0,
    ]
    val = evaluate_main(capsys, *base)
    every = evaluate_main(capsys, *base, "--split", "all")
    # 20 blocks of 32..128 tokens, each one segment (kept whole, truncated); 1 held out
    assert (val["segments"], every["segments"]) == (1, 20)
    module = load_script("evaluate")
    for argv, fact in [
        (["--checkpoint", tmp_path / "none"], "no such file or folder"),
        (["--checkpoint", tmp_path / "m.pt", "--set", "n_layers=3"], "--set n_layers"),
        (["--checkpoint", tmp_path / "m.pt", "--max-batches", "-1"], "--max-batches -1"),
        (["--checkpoint", tmp_path / "m.pt", "--set", "seq_len=16"], "seq_len=16"),
        (["--checkpoint", text], "not a .pt state dict"),
    ]:
        assert module.main([*map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert fact in err and err.count("\n") == 1, err
    assert np.isfinite(val["loss"])
