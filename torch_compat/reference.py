"""The PyTorch project's model.py, written by us from docs/spec.md: the yardstick for parity.

- Same classes, attribute names and constructor as theirs: `MiniGPT(vocab_size,
  seq_len, embed_dim=128, n_heads=4, n_layers=2, ffn_mult=4, dropout=0.1)` with
  `embed`, `pos` (a `PositionalEmbedding` whose table is `embed`), `layers`
  (`TransformerBlock`s of `ln1`, `attn` = `MultiHeadAttention` (`qkv`, `proj`),
  `ln2`, `ffn` = `FFN` (`fc1`, `fc2`)), `ln_f` and `head`. Its `state_dict()`
  therefore has exactly the contract's keys, and a PyTorch user can drop it in
  for their own.
- `forward(input_ids, mask=None)` as theirs: a mask is applied only when given
  (`scores.masked_fill(mask == 0, -inf)`, mask broadcastable to (B, H, L, L)).
  Their training loop never passed one; minigpt_jax always applies a causal
  mask, so parity is defined against `model(ids, mask=causal_mask(L))`.
- Dropout on the attention probabilities in training mode, as docs/spec.md's model
  (their code stored `dropout` but never applied it: `dropout=0` reproduces it).
- PyTorch's default initializers, exact erf GELU, LayerNorm eps 1e-5, `head`
  without bias and not tied to `embed`.

Importing this module needs torch (TorchMissingError otherwise).
"""

from __future__ import annotations

import math

from minigpt_jax.config import PAD_TOKEN_ID
from torch_compat.pt_io import require_torch

torch = require_torch("torch_compat.reference")
nn = torch.nn
F = torch.nn.functional


def causal_mask(length: int, device=None) -> torch.Tensor:
    """`torch.tril(torch.ones(L, L))`: position t sees keys 0..t (1 = visible)."""
    return torch.tril(torch.ones(length, length, device=device))


class PositionalEmbedding(nn.Module):
    """Learned positions 0..L-1 from a table of seq_len rows."""

    def __init__(self, seq_len: int, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(seq_len, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> x plus the rows 0..L-1."""
        return x + self.embed(torch.arange(x.shape[1], device=x.device))


class MultiHeadAttention(nn.Module):
    """One qkv Linear viewed as (L, 3, heads, head_dim); softmax in float32."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim={embed_dim}: must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, embed_dim // n_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BLD: torch.Tensor, mask=None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.n_heads, self.head_dim)
        q_BHLDh, k_BHLDh, v_BHLDh = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        scores_BHLL = (q_BHLDh @ k_BHLDh.transpose(-2, -1)).float() * self.head_dim**-0.5
        if mask is not None:
            scores_BHLL = scores_BHLL.masked_fill(mask == 0, float("-inf"))
        probs_BHLL = self.dropout(scores_BHLL.softmax(dim=-1))
        out_BHLDh = probs_BHLL.to(v_BHLDh.dtype) @ v_BHLDh
        return self.proj(out_BHLDh.transpose(1, 2).reshape(B, L, D))


class FFN(nn.Module):
    """Linear -> exact (erf) GELU -> Linear; no dropout."""

    def __init__(self, embed_dim: int, ffn_mult: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, embed_dim * ffn_mult)
        self.fc2 = nn.Linear(embed_dim * ffn_mult, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + ffn(ln2(x))."""

    def __init__(self, embed_dim: int, n_heads: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim, eps=1e-5)
        self.attn = MultiHeadAttention(embed_dim, n_heads, dropout)
        self.ln2 = nn.LayerNorm(embed_dim, eps=1e-5)
        self.ffn = FFN(embed_dim, ffn_mult)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.ffn(self.ln2(x))


class MiniGPT(nn.Module):
    """Decoder-only transformer: input_ids (B, L) -> logits (B, L, vocab_size)."""

    def __init__(self, vocab_size: int, seq_len: int, embed_dim: int = 128, n_heads: int = 4,
                 n_layers: int = 2, ffn_mult: int = 4, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.pos = PositionalEmbedding(seq_len, embed_dim)
        self.layers = nn.ModuleList(
            [TransformerBlock(embed_dim, n_heads, ffn_mult, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(embed_dim, eps=1e-5)
        self.head = nn.Linear(embed_dim, vocab_size, bias=False)

    @classmethod
    def from_config(cls, config) -> "MiniGPT":
        """The model of a minigpt_jax Config (or any object with its field names)."""
        return cls(config.vocab_size, config.seq_len, config.embed_dim, config.n_heads,
                   config.n_layers, config.ffn_mult, config.dropout)

    def forward(self, input_ids: torch.Tensor, mask=None) -> torch.Tensor:
        x = self.pos(self.embed(input_ids))
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(self.ln_f(x))


def causal_logits(model: MiniGPT, input_ids: torch.Tensor) -> torch.Tensor:
    """model(input_ids, mask=causal_mask(L)): what minigpt_jax's MiniGPT computes."""
    return model(input_ids, mask=causal_mask(input_ids.shape[1], input_ids.device))


def masked_lm_loss(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy averaged over non-PAD labels -> (loss, n_labels); no label gives 0."""
    logits = logits_BLV[:, :-1].float()
    labels = tokens_BL[:, 1:]
    weights = (labels != PAD_TOKEN_ID).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    n_labels = weights.sum()
    return (ce.view_as(weights) * weights).sum() / n_labels.clamp(min=1.0), n_labels


def make_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    """AdamW with PyTorch's defaults (betas 0.9/0.999, eps 1e-8), the config's lr and weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=getattr(config, "weight_decay", 0.01))


def train_step(model: MiniGPT, optimizer: torch.optim.Optimizer, tokens_BL: torch.Tensor) -> dict:
    """One AdamW step on a (B, L) batch under the causal mask -> {'loss', 'perplexity', 'tokens'}."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, n_labels = masked_lm_loss(causal_logits(model, tokens_BL), tokens_BL)
    loss.backward()
    optimizer.step()
    loss = loss.item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(n_labels.item())}
