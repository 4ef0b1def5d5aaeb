"""Token and position embedding, unembedding, the input adapter and the exit gate (plain weight holders)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int

from tl_loop.components.base import WeightView
from tl_loop.config import LoopedConfig


class Embedding(nn.Module):
    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))  # [d_vocab, d_model]

    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class PosEmbedding(nn.Module):
    """Learned absolute position embeddings ``W_pos [n_ctx, d_model]`` (GPT-2 ``wpe``)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))  # [n_ctx, d_model]

    def forward(
        self, tokens: Int[torch.Tensor, "batch pos"], positions: Int[torch.Tensor, "batch pos"] | None = None
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """The embedding of each token's position (``0..pos-1``, or ``positions`` with padding)."""
        if positions is not None:
            return self.W_pos[positions]
        return self.W_pos[: tokens.shape[1]].unsqueeze(0).expand(tokens.shape[0], -1, -1)


class Unembedding(nn.Module):
    """Untied unembedding, ``[d_vocab, d_model]`` (``nn.Linear`` layout, as ``lm_head.weight``)."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype)) if cfg.unembed_bias else None

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        return F.linear(x, self.weight, self.b_U)


class TiedUnembedding(WeightView):
    """Unembedding tied to the token embedding: no parameters of its own."""

    weights: Embedding
    b_U = None

    @property
    def weight(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.weights.W_E

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        return F.linear(x, self.weights.W_E)


class Adapter(nn.Module):
    """Linear input injection: ``W [d_model, 2 d_model]`` applied to ``concat(state, source)``."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.d_model, 2 * cfg.d_model, dtype=cfg.dtype))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype)) if cfg.adapter_bias else None

    def forward(
        self, state: Float[torch.Tensor, "... d_model"], source: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... d_model"]:
        return F.linear(torch.cat([state, source], dim=-1), self.weight, self.bias)

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_state, W_source)``, each ``[d_model, d_model]``: the adapter is their sum."""
        d = self.weight.shape[0]
        return self.weight[:, :d], self.weight[:, d:]


class ExitGate(nn.Module):
    """Ouro's early-exit gate: ``Linear(d_model -> 1)`` on the normed state after each step."""

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, cfg.d_model, dtype=cfg.dtype))
        self.bias = nn.Parameter(torch.zeros(1, dtype=cfg.dtype))

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... 1"]:
        return F.linear(x, self.weight, self.bias)
