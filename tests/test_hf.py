"""hf.py against transformers itself: export, import, tokenizer, refusals (docs/spec.md)."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from conftest import load_script

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minigpt_jax import generate, hf, tokenizer  # noqa: E402
from minigpt_jax.config import PAD_TOKEN_ID, Config  # noqa: E402
from minigpt_jax.data import corpus  # noqa: E402
from minigpt_jax.model import MiniGPT, init_params  # noqa: E402


def leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def padded_rows(seq_len: int) -> np.ndarray:
    """Rows with a PAD suffix, PAD in the middle, and all PAD."""
    rows = np.random.default_rng(0).integers(0, PAD_TOKEN_ID, (3, seq_len))
    rows[0, seq_len // 2 :] = PAD_TOKEN_ID
    rows[1, 5:9] = PAD_TOKEN_ID
    rows[2] = PAD_TOKEN_ID
    return rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random model and its export, for each activation."""
    out = {}
    for activation in ("gelu", "gelu_tanh"):
        c = Config(
            embed_dim=32, n_heads=2, n_layers=2, seq_len=32, dropout=0.0, activation=activation
        )
        params = init_params(c, jax.random.key(1))
        folder = hf.export(params, c, tmp_path_factory.mktemp(activation) / "hf", {"name": "tiny"})
        out[activation] = (params, c, folder)
    return out


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_logits_equal_gpt2lmheadmodel_at_every_position(exported, activation, float32_matmuls):
    params, c, folder = exported[activation]
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    rows = padded_rows(c.seq_len)
    ours = np.asarray(MiniGPT(c).apply({"params": params}, rows))
    with torch.no_grad():
        theirs = model(torch.from_numpy(rows)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_greedy_generation_of_20_tokens_is_identical(exported, float32_matmuls):
    params, c, folder = exported["gelu"]
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = tokenizer.encode("Return the list of")
    ours = generate.generate(params, c, prompt, max_new_tokens=20, temperature=0.0)
    with torch.no_grad():  # the folder's generation_config suppresses PAD, as generate.py does
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    assert theirs[0, len(prompt) :].tolist() == ours.tolist()


@pytest.mark.slow  # corpus.documents() parses the standard library
def test_exported_tokenizer_encodes_the_default_corpus_to_our_ids(exported):
    _, _, folder = exported["gelu"]
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    docs = corpus.documents()
    sample = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))[:300]]
    assert not any(tokenizer.END_OF_TEXT in d for d in sample)  # the one text they split otherwise
    for text in sample:
        assert auto(text)["input_ids"] == tokenizer.encode(text), text[:60]
    assert auto.decode(tokenizer.encode(sample[0])) == sample[0]


def test_folder_is_what_from_pretrained_needs_and_nothing_is_left_beside_it(exported):
    params, c, folder = exported["gelu"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "merges.txt",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer_config.json",
            "vocab.json",
        ]
    )
    assert [p.name for p in folder.parent.iterdir()] == ["hf"]  # no temporary folder left
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (
        config.n_positions,
        config.n_inner,
        config.activation_function,
        config.tie_word_embeddings,
    ) == (32, 128, "gelu", False)
    assert "## Training data" in (folder / "README.md").read_text()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_export_then_import_is_bit_exact(exported, activation):
    params, c, folder = exported[activation]
    back, config, notes = hf.load(folder)
    assert [a.tobytes() for a in leaves(back)] == [a.tobytes() for a in leaves(params)]
    assert {k: getattr(config, k) for k in (*hf.SHAPE_FIELDS, "seq_len", "dropout")} == {
        k: getattr(c, k) for k in (*hf.SHAPE_FIELDS, "seq_len", "dropout")
    }
    assert len(notes) == (activation == "gelu_tanh")


