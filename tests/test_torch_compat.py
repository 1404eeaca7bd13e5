"""torch_compat: .pt data readers, state-dict conversion, the reference model, lazy torch."""

import contextlib
import os
import pathlib
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, script_env

torch = pytest.importorskip("torch")

import torch_compat  # noqa: E402
from minigpt_jax.config import PAD_TOKEN_ID, VOCAB_SIZE, Config, num_params  # noqa: E402
from minigpt_jax.data import DataError, chunk_sequences  # noqa: E402
from minigpt_jax.model import init_params  # noqa: E402
from torch_compat import (  # noqa: E402
    StateDictError,
    TorchMissingError,
    from_state_dict,
    load_sequences,
    to_state_dict,
)
from torch_compat import reference as ref  # noqa: E402

SEQS = [np.arange(5, 75), np.array([7, 8, 9]), np.arange(1000, 1200), np.array([PAD_TOKEN_ID, 1, 2, 3])]


def fake_params(config: Config, seed: int = 0) -> dict:
    """A params tree of the model's exact structure with random values, without compiling an init."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


# ---------------------------------------------------------------- lazy torch


def test_importing_the_package_does_not_import_torch():
    code = "import sys, torch_compat; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env=script_env(JAX_PLATFORMS="cpu"))


def test_without_torch_each_call_says_how_to_install_it(monkeypatch, tmp_path, tiny_params):
    params = tiny_params
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if not installed
    for call in (lambda: load_sequences(tmp_path / "x.pt"), lambda: to_state_dict(params),
                 lambda: from_state_dict({}), lambda: torch_compat.save_state_dict(params, tmp_path / "m.pt")):
        with pytest.raises(TorchMissingError) as e:
            call()
        assert isinstance(e.value, ImportError)
        assert "pip install 'minigpt-jax[torch]'" in one_line(e)


# ---------------------------------------------------------------- data: good files


def save(obj, path: pathlib.Path, **kw) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, **kw)
    return path


def assert_same_chunks(got, expected_seqs, seq_len=32):
    assert all(s.dtype == np.int32 and s.ndim == 1 for s in got)
    np.testing.assert_array_equal(chunk_sequences(got, seq_len), chunk_sequences(expected_seqs, seq_len))


def test_tokenized_data_gives_the_chunks_of_the_same_sequences(tmp_path):
    f = save([torch.tensor(s) for s in SEQS], tmp_path / "tokenized_data.pt")
    seqs, source = load_sequences(f)
    assert_same_chunks(seqs, SEQS)
    assert str(f) in source and "4 sequences" in source
    assert_same_chunks(torch_compat.read_tokenized_data(f), SEQS)


def test_tokenized_data_in_legacy_format_and_other_int_dtypes(tmp_path):
    f = save([torch.tensor(s, dtype=torch.int32) for s in SEQS], tmp_path / "t.pt",
             _use_new_zipfile_serialization=False)
    assert_same_chunks(load_sequences(f)[0], SEQS)


def test_tokenized_data_as_lists_of_python_ints(tmp_path):
    f = save([s.tolist() for s in SEQS], tmp_path / "t.pt")
    assert_same_chunks(load_sequences(f)[0], SEQS)


def test_sample_dataset_dict_rows_are_sequences(tmp_path):
    rows = np.random.default_rng(0).integers(0, VOCAB_SIZE, (3, 50))
    f = save({"input_ids": torch.tensor(rows), "attention_mask": torch.ones(3, 50)}, tmp_path / "sample_dataset.pt")
    seqs, source = load_sequences(f)
    assert_same_chunks(seqs, list(rows))
    assert "sample_dataset format" in source
    assert_same_chunks(torch_compat.read_sample_dataset(f), list(rows))


def test_sample_dataset_list_of_dicts_in_order(tmp_path):
    a = np.random.default_rng(1).integers(0, VOCAB_SIZE, (2, 40))
    b = np.random.default_rng(2).integers(0, VOCAB_SIZE, (3, 70))
    f = save([{"input_ids": torch.tensor(a)}, {"input_ids": torch.tensor(b)}], tmp_path / "s.pt")
    assert_same_chunks(load_sequences(f)[0], list(a) + list(b))


def test_folder_prefers_tokenized_data_then_sample_dataset(tmp_path):
    rows = np.arange(100, 180).reshape(2, 40)
    save({"input_ids": torch.tensor(rows)}, tmp_path / "sample_dataset.pt")
    seqs, source = load_sequences(tmp_path)
    assert source.startswith(str(tmp_path / "sample_dataset.pt"))
    assert_same_chunks(seqs, list(rows))
    save([torch.tensor(s) for s in SEQS], tmp_path / "tokenized_data.pt")
    seqs, source = load_sequences(tmp_path)
    assert source.startswith(str(tmp_path / "tokenized_data.pt"))
    assert_same_chunks(seqs, SEQS)


def test_vocab_size_is_the_callers(tmp_path):
    f = save([torch.tensor([1, 2, 60000])], tmp_path / "t.pt")
    assert load_sequences(f, vocab_size=60001)[0][0][-1] == 60000
    with pytest.raises(DataError, match="token id 60000"):
        load_sequences(f)


# ---------------------------------------------------------------- data: malformed files


def write_bytes(data: bytes):
    def make(path):
        path.write_bytes(data)
    return make


def saved(obj):
    def make(path):
        torch.save(obj, path)
    return make


def truncated(path):
    torch.save([torch.arange(1000)], path)
    path.write_bytes(path.read_bytes()[:-200])


MALFORMED = {
    "text file": (write_bytes(b"hello, this is not a tensor file"),
                  r"not a zip archive or pickle \(starts with b'hello, t'\); expected a file written by torch.save"),
    "empty file": (write_bytes(b""), r"empty file \(0 bytes\); expected a file written by torch.save"),
    "truncated file": (truncated, r"damaged or truncated \(\w+Error: .*\); expected a complete copy of a file written by torch.save"),
    "dict without input_ids": (saved({"ids": torch.zeros(2, 3, dtype=torch.long)}),
                               r"found a dict with keys \['ids'\], without 'input_ids'; expected a dict with an 'input_ids' 2-D"),
    "list item without input_ids": (saved([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}, {"labels": 1}]),
                                    r"item 1 is a dict with keys \['labels'\], without 'input_ids'"),
    "strings in a list": (saved(["hello", "world"]), r"sequence 0 is a str \('hello'\); expected a 1-D integer tensor"),
    "strings as ids": (saved([[1, 2, "x"]]), r"sequence 0 holds a str \('x'\) at position 2; expected integer token ids"),
    "input_ids a string": (saved({"input_ids": "some text"}),
                           r"'input_ids' is a str \('some text'\); expected a 2-D integer tensor"),
    "id beyond 64 bits": (saved([[1, 2**70]]), r"sequence 0 holds an id beyond 64 bits; expected token ids"),
    "float tensor": (saved([torch.tensor([1.0, 2.0, 3.0])]), r"sequence 0 has dtype float32; expected integer token ids"),
    "float input_ids": (saved({"input_ids": torch.rand(2, 5)}), r"'input_ids' has dtype torch.float32; expected integer token ids"),
    "3-D input_ids": (saved({"input_ids": torch.zeros(2, 3, 4, dtype=torch.long)}),
                      r"'input_ids' has shape \(2, 3, 4\); expected a 2-D integer tensor"),
    "3-D sequence": (saved([torch.zeros(2, 3, 4, dtype=torch.long)]),
                     r"sequence 0 has shape \(2, 3, 4\); expected a 1-D sequence of token ids"),
    "empty list": (saved([]), r"no sequences found; expected at least one sequence"),
    "empty input_ids": (saved({"input_ids": torch.zeros(0, 8, dtype=torch.long)}), r"no sequences found"),
    "only 1-token sequences": (saved([torch.tensor([5]), torch.tensor([6])]), r"every sequence is shorter than 2 tokens"),
    "id too large": (saved([torch.tensor([1, 2]), torch.tensor([3, 4, VOCAB_SIZE, 5])]),
                     rf"sequence 1 has token id {VOCAB_SIZE} at position 2; expected ids in \[0, {VOCAB_SIZE}\)"),
    "negative id in a row": (saved({"input_ids": torch.tensor([[1, 2, 3], [4, -7, 6]])}),
                             rf"sequence 1 has token id -7 at position 1; expected ids in \[0, {VOCAB_SIZE}\)"),
    "id past int32": (saved([torch.tensor([1, 2**32 + 3])]), r"sequence 0 has token id 4294967299 at position 1"),
    "a bare tensor": (saved(torch.zeros(4, 8, dtype=torch.long)),
                      r"found a 2-D tensor of shape \(4, 8\) and dtype torch.int64; expected a list of 1-D integer tensors"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_one_line_naming_file_found_and_expected(tmp_path, case):
    make, expected = MALFORMED[case]
    f = tmp_path / "data.pt"
    make(f)
    with pytest.raises(DataError) as e:
        load_sequences(f)
    msg = one_line(e)
    assert msg.startswith(f"{f}: "), msg
    assert "expected" in msg
    assert re.search(expected, msg), f"{case}: {msg}"


def test_missing_path_and_folder_without_data(tmp_path):
    with pytest.raises(DataError) as e:
        load_sequences(tmp_path / "nope.pt")
    assert one_line(e) == f"{tmp_path / 'nope.pt'}: no such file; expected a file written by torch.save"
    with pytest.raises(DataError) as e:
        load_sequences(tmp_path)
    assert one_line(e).startswith(f"{tmp_path}: a folder with neither tokenized_data.pt nor sample_dataset.pt")


def test_format_specific_readers_reject_the_other_format(tmp_path):
    f = save({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, tmp_path / "tokenized_data.pt")
    with pytest.raises(DataError, match="expected a list of 1-D integer tensors"):
        torch_compat.read_tokenized_data(f)
    g = save([torch.arange(4)], tmp_path / "sample_dataset.pt")
    with pytest.raises(DataError, match="expected a dict with an 'input_ids' 2-D integer tensor"):
        torch_compat.read_sample_dataset(g)


class _WouldRunCode:
    """Unpickling this calls os.system: the classic malicious .pt payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["zip", "legacy pickle"])
