"""The PyTorch MiniGPT of the SPEC: the yardstick for parity and benchmarks.

- `MiniGPT(config).state_dict()` has exactly the contract's keys, so a JAX
  export loads with `load_state_dict(..., strict=True)`.
- Attention masks the same way as minigpt_jax.model, with its constants: PAD
  keys get PAD_SCORE, then future keys FUTURE_SCORE; softmax in float32;
  dropout on the probabilities in training mode only.
- PyTorch's default initializers (no custom init), exact erf GELU, LayerNorm
  eps 1e-5, lm_head without bias and not tied.
- `config` is a minigpt_jax Config, or any object with the same field names.

Importing this module needs torch (TorchMissingError otherwise).
"""

from __future__ import annotations

import math

from minigpt_jax.config import PAD_TOKEN_ID, SEQ_MAX
from minigpt_jax.model import FUTURE_SCORE, PAD_SCORE
from torch_compat.pt_io import require_torch

torch = require_torch("torch_compat.reference")
nn = torch.nn
F = torch.nn.functional


class PositionalEmbedding(nn.Module):
    """Learned positions 0..L-1 from a table of max_len rows."""

    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Embedding(getattr(config, "max_len", SEQ_MAX), config.embed_dim)

    def forward(self, length: int) -> torch.Tensor:
        return self.embedding(torch.arange(length, device=self.embedding.weight.device))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a key-padding mask."""

    def __init__(self, config):
        super().__init__()
        if config.embed_dim % config.n_heads:
            raise ValueError(f"embed_dim={config.embed_dim}: must be divisible by n_heads={config.n_heads}")
        self.n_heads, self.head_dim = config.n_heads, config.embed_dim // config.n_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.out_proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_BLD: torch.Tensor, key_is_pad_BL: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.n_heads, self.head_dim)
        q_BHLK, k_BHLK, v_BHLK = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        scores_BHLL = (q_BHLK @ k_BHLK.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
        scores_BHLL = scores_BHLL.masked_fill(key_is_pad_BL[:, None, None, :], PAD_SCORE)
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=x_BLD.device).tril()
        scores_BHLL = scores_BHLL.masked_fill(~causal_LL, FUTURE_SCORE)
        probs_BHLL = self.dropout(scores_BHLL.softmax(dim=-1))
        out_BHLK = probs_BHLL.to(v_BHLK.dtype) @ v_BHLK
        return self.out_proj(out_BHLK.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    """Linear -> exact (erf) GELU -> Linear; no dropout."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.embed_dim * config.ffn_mult)
        self.fc2 = nn.Linear(config.embed_dim * config.ffn_mult, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(ln1(h)), then h + ffn(ln2(h))."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.ffn = FeedForward(config)

    def forward(self, h: torch.Tensor, key_is_pad: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h), key_is_pad)
        return h + self.ffn(self.ln2(h))


class MiniGPT(nn.Module):
    """Decoder-only transformer: tokens (B, L) -> logits (B, L, vocab_size)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_embedding = PositionalEmbedding(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        L = tokens_BL.shape[1]
        max_len = self.pos_embedding.embedding.num_embeddings
        if L > max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={max_len}")
        h = self.token_embedding(tokens_BL) + self.pos_embedding(L)
        key_is_pad_BL = tokens_BL == PAD_TOKEN_ID
        for block in self.blocks:
            h = block(h, key_is_pad_BL)
        return self.lm_head(self.ln_f(h))


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
    """One AdamW step on a (B, L) batch of token ids -> {'loss', 'perplexity', 'tokens'}."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, n_labels = masked_lm_loss(model(tokens_BL), tokens_BL)
    loss.backward()
    optimizer.step()
    loss = loss.item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(n_labels.item())}
