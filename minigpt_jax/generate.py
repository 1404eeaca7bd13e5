"""Text generation from trained parameters: one jitted sampling loop.

- The context lives in a fixed (1, W) token buffer, W = config.seq_len (the
  positional rows, 64 at baseline), right-padded with PAD until it is full.
  Because attention is causal and positions are absolute (0..L-1), the logits
  read at the last real position are exactly the model's logits on the
  unpadded context: the PAD positions lie in its future and are never seen.
- Contexts longer than W slide: the window keeps the last W tokens, which then
  sit at positions 0..W-1 (what the PyTorch original did with `idx[:, -seq_len:]`).
- No KV cache: every step runs the model over the whole window. The LM head is
  applied to the one position that is read (the full-window head is dead code
  that XLA removes), so a step costs the blocks, not W vocabulary rows.
- All max_new_tokens steps run inside one `jax.lax.fori_loop` in one jitted
  call whose shapes never change: one compilation per (config,
  max_new_tokens); the prompt, its length, temperature, top-k and seed are
  traced values and never recompile.
- temperature 0 is greedy (argmax); otherwise logits / temperature, an
  optional top-k filter (ties at the k-th value are kept), and
  `jax.random.categorical` with key `fold_in(key(seed), i)` at step i, so the
  same seed gives the same text.
- PAD (50256, also GPT-2's <|endoftext|>) is never generated: it is never a
  label in training (the loss ignores it), so its logit means nothing, and fed
  back it would be masked as an attention key. Its logit is set to -inf
  before both argmax and sampling, so exactly max_new_tokens tokens come out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from minigpt_jax import tokenizer
from minigpt_jax.config import PAD_TOKEN_ID, Config
from minigpt_jax.model import MiniGPT

TRACES = {"sample_loop": 0}  # incremented at trace time; tests check it stays flat


class GenerationError(ValueError):
    """An argument generation cannot use: empty prompt, bad temperature or top-k."""


def window_logits(params, config: Config, window_1W: jax.Array, n: jax.Array) -> jax.Array:
    """Float32 logits (vocab_size,) predicting the token after the first `n` of the window.

    Equals `MiniGPT(config).apply(params, window[:, :n])[0, n - 1]`.
    """
    _, state = MiniGPT(config).apply(
        {"params": params}, window_1W,
        capture_intermediates=lambda mdl, method: mdl.name == "ln_f" and method == "__call__",
        mutable=["intermediates"],
    )
    h_D = state["intermediates"]["ln_f"]["__call__"][0][0, n - 1]
    dtype = jnp.dtype(config.dtype)
    head = nn.Dense(config.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32)
    logits_V = head.apply({"params": params["head"]}, h_D.astype(dtype))
    return logits_V.astype(jnp.float32)


def next_token(logits_V: jax.Array, temperature: jax.Array, top_k: jax.Array,
               key: jax.Array) -> jax.Array:
    """Greedy when temperature == 0, else a top-k (0: off) sample at that temperature. PAD
    excluded."""
    logits_V = logits_V.at[PAD_TOKEN_ID].set(-jnp.inf)

    def sample(logits_V):
        scaled_V = logits_V / temperature

        def keep_top_k(x_V):
            kth = jnp.sort(x_V)[x_V.shape[0] - top_k]
            return jnp.where(x_V < kth, -jnp.inf, x_V)

        scaled_V = jax.lax.cond(top_k > 0, keep_top_k, lambda x: x, scaled_V)
        return jax.random.categorical(key, scaled_V)

    return jax.lax.cond(temperature > 0, sample, jnp.argmax, logits_V).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def sample_loop(params, window_1W, n, temperature, top_k, key, *, config: Config,
                max_new_tokens: int):
    """max_new_tokens steps over a (1, W) window holding n real tokens -> new ids
    (max_new_tokens,)."""
    TRACES["sample_loop"] += 1
    W = window_1W.shape[1]

    def step(i, carry):
        window_1W, n, out_N = carry
        tok = next_token(window_logits(params, config, window_1W, n), temperature, top_k,
                         jax.random.fold_in(key, i))
        full = n == W
        window_1W = jnp.where(full, jnp.roll(window_1W, -1, axis=1), window_1W)
        window_1W = window_1W.at[0, jnp.where(full, W - 1, n)].set(tok)
        return window_1W, jnp.minimum(n + 1, W), out_N.at[i].set(tok)

    out_N = jnp.zeros((max_new_tokens,), jnp.int32)
    _, _, out_N = jax.lax.fori_loop(0, max_new_tokens, step, (window_1W, n, out_N))
    return out_N


def check_arguments(config: Config, max_new_tokens: int, temperature: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not temperature >= 0:  # also rejects NaN
        raise GenerationError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if not 0 <= top_k <= config.vocab_size:
        raise GenerationError(f"top_k={top_k}: must be in [0, {config.vocab_size}]"
                              " (0 is no filter)")


def generate(
    params,
    config: Config,
    prompt_ids,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """The max_new_tokens ids (int32 array) that follow prompt_ids; only the last
    config.seq_len prompt tokens are seen."""
    check_arguments(config, max_new_tokens, temperature, top_k)
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if prompt.size == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    bad = prompt[(prompt < 0) | (prompt >= config.vocab_size)]
    if bad.size:
        raise GenerationError(f"prompt token {int(bad[0])} is outside [0, {config.vocab_size})")
    W = config.seq_len
    context = prompt[-W:]
    window = np.full((1, W), PAD_TOKEN_ID, dtype=np.int32)
    window[0, : context.size] = context
    out = sample_loop(
        params, jnp.asarray(window), jnp.int32(context.size), jnp.float32(temperature),
        jnp.int32(top_k), jax.random.key(seed), config=config, max_new_tokens=max_new_tokens,
    )
    return np.asarray(out)


def generate_text(params, config: Config, prompt: str, **kwargs) -> str:
    """The prompt followed by its continuation, decoded as one text (GPT-2 BPE)."""
    ids = tokenizer.encode(prompt)
    return tokenizer.decode(ids + generate(params, config, ids, **kwargs).tolist())
