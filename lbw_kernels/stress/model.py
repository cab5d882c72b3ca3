"""A small decoder-only, byte-level transformer (vocabulary 256) in plain PyTorch.

Pre-LayerNorm GPT blocks (causal self-attention through ``scaled_dot_product_attention``,
a 4x GELU MLP), learned positions, an output head tied to the byte embedding. Sized by
``ModelConfig``; nothing here depends on lbw_kernels' optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ctx: int = 128

    def __post_init__(self):
        for name in ("d_model", "layers", "heads", "ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteTransformer(nn.Module):
    """Bytes ``[batch, t]`` (int64, t <= ctx) -> next-byte logits ``[batch, t, 256]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.ctx, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance
        # independent of depth.
        for block in self.blocks:
            for lin in (block.proj, block.out):
                nn.init.normal_(lin.weight, std=0.02 / (2 * cfg.layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.t()

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats (ln 256 = 5.55 is a uniform guess)."""
        return F.cross_entropy(self(idx).reshape(-1, VOCAB), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
