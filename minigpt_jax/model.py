"""MiniGPT in Flax linen, equal number for number to the PyTorch reference.

- Submodule names are the PyTorch state-dict names (`blocks_{i}` for
  `blocks.{i}`), so conversion is one table plus one transpose rule.
- Initial values follow PyTorch's defaults: Embedding N(0, 1); Linear weight
  and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm ones and zeros.
- Masked scores use finite negatives: PAD keys get -1e9 and future keys the
  float32 minimum, so a query whose visible keys are all PAD attends uniformly
  over those (no NaN) and still never sees the future.
- Softmax and LayerNorm statistics are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import jax.numpy as jnp
from flax import linen as nn

from minigpt_jax.config import PAD_TOKEN_ID, Config

PAD_SCORE = -1e9  # score of a PAD key (finite: an all-PAD row stays NaN-free)
FUTURE_SCORE = float(np.finfo(np.float32).min)  # below PAD_SCORE: never attended


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
    """Learned positions 0..L-1 from a table of max_len rows."""

    config: Config

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        table = Embedding(self.config.max_len, self.config.embed_dim, name="embedding")
        return table(jnp.arange(length))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a key-padding mask."""

    config: Config

    @nn.compact
    def __call__(self, x_BLD, key_is_pad_BL, train: bool) -> jax.Array:
        c = self.config
        B, L, D = x_BLD.shape
        dtype = jnp.dtype(c.dtype)
        qkv = Linear(3 * D, D, "qkv", dtype)(x_BLD).reshape(B, L, 3, c.n_heads, c.head_dim)
        q_BLHK, k_BLHK, v_BLHK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores_BHLL = jnp.einsum("bqhk,bthk->bhqt", q_BLHK, k_BLHK).astype(jnp.float32)
        scores_BHLL = scores_BHLL / math.sqrt(c.head_dim)
        scores_BHLL = jnp.where(key_is_pad_BL[:, None, None, :], PAD_SCORE, scores_BHLL)
        causal_LL = jnp.tril(jnp.ones((L, L), dtype=bool))
        scores_BHLL = jnp.where(causal_LL, scores_BHLL, FUTURE_SCORE)
        probs_BHLL = jax.nn.softmax(scores_BHLL, axis=-1)
        probs_BHLL = nn.Dropout(c.dropout, deterministic=not train)(probs_BHLL)
        out_BLHK = jnp.einsum("bhqt,bthk->bqhk", probs_BHLL.astype(dtype), v_BLHK)
        return Linear(D, D, "out_proj", dtype)(out_BLHK.reshape(B, L, D))


class FeedForward(nn.Module):
    """Linear -> exact (erf) GELU -> Linear; no dropout."""

    config: Config

    @nn.compact
    def __call__(self, x_BLD) -> jax.Array:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        h_BLF = Linear(c.ffn_dim, c.embed_dim, "fc1", dtype)(x_BLD)
        h_BLF = nn.gelu(h_BLF, approximate=False)
        return Linear(c.embed_dim, c.ffn_dim, "fc2", dtype)(h_BLF)


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(ln1(h)), then h + ffn(ln2(h))."""

    config: Config

    @nn.compact
    def __call__(self, h_BLD, key_is_pad_BL, train: bool) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        a = CausalSelfAttention(self.config, name="attn")(
            LayerNorm("ln1")(h_BLD).astype(dtype), key_is_pad_BL, train
        )
        h_BLD = h_BLD + a
        f = FeedForward(self.config, name="ffn")(LayerNorm("ln2")(h_BLD).astype(dtype))
        return h_BLD + f


class MiniGPT(nn.Module):
    """Decoder-only transformer: tokens (B, L) -> logits (B, L, vocab_size)."""

    config: Config

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, train: bool = False, hidden: bool = False) -> jax.Array:
        """Logits (B, L, V); with hidden=True, the final-LayerNorm output (B, L, D)
        instead, for a caller that applies `lm_head` itself (train.py's fused head)."""
        c = self.config
        L = tokens_BL.shape[1]
        if L > c.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={c.max_len}")
        h_BLD = Embedding(c.vocab_size, c.embed_dim, "token_embedding")(tokens_BL)
        h_BLD = h_BLD + PositionalEmbedding(c, name="pos_embedding")(L)
        # A no-op unless a 'perturbations' collection is passed: lets tests take
        # gradients with respect to the input embeddings.
        h_BLD = self.perturb("embeddings", h_BLD)
        key_is_pad_BL = tokens_BL == PAD_TOKEN_ID
        for i in range(c.n_layers):
            h_BLD = Block(c, name=f"blocks_{i}")(h_BLD, key_is_pad_BL, train)
        h_BLD = LayerNorm("ln_f")(h_BLD).astype(jnp.dtype(c.dtype))
        if hidden:
            return h_BLD
        logits = Linear(c.vocab_size, c.embed_dim, "lm_head", jnp.dtype(c.dtype), use_bias=False)(h_BLD)
        return logits.astype(jnp.float32)


def init_params(config: Config, key: jax.Array) -> dict:
    """Fresh float32 parameters drawn from PyTorch's default distributions."""
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    return MiniGPT(config).init({"params": key}, tokens)["params"]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
