"""A small byte-level GPT: learned token and position embeddings, pre-norm blocks, separate ``lm_head``.

The layout is chosen so that :func:`orthoptim.split_params` sends exactly the hidden matrices (attention and MLP
weights) to the orthogonalized update: the embeddings are ``nn.Embedding`` modules, the output head is a module
named ``lm_head`` (not tied to the token embedding), and the RMSNorm gains are 1-D. Hidden layers avoid the
names split_params reads as an output head (``fc_out``, ``output``, ...): the MLP is ``mlp_in``/``mlp_out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256  # byte-level: every file is a sequence of bytes, so no tokenizer and no unknown symbols


@dataclass(frozen=True)
class GPTConfig:
    """Model size. ``width`` must be divisible by ``heads``."""

    layers: int = 4
    width: int = 128
    heads: int = 4
    context: int = 128
    vocab: int = VOCAB

    def __post_init__(self) -> None:
        for name in ("layers", "width", "heads", "context", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"--width ({self.width}) must be divisible by the number of heads ({self.heads})")


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4×-wide GELU MLP, each on a residual branch."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.RMSNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.attn_out = nn.Linear(cfg.width, cfg.width, bias=False)
        self.norm2 = nn.RMSNorm(cfg.width)
        self.mlp_in = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.mlp_out = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x))))


class GPT(nn.Module):
    """Byte-level GPT returning the mean next-byte cross-entropy (nats) of ``idx`` against ``targets``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.width)
        self.pos_emb = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialization (std 0.02; residual-branch outputs scaled by 1/√(2·layers), per the GPT-2 paper)."""
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue  # RMSNorm gains keep their init of ones
            residual_out = name.endswith(("attn_out.weight", "mlp_out.weight"))
            std = 0.02 / math.sqrt(2 * self.cfg.layers) if residual_out else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