def test_pt_that_would_run_code_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "MARKER"
    f = tmp_path / "tokenized_data.pt"
    if fmt == "zip":
        torch.save([torch.arange(5), _WouldRunCode(marker)], f)
    else:
        f.write_bytes(pickle.dumps(_WouldRunCode(marker), protocol=2))
    for load in (lambda: load_sequences(tmp_path), lambda: torch_compat.load_state_dict_file(f)):
        with pytest.raises((DataError, StateDictError)) as e:
            load()
        msg = one_line(e)
        assert msg.startswith(f"{f}: refused to load, its pickle would call ")
        assert "system" in msg and "could run code" in msg
    assert not marker.exists(), "the payload ran"
    # The payload is real: an unsafe load runs it (the legacy loader then fails on the magic number).
    with contextlib.suppress(RuntimeError):
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_numpy_arrays_in_a_pt_are_refused_not_unpickled(tmp_path):
    f = save([np.arange(5)], tmp_path / "t.pt")
    with pytest.raises(DataError, match=r"refused to load, its pickle would call numpy"):
        load_sequences(f)


# ---------------------------------------------------------------- state dicts


@pytest.fixture(scope="module")
def tiny_params():
    return fake_params(Config(embed_dim=32, n_heads=2, n_layers=2, seq_len=32))