def test_export_replaces_an_earlier_export_but_nothing_else(exported, tmp_path):
    params, c, _ = exported["gelu"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(hf.HFError, match="not an earlier export"):
        hf.export(params, c, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    hf.export(params, c, tmp_path / "again")
    hf.export(params, c, tmp_path / "again", {"name": "second"})
    assert "# second" in (tmp_path / "again" / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine"]


def gpt2_style(folder: pathlib.Path, safetensors: bool = True, **overrides):
    """A random GPT2LMHeadModel as GPT-2's own are: gelu_new, tied, 1024 positions."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, **overrides)
    model = transformers.GPT2LMHeadModel(config).eval()
    if safetensors:
        model.save_pretrained(folder)
    else:  # the older format: a pickled state dict, read with torch's weights_only
        folder.mkdir(parents=True)
        config.to_json_file(folder / "config.json")
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


@pytest.mark.parametrize("safetensors", [True, False])
def test_gpt2_style_checkpoint_imports_with_notes_and_equal_logits(
    tmp_path, safetensors, float32_matmuls
):
    import torch_compat

    model = gpt2_style(tmp_path / "gpt2", safetensors)
    params, c, notes = hf.load(tmp_path / "gpt2", seq_len=64, readers=torch_compat.readers())
    assert (c.activation, c.seq_len, c.embed_dim, c.n_heads, c.ffn_mult) == (
        "gelu_tanh",
        64,
        32,
        2,
        4,
    )
    text = " | ".join(notes)
    for fact in ("gelu_new", "copy of transformer.wte", "first 64 rows", "resid_pdrop 0.1"):
        assert fact in text
    assert np.array_equal(params["head"]["kernel"], params["embed"]["embedding"].T)
    rows = padded_rows(64)
    ours = np.asarray(MiniGPT(c).apply({"params": params}, rows))
    with torch.no_grad():
        theirs = model(torch.from_numpy(rows)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_a_pickled_checkpoint_needs_the_reader_passed_in(tmp_path):
    gpt2_style(tmp_path / "gpt2", safetensors=False)
    with pytest.raises(hf.HFError) as e:
        hf.load(tmp_path / "gpt2")
    message, file = str(e.value), tmp_path / "gpt2" / "pytorch_model.bin"
    assert message.startswith(f"{file}: ") and "\n" not in message
    assert "no reader" in message and "read_bin=torch_compat.read_numpy_state_dict" in message


REFUSED = [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx True"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn True"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
    ({"n_inner": 100}, "n_inner 100"),
    ({"scale_attn_weights": False}, "scale_attn_weights False"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"n_positions": 16}, "n_positions 16 (expected at least seq_len 32)"),
]


@pytest.mark.parametrize("change,fact", REFUSED, ids=[f for _, f in REFUSED])
def test_a_config_minigpt_cannot_compute_is_refused_in_one_line(change, fact):
    hf_config = {**hf.gpt2_config(Config(seq_len=32)), **change}
    with pytest.raises(hf.HFError) as e:
        hf.config_from_gpt2(hf_config, seq_len=32)
    assert fact in str(e.value) and "\n" not in str(e.value)


def test_import_script_refuses_in_one_line_with_exit_2(exported, tmp_path, capsys):
    _, _, folder = exported["gelu"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bad / name).write_bytes((folder / name).read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(
        json.dumps({**config, "scale_attn_by_inverse_layer_idx": True})
    )
    importer = load_script("import_hf")
    cases = [
        ([str(bad), str(tmp_path / "ck")], "scale_attn_by_inverse_layer_idx True"),
        ([str(tmp_path / "none"), str(tmp_path / "ck")], "no such folder"),
        ([str(folder), str(tmp_path / "ck"), "--set", "embed_dim=64"], "--set embed_dim"),
    ]
    for argv, fact in cases:
        assert importer.main(argv) == 2
        err = capsys.readouterr().err
        assert fact in err and err.count("\n") == 1, err
    assert not (tmp_path / "ck").exists()


def test_weights_that_do_not_match_the_config_are_refused(exported, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, folder = exported["gelu"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((folder / "config.json").read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    del weights["transformer.ln_f.bias"]
    weights["transformer.h.0.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"].T.copy()
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(
        hf.HFError, match=r"missing transformer.ln_f.bias.*c_fc.weight has shape \(128, 32\)"
    ):
        hf.load(bad)


def test_a_gelu_tanh_model_is_never_written_to_the_users_pt_contract(exported, tmp_path):
    import torch_compat

    params, c, _ = exported["gelu_tanh"]
    with pytest.raises(torch_compat.StateDictError, match="activation=gelu_tanh.*exact"):
        torch_compat.save_state_dict(params, tmp_path / "m.pt", c)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_scripts_orbax_to_hf_to_orbax_is_bit_exact(exported, tmp_path, capsys):
    from minigpt_jax import checkpoint
    from minigpt_jax.train import create_state

    params, c, _ = exported["gelu_tanh"]
    source = tmp_path / "checkpoints" / "tiny"
    checkpoint.save(
        checkpoint.manager(source), create_state(c, params), c, checkpoint.progress_record()
    )
    assert load_script("export_hf").main([str(source), str(tmp_path / "hf")]) == 0
    assert load_script("import_hf").main([str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "adapted: activation_function gelu_new" in capsys.readouterr().out
    back, config, step = checkpoint.load_params(tmp_path / "back")
    assert step == 0 and config.activation == "gelu_tanh"
    assert [a.tobytes() for a in leaves(back)] == [a.tobytes() for a in leaves(params)]


# --- run.py --export hf and --init-from ----------------------------------------------------

RUN = {"embed_dim": 32, "n_heads": 2, "n_layers": 2, "seq_len": 32, "batch_size": 4,
       "dropout": 0.0, "eval_every": 100, "eval_final_batches": 2}


@pytest.fixture(scope="module")
def run_export(tmp_path_factory):
    """A 2-step run with export_hf: its Result and its out folder."""
    from minigpt_jax import runner

    out = tmp_path_factory.mktemp("run")
    [r] = runner.run(["baseline"], out=out, overrides={**RUN, "seed": 7}, max_steps=2,
                     export_hf=True, command="scripts/run.py --export hf")
    return r, out


@pytest.mark.slow
def test_run_export_hf_writes_a_folder_gpt2lmheadmodel_computes(run_export, float32_matmuls):
    r, out = run_export
    folder = out / "hf" / "baseline"
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    rows = padded_rows(r.config.seq_len)
    ours = np.asarray(MiniGPT(r.config).apply({"params": jax.device_get(r.state.params)}, rows))
    with torch.no_grad():
        theirs = model(torch.from_numpy(rows)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    card = (folder / "README.md").read_text()
    assert f"{r.rows[-1]['loss']:.4f}" in card and "scripts/run.py --export hf" in card


@pytest.mark.slow
def test_run_init_from_starts_every_experiment_from_the_folders_weights(run_export, tmp_path):
    from minigpt_jax import runner

    r, out = run_export
    folder = out / "hf" / "baseline"
    # lr 1e-9 for one step: the weights stay the folder's to 1e-6; a fresh start (seed 0, the
    # folder's run had seed 7) would not
    shape_left_to_folder = {k: v for k, v in RUN.items()
                            if k not in ("embed_dim", "n_heads", "n_layers")}
    [r2] = runner.run(["baseline"], out=tmp_path, overrides={**shape_left_to_folder, "lr": 1e-9},
                      max_steps=1, init_from=folder)
    assert (r2.config.embed_dim, r2.config.n_heads, r2.config.n_layers) == (32, 2, 2)
    assert "init from" in r2.overrides
    start, after = leaves(jax.device_get(r.state.params)), leaves(jax.device_get(r2.state.params))
    assert len(start) == len(after)
    for a, b in zip(start, after):
        np.testing.assert_allclose(a, b, atol=1e-6)
    fresh = leaves(init_params(r2.config, jax.random.key(r2.config.seed)))
    assert max(float(np.abs(a - b).max()) for a, b in zip(start, fresh)) > 1e-2


@pytest.mark.slow
def test_init_from_refuses_an_experiment_of_another_shape_before_training(run_export, tmp_path):
    from minigpt_jax import runner

    _, out = run_export
    with pytest.raises(hf.HFError, match="experiment embed_dim_64 sets embed_dim=64, the model"
                                         " has embed_dim=32") as e:
        runner.run(["embed_dim_64"], out=tmp_path / "o", overrides={"seq_len": 32},
                   init_from=out / "hf" / "baseline")
    assert "\n" not in str(e.value) and str(e.value).startswith("--init-from")
    assert not (tmp_path / "o").exists()
    with pytest.raises(hf.HFError, match="^--init-from .*nope: no such folder"):
        runner.run(["baseline"], out=tmp_path / "o", init_from=tmp_path / "nope")


def test_a_set_of_the_models_shape_is_refused_where_the_shape_comes_from_elsewhere():
    from minigpt_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--set embed_dim: the model's shape comes from gpt2/;"
                       r" expected seq_len or training fields$"):
        hf.refuse_shape({"lr": 1e-3, "n_layers": 3, "embed_dim": 8}, "gpt2/",
                        "seq_len or training fields")
    hf.refuse_shape({"lr": 1e-3, "seq_len": 32}, "gpt2/", "seq_len or training fields")
