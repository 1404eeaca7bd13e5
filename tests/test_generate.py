
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, run_script

from minigpt_jax import checkpoint, tokenizer
from minigpt_jax import generate as gen
from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.model import MiniGPT, init_params
from minigpt_jax.train import create_state

N_NEW = 20


@pytest.fixture(scope="module")
def model():
    c = Config(embed_dim=32, n_heads=2, n_layers=2, seq_len=32, batch_size=4, dropout=0.0)
    return init_params(c, jax.random.key(7)), c


def prompt_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, PAD_TOKEN_ID, size=n)


def test_padded_window_gives_the_unpadded_prefix_logits(model):
    """Right-padding with PAD is invisible to the last real position (causal mask), and
    the one-position LM head equals the model's own head."""
    params, c = model
    tokens = prompt_of(c.seq_len)
    apply = jax.jit(lambda t: MiniGPT(c).apply({"params": params}, t))
    logits_fn = jax.jit(lambda w, n: gen.window_logits(params, c, w, n))
    for n in (1, 17, c.seq_len):
        window = np.full((1, c.seq_len), PAD_TOKEN_ID, np.int32)
        window[0, :n] = tokens[:n]
        want = apply(jnp.asarray(tokens[None, :n]))[0, -1]
        got = logits_fn(jnp.asarray(window), jnp.int32(n))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"n={n}")


@pytest.mark.parametrize("prompt_len", [5, 25, 50])
def test_greedy_equals_torch_reference_argmax_token_by_token(model, prompt_len):
    """5: the window fills; 25: it fills and then slides (25 + 20 > 32);
    50: the prompt itself is cut to its last 32 tokens (the positional table's rows)."""
    torch = pytest.importorskip("torch")
    import torch_compat
    from torch_compat import reference

    params, c = model
    ref = reference.MiniGPT.from_config(c)
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in torch_compat.to_state_dict(params).items()})
    ref.eval()
    context = prompt_of(prompt_len, seed=prompt_len).tolist()
    want = []
    with torch.no_grad():
        for _ in range(N_NEW):
            logits = reference.causal_logits(ref, torch.tensor([context[-c.seq_len:]]))[0, -1]
            logits[PAD_TOKEN_ID] = -float("inf")
            top2 = torch.topk(logits, 2).values
            assert top2[0] - top2[1] > 1e-4, "near tie: pick another prompt seed"
            want.append(int(logits.argmax()))
            context.append(want[-1])
    got = gen.generate(params, c, prompt_of(prompt_len, seed=prompt_len), N_NEW, temperature=0.0)
    assert got.tolist() == want
    assert len(set(want)) > 1, "a constant continuation would make this comparison weak"


def test_long_prompt_is_cut_to_the_last_window(model):
    params, c = model
    p = prompt_of(300)
    a = gen.generate(params, c, p, N_NEW, temperature=1.0, seed=3)
    b = gen.generate(params, c, p[-c.seq_len:], N_NEW, temperature=1.0, seed=3)
    assert a.tolist() == b.tolist()


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    params, c = model
    p = prompt_of(6)
    a = gen.generate(params, c, p, N_NEW, temperature=1.0, seed=1)
    b = gen.generate(params, c, p, N_NEW, temperature=1.0, seed=1)
    d = gen.generate(params, c, p, N_NEW, temperature=1.0, seed=2)
    assert a.tolist() == b.tolist()
    assert a.tolist() != d.tolist()


def test_temperature_zero_is_greedy_whatever_the_seed(model):
    params, c = model
    p = prompt_of(6)
    runs = [gen.generate(params, c, p, N_NEW, temperature=0.0, seed=s).tolist() for s in (0, 1, 2)]
    assert runs[0] == runs[1] == runs[2]
    # top-k 1 leaves only the argmax, so sampling at any temperature is greedy too.
    for t in (1.0, 5.0):
        assert gen.generate(params, c, p, N_NEW, temperature=t, top_k=1, seed=9).tolist() == runs[0]


def test_top_k_samples_only_the_k_most_likely_and_never_pad():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=PAD_TOKEN_ID + 1), jnp.float32)
    logits = logits.at[PAD_TOKEN_ID].set(100.0)  # the most likely token, yet never chosen
    draw = jax.jit(jax.vmap(gen.next_token, in_axes=(None, None, None, 0)))
    keys = jax.random.split(jax.random.key(0), 256)
    top3 = set(np.argsort(np.asarray(logits))[-4:-1].tolist())
    got = set(np.asarray(draw(logits, jnp.float32(1.0), jnp.int32(3), keys)).tolist())
    assert got == top3
    assert int(gen.next_token(logits, jnp.float32(0.0), jnp.int32(0), keys[0])) == int(np.argsort(np.asarray(logits))[-2])
    unfiltered = np.asarray(draw(logits, jnp.float32(1.0), jnp.int32(0), keys))
    assert PAD_TOKEN_ID not in unfiltered and len(set(unfiltered.tolist())) > 100


