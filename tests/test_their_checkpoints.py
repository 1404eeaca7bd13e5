"""State dicts saved by the PyTorch project's own code work wherever a checkpoint is taken.

Their runs end in `torch.save(model.state_dict(), "outcome/mini_gpt_<name>.pt")`;
torch_compat.reference is their model.py (same classes, names, constructor), so a
file it saves is such a file. Each accepted wrapping (DataParallel's `module.`,
torch.compile's `_orig_mod.`, {"model": sd}, {"state_dict": sd}) goes the same way.
"""


import numpy as np
import pytest
from conftest import TINY, load_script, run_script

torch = pytest.importorskip("torch")

import torch_compat  # noqa: E402
from minigpt_jax import checkpoint, tokenizer  # noqa: E402
from minigpt_jax.config import PAD_TOKEN_ID  # noqa: E402
from torch_compat import reference as ref  # noqa: E402

# their constructor; tiny so that a resumed run takes seconds
THEIRS = dict(vocab_size=50257, seq_len=32, embed_dim=32, n_heads=2, n_layers=2)


def wrappings(sd):
    yield "plain", sd
    yield "module.", {f"module.{k}": v for k, v in sd.items()}
    yield "_orig_mod.", {f"_orig_mod.{k}": v for k, v in sd.items()}
    yield "model", {"model": sd, "optimizer": {}, "epoch": 1}
    yield "state_dict", {"state_dict": sd}


@pytest.fixture(scope="module")
def their_files(tmp_path_factory):
    torch.manual_seed(0)
    model = ref.MiniGPT(**THEIRS)
    root = tmp_path_factory.mktemp("theirs")
    files = {}
    for name, obj in wrappings(model.state_dict()):
        files[name] = root / f"mini_gpt_{name.strip('._')}.pt"
        torch.save(obj, files[name])
    return model.eval(), files


@pytest.fixture(scope="module")
def generate_script():
    return load_script("generate")


def test_each_wrapping_loads_with_the_config_from_its_shapes(their_files):
    model, files = their_files
    want = model.state_dict()
    for name, path in files.items():
        params, config = torch_compat.load_params(path, n_heads=2)
        assert ((config.seq_len, config.embed_dim, config.n_layers, config.ffn_mult)
                == (32, 32, 2, 4)), name
        back = torch_compat.to_state_dict(params)
        assert list(back) == list(want) and all(torch.equal(back[k], want[k]) for k in want), name


def test_generate_script_continues_from_their_file_as_their_model_would(their_files,
                                                                        generate_script, capsys):
    model, files = their_files
    prompt = "The meaning of"
    ids = tokenizer.encode(prompt)
    with torch.no_grad():  # greedy decoding with their model under the causal mask
        context = list(ids)
        for _ in range(6):
            logits = ref.causal_logits(model, torch.tensor([context[-32:]]))[0, -1]
            logits[PAD_TOKEN_ID] = -float("inf")  # generate.py never samples PAD
            context.append(int(logits.argmax()))
    want = tokenizer.decode(context)
    for name, path in files.items():
        code = generate_script.main(["--checkpoint", str(path), "--prompt", prompt,
                                     "--max-new-tokens", "6", "--temperature", "0",
                                     "--n-heads", "2"])
        out, err = capsys.readouterr()
        assert (code, out, err) == (0, want + "\n", ""), name


@pytest.mark.slow
def test_import_then_resume_trains_on_from_their_weights(their_files, tmp_path):
    model, files = their_files
    rng = np.random.default_rng(0)
    torch.save([torch.tensor(rng.integers(0, 50000, n)) for n in rng.integers(40, 150, 60)],
               tmp_path / "tokenized_data.pt")
    ckpt = tmp_path / "out" / "checkpoints" / "baseline"
    sets = [a for a in TINY if a != "--set"
            and a.split("=")[0] not in ("embed_dim", "n_heads", "seq_len")]
    r = run_script("import_state_dict.py", files["module."], ckpt, "--n-heads", "2",
                   *[x for s in sets for x in ("--set", s)], devices=1, timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_script("run.py", "--only", "baseline", "--resume", "--max-steps", "2",
                   "--data", tmp_path, "--out", tmp_path / "out", *TINY, devices=1, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at step 0 from {ckpt / '0'}" in r.stderr
    params, _, step = checkpoint.load_params(ckpt)
    assert step == 2
    start = model.state_dict()
    trained = torch_compat.to_state_dict(params)
    moved = [k for k in start if not torch.equal(trained[k], start[k])]
    assert len(moved) == len(start)  # every tensor trained on ...
    near = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert near < 0.01  # ... from their weights (2 AdamW steps of lr 5e-4 move each by ~1e-3)