def test_state_dict_keys_shapes_and_order_are_the_contract(tiny, tiny_params):
    sd = to_state_dict(tiny_params)
    model_sd = ref.MiniGPT.from_config(tiny).state_dict()
    assert list(sd) == list(model_sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in model_sd.items()}
    assert [(k, s) for k, _, s in torch_compat.contract(tiny)] == [(k, tuple(v.shape)) for k, v in sd.items()]
    assert sd["layers.1.attn.qkv.weight"].shape == (96, 32) and sd["head.weight"].shape == (VOCAB_SIZE, 32)
    assert sum(v.numel() for v in sd.values()) == num_params(tiny)
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_linear_weights_are_transposed_kernels(tiny_params):
    sd = to_state_dict(tiny_params)
    kernel = np.asarray(tiny_params["layers_0"]["ffn"]["fc1"]["kernel"])  # (in, out)
    np.testing.assert_array_equal(sd["layers.0.ffn.fc1.weight"].numpy(), kernel.T)
    np.testing.assert_array_equal(sd["head.weight"].numpy(), np.asarray(tiny_params["head"]["kernel"]).T)


def test_strict_import_lists_every_problem_at_once(tiny_params, tiny):
    sd = dict(to_state_dict(tiny_params))
    del sd["ln_f.bias"], sd["layers.1.ffn.fc2.bias"]
    sd["layers.0.attn.qkv.weight"] = torch.zeros(32, 96)  # transposed by mistake
    sd["layers.0.attn.mask"] = torch.ones(3)
    sd["head.bias"] = torch.zeros(VOCAB_SIZE)
    with pytest.raises(StateDictError) as e:
        from_state_dict(sd, tiny)
    msg = one_line(e)
    for needle in ("missing keys: layers.1.ffn.fc2.bias, ln_f.bias", "unexpected keys: head.bias, layers.0.attn.mask",
                   "layers.0.attn.qkv.weight has shape (32, 96) (expected (96, 32))"):
        assert needle in msg, msg