def test_one_compilation_for_any_prompt_temperature_top_k_and_seed(model):
    params, c = model
    n_new = 7  # a length no other test uses, so the first call below must compile
    traces, cached = gen.TRACES["sample_loop"], gen.sample_loop._cache_size()
    for prompt_len, temperature, top_k, seed in [(3, 0.0, 0, 0), (50, 0.7, 5, 1), (200, 1.3, 0, 2), (1, 0.0, 2, 3)]:
        gen.generate(params, c, prompt_of(prompt_len), n_new, temperature=temperature, top_k=top_k, seed=seed)
    assert gen.TRACES["sample_loop"] - traces == 1
    assert gen.sample_loop._cache_size() - cached == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"temperature": -0.5}, "temperature=-0.5"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_k": -1}, "top_k=-1"),
    ({"top_k": PAD_TOKEN_ID + 2}, "top_k=50258"),
])
def test_bad_arguments_are_errors(model, kwargs, message):
    params, c = model
    with pytest.raises(gen.GenerationError, match=message):
        gen.generate(params, c, [1, 2], **kwargs)
    with pytest.raises(gen.GenerationError, match="empty"):
        gen.generate(params, c, [])


# ---- scripts/generate.py ----

@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The tiny model as an Orbax experiment folder and as a .pt state dict."""
    params, c = model
    root = tmp_path_factory.mktemp("gen")
    mngr = checkpoint.manager(root / "checkpoints" / "tiny")
    checkpoint.save(mngr, create_state(c, params), c, checkpoint.progress_record())
    pt = None
    try:
        import torch_compat

        pt = torch_compat.save_state_dict(params, root / "tiny.pt")
    except ImportError:
        pass
    return root, pt


@pytest.fixture(scope="module")
def script():
    return load_script("generate")


def run_main(script, argv, capsys):
    try:
        code = script.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_script_prints_prompt_and_greedy_continuation_from_orbax_and_pt(model, saved, script, capsys):
    params, c = model
    root, pt = saved
    prompt = "Return the list"
    ids = tokenizer.encode(prompt)
    want = tokenizer.decode(ids + gen.generate(params, c, ids, 12, temperature=0.0).tolist())
    folders = [root / "checkpoints" / "tiny", root / "checkpoints" / "tiny" / "0"]
    for path in folders + ([pt] if pt else []):
        code, out, err = run_main(script, ["--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "12",
                                   "--temperature", "0", "--n-heads", "2"], capsys)
        assert (code, out, err) == (0, want + "\n", ""), path
    assert out.startswith(prompt) and len(out) > len(prompt) + 1


def test_script_sampling_follows_the_seed(saved, script, capsys):
    root, _ = saved
    argv = ["--checkpoint", str(root / "checkpoints" / "tiny"), "--prompt", "Hello", "--temperature", "1",
            "--top-k", "0", "--max-new-tokens", "8"]
    outs = [run_main(script, argv + ["--seed", s], capsys)[1] for s in ("1", "1", "2")]
    assert outs[0] == outs[1] != outs[2]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{root}/nowhere"], "no such file or folder"),
    (["--checkpoint", "{root}"], "no checkpoint found"),
    (["--checkpoint", "{root}/notes.txt"], "not a .pt state dict"),
    (["--checkpoint", "{root}/junk.pt"], "junk.pt"),
    (["--prompt", ""], "--prompt is empty"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--top-k", "-3"], "--top-k -3"),
    (["--top-k", "99999"], "top_k=99999"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
])
def test_script_errors_are_one_line_exit_2(saved, script, capsys, argv, message):
    root, _ = saved
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "junk.pt").write_bytes(b"PK\x03\x04 truncated")
    defaults = {"--checkpoint": str(root / "checkpoints" / "tiny"), "--prompt": "Hello"}
    argv = [a.format(root=root) for a in argv]
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    if "junk.pt" in argv[1]:
        pytest.importorskip("torch")
    code, out, err = run_main(script, argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("generate.py: error: ") and err.count("\n") == 1, err
    assert message in err


def test_script_error_from_a_fresh_process_has_no_traceback(tmp_path):
    r = run_script("generate.py", "--checkpoint", tmp_path, "--prompt", "Hi", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("generate.py: error: --checkpoint ") and r.stderr.count("\n") == 1, r.stderr
