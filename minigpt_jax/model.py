"""MiniGPT in Flax linen, equal number for number to the PyTorch project's model.py
called with a causal mask (docs/spec.md, Model).

- Submodule names are the PyTorch state-dict names (`layers_{i}` for
  `layers.{i}`, `pos`/`embed` for `pos.embed`), so conversion is one table
  plus one transpose rule.
- Initial values follow PyTorch's defaults: Embedding N(0, 1); Linear weight
  and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm ones and zeros.
- Attention is causal only: position t sees keys 0..t, PAD keys included (PAD
  labels carry no loss, and a causal mask keeps trailing PADs from reaching
  earlier positions). Future keys get -inf, as their masked_fill does; every
  row keeps its diagonal, so no row is all -inf and nothing is NaN.
- Softmax and LayerNorm statistics are float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from minigpt_jax.config import Config


def torch_linear_bias_init(fan_in: int):
    """PyTorch's Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3, fan_in, uniform).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def Linear(features: int, fan_in: int, name: str, dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in),
        name=name,
    )


def LayerNorm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name=name)


def Embedding(num: int, features: int, name: str) -> nn.Embed:
    return nn.Embed(num, features, embedding_init=nn.initializers.normal(1.0), name=name)


class PositionalEmbedding(nn.Module):
    """Learned positions 0..L-1 from a table of seq_len rows (their `pos.embed`)."""

    config: Config

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        table = Embedding(self.config.seq_len, self.config.embed_dim, name="embed")
        return table(jnp.arange(length))


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention under a causal mask."""

    config: Config

    @nn.compact
    def __call__(self, x_BLD, train: bool) -> jax.Array:
        c = self.config
        B, L, D = x_BLD.shape
        dtype = jnp.dtype(c.dtype)
        qkv = Linear(3 * D, D, "qkv", dtype)(x_BLD).reshape(B, L, 3, c.n_heads, c.head_dim)
        q_BLHDh, k_BLHDh, v_BLHDh = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores_BHLL = jnp.einsum("bqhk,bthk->bhqt", q_BLHDh, k_BLHDh).astype(jnp.float32)
        scores_BHLL = scores_BHLL * c.head_dim**-0.5
        causal_LL = jnp.tril(jnp.ones((L, L), dtype=bool))
        scores_BHLL = jnp.where(causal_LL, scores_BHLL, -jnp.inf)
        probs_BHLL = jax.nn.softmax(scores_BHLL, axis=-1)
        probs_BHLL = nn.Dropout(c.dropout, deterministic=not train)(probs_BHLL)
        out_BLHDh = jnp.einsum("bhqt,bthk->bqhk", probs_BHLL.astype(dtype), v_BLHDh)
        return Linear(D, D, "proj", dtype)(out_BLHDh.reshape(B, L, D))


class FFN(nn.Module):
    """Linear -> GELU (exact erf, or GPT-2's tanh form for activation="gelu_tanh") -> Linear; no dropout."""

    config: Config

    @nn.compact
    def __call__(self, x_BLD) -> jax.Array:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        h_BLF = Linear(c.ffn_dim, c.embed_dim, "fc1", dtype)(x_BLD)
        h_BLF = nn.gelu(h_BLF, approximate=c.activation == "gelu_tanh")
        return Linear(c.embed_dim, c.ffn_dim, "fc2", dtype)(h_BLF)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: h + attn(ln1(h)), then h + ffn(ln2(h))."""

    config: Config

    @nn.compact
    def __call__(self, h_BLD, train: bool) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        h_BLD = h_BLD + MultiHeadAttention(self.config, name="attn")(LayerNorm("ln1")(h_BLD).astype(dtype), train)
        f = FFN(self.config, name="ffn")(LayerNorm("ln2")(h_BLD).astype(dtype))
        return h_BLD + f


class MiniGPT(nn.Module):
    """Decoder-only transformer: tokens (B, L) -> logits (B, L, vocab_size)."""

    config: Config

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, train: bool = False, hidden: bool = False) -> jax.Array:
        """Logits (B, L, V); with hidden=True, the final-LayerNorm output (B, L, D)
        instead, for a caller that applies `head` itself (train.py's fused head)."""
        c = self.config
        L = tokens_BL.shape[1]
        if L > c.seq_len:
            raise ValueError(f"sequence length {L} exceeds seq_len={c.seq_len} (the positional table's rows)")
        h_BLD = Embedding(c.vocab_size, c.embed_dim, "embed")(tokens_BL)
        h_BLD = h_BLD + PositionalEmbedding(c, name="pos")(L)
        # A no-op unless a 'perturbations' collection is passed: lets tests take
        # gradients with respect to the input embeddings.
        h_BLD = self.perturb("embeddings", h_BLD)
        for i in range(c.n_layers):
            h_BLD = TransformerBlock(c, name=f"layers_{i}")(h_BLD, train)
        h_BLD = LayerNorm("ln_f")(h_BLD).astype(jnp.dtype(c.dtype))
        if hidden:
            return h_BLD
        logits = Linear(c.vocab_size, c.embed_dim, "head", jnp.dtype(c.dtype), use_bias=False)(h_BLD)
        return logits.astype(jnp.float32)


# The fields that decide the model's computation; the rest are training's
MODEL_FIELDS = ("vocab_size", "seq_len", "embed_dim", "n_heads", "n_layers", "ffn_mult", "dropout",
                "activation", "dtype", "matmul_precision")


def model_config(config: Config) -> Config:
    """The config with only the model's fields kept (the rest default)."""
    return Config(**{k: getattr(config, k) for k in MODEL_FIELDS})


def init_params(config: Config, key: jax.Array) -> dict:
    """Fresh float32 parameters drawn from PyTorch's default distributions. One compiled
    program per model shape (the same numbers as flax's eager init, which compiles op by op,
    seconds at baseline, and is never kept in the compilation cache)."""
    return _init(model_config(config), key)


@functools.partial(jax.jit, static_argnums=0)
def _init(config: Config, key: jax.Array) -> dict:
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    return MiniGPT(config).init({"params": key}, tokens)["params"]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