def test_compiled_and_wrapped_state_dicts_load(tiny_params, tiny):
    sd = to_state_dict(tiny_params)
    prefixed = lambda prefix: {f"{prefix}{k}": v for k, v in sd.items()}  # noqa: E731
    for variant in (prefixed("_orig_mod."), prefixed("module."), prefixed("module._orig_mod."),
                    {"model": sd, "optimizer": {}, "step": 3}, {"state_dict": sd, "epoch": 1},
                    {"model": prefixed("_orig_mod.")}, {"state_dict": prefixed("module.")}):
        params, config = from_state_dict(variant, n_heads=tiny.n_heads)
        assert config == tiny.replace(dropout=Config().dropout, batch_size=Config().batch_size)
        np.testing.assert_array_equal(params["ln_f"]["scale"], tiny_params["ln_f"]["scale"])


def test_config_is_inferred_from_shapes_and_n_heads_given():
    c = Config(embed_dim=48, n_heads=3, n_layers=3, ffn_mult=2, seq_len=40)
    sd = to_state_dict(fake_params(c))
    _, inferred = from_state_dict(sd, n_heads=3)
    assert (inferred.vocab_size, inferred.embed_dim, inferred.n_layers, inferred.ffn_mult, inferred.seq_len,
            inferred.n_heads) == (VOCAB_SIZE, 48, 3, 2, 40, 3)
    with pytest.raises(StateDictError, match="embed_dim=48: must be divisible by n_heads=5"):
        from_state_dict(sd, n_heads=5)
    assert from_state_dict(to_state_dict(fake_params(Config())))[1].n_heads == 4


def test_a_config_that_does_not_match_is_an_error(tiny_params, tiny):
    with pytest.raises(StateDictError, match=r"n_layers=3.*missing keys: layers\.2\.ln1\.weight"):
        from_state_dict(to_state_dict(tiny_params), tiny.replace(n_layers=3))


def test_non_tensor_and_integer_values_are_reported(tiny_params, tiny):
    sd = dict(to_state_dict(tiny_params))
    sd["ln_f.weight"] = [1.0] * 32
    sd["ln_f.bias"] = torch.zeros(32, dtype=torch.long)
    with pytest.raises(StateDictError, match=r"ln_f.weight is a list .*ln_f.bias has dtype torch.int64"):
        from_state_dict(sd, tiny)


def test_half_precision_state_dict_is_widened_to_float32(tiny_params, tiny):
    sd = {k: v.bfloat16() for k, v in to_state_dict(tiny_params).items()}
    params, _ = from_state_dict(sd, tiny)
    leaf = params["layers_0"]["attn"]["qkv"]["kernel"]
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(leaf, sd["layers.0.attn.qkv.weight"].float().numpy().T)


def test_broken_params_tree_is_an_error(tiny_params):
    broken = {**tiny_params, "ln_f": {"scale": tiny_params["ln_f"]["scale"]}}
    with pytest.raises(StateDictError, match=r"missing \['ln_f/bias'\]"):
        to_state_dict(broken)


def test_save_is_atomic_and_loads_with_weights_only(tmp_path, tiny_params, tiny):
    path = tmp_path / "out" / "mini_gpt_tiny.pt"
    path.parent.mkdir()
    path.write_bytes(b"old")
    torch_compat.save_state_dict(tiny_params, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["mini_gpt_tiny.pt"]  # no temporary left
    model = ref.MiniGPT.from_config(tiny)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    params, config = torch_compat.load_params(path, n_heads=2)
    assert config.embed_dim == 32
    np.testing.assert_array_equal(params["head"]["kernel"], tiny_params["head"]["kernel"])


def test_unreadable_state_dict_file_names_the_file(tmp_path):
    f = tmp_path / "model.pt"
    f.write_text("not a checkpoint")
    with pytest.raises(StateDictError) as e:
        torch_compat.load_params(f)
    assert one_line(e).startswith(f"{f}: not a zip archive or pickle")
    g = save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(StateDictError) as e:
        torch_compat.load_params(g)
    assert one_line(e).startswith(f"{g}: cannot infer the model's shape: missing ['embed.weight'")


# ---------------------------------------------------------------- reference model


def test_reference_is_causal_with_the_mask_and_not_without(tiny):
    model = ref.MiniGPT.from_config(tiny).eval()
    tokens = torch.randint(0, 50000, (1, 32))
    changed = tokens.clone()
    changed[0, 20] = 123
    base, out = ref.causal_logits(model, tokens).detach(), ref.causal_logits(model, changed).detach()
    assert torch.equal(out[0, :20], base[0, :20]) and not torch.allclose(out[0, 20:], base[0, 20:])
    # their forward without a mask (as their training loop called it) sees the future
    assert not torch.allclose(model(changed)[0, :20], model(tokens)[0, :20])
    assert torch.equal(ref.causal_mask(3), torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1]]))


def test_reference_pad_key_is_an_ordinary_key_by_gradients(tiny):
    model = ref.MiniGPT.from_config(tiny).eval()
    tokens = torch.randint(0, 50000, (1, 32))
    tokens[0, 10] = PAD_TOKEN_ID
    h = model.embed(tokens).detach().requires_grad_(True)
    model.embed.register_forward_hook(lambda module, args, out: h)  # differentiate w.r.t. h
    ref.causal_logits(model, tokens)[0, 20].sum().backward()
    dep = h.grad[0].abs().sum(-1)
    assert (dep[:21] > 0).all() and (dep[21:] == 0).all()


def test_reference_has_their_constructor_and_module_tree():
    model = ref.MiniGPT(VOCAB_SIZE, 64)  # their defaults: embed_dim 128, 4 heads, 2 layers, ffn_mult 4
    assert sum(p.numel() for p in model.parameters()) == 13_270_784
    assert isinstance(model.pos, ref.PositionalEmbedding) and model.pos.embed.num_embeddings == 64
    block = model.layers[1]
    assert isinstance(block, ref.TransformerBlock) and isinstance(block.attn, ref.MultiHeadAttention)
    assert isinstance(block.ffn, ref.FFN) and block.attn.n_heads == 4 and block.attn.dropout.p == 0.1


def test_reference_dropout_only_in_training(tiny):
    model = ref.MiniGPT.from_config(tiny.replace(dropout=0.5))
    tokens = torch.arange(32)[None]
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


def test_reference_loss_is_zero_without_labels_and_matches_cross_entropy(tiny):
    model = ref.MiniGPT.from_config(tiny).eval()
    pads = torch.full((2, 32), PAD_TOKEN_ID)
    loss, n = ref.masked_lm_loss(ref.causal_logits(model, pads), pads)
    assert loss.item() == 0.0 and n.item() == 0
    tokens = torch.randint(0, 50000, (2, 32))
    tokens[1, 16:] = PAD_TOKEN_ID
    logits = ref.causal_logits(model, tokens)
    loss, n = ref.masked_lm_loss(logits, tokens)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1), ignore_index=PAD_TOKEN_ID)
    assert n.item() == 31 + 15 and torch.allclose(loss, expected)


def test_reference_init_is_pytorch_default_and_optimizer_is_adamw_defaults(tiny):
    model = ref.MiniGPT.from_config(tiny.replace(embed_dim=128, n_heads=4))
    assert abs(model.embed.weight.std().item() - 1.0) < 0.01
    assert model.layers[0].ffn.fc2.weight.abs().max() <= 1 / np.sqrt(512)
    assert torch.equal(model.ln_f.weight, torch.ones(128))
    opt = ref.make_optimizer(model, tiny)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (5e-4, (0.9, 0.999), 1e-8, 0.01)
