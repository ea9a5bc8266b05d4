"""Where a token is: sinusoidal, learned and rotary position encodings (chapter 03).

Attention by itself is blind to order (permute the tokens and the outputs permute with them).
Absolute encodings add a position vector to each token embedding; rotary embeddings (RoPE)
rotate queries and keys instead, so that the score between positions m and n depends only on
m - n.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def sinusoidal_positions(length: int, d_model: int, base: float = 10_000.0) -> torch.Tensor:
    """``(length, d_model)`` table from "Attention Is All You Need" (chapter 03).

    Column pair (2i, 2i+1) holds ``sin`` and ``cos`` of ``pos / base^(2i / d_model)``: a clock
    with one hand per frequency, from one turn every 2π tokens to one every ``base``·2π tokens.
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even for sinusoidal positions, got {d_model}.")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inverse_frequency = base ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    angles = position * inverse_frequency[None, :]
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class LearnedPositions(nn.Module):
    """One trainable vector per position, as in GPT-2 and BERT (chapter 03)."""

    def __init__(self, max_length: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_length, d_model) * 0.02)

    def forward(self, length: int) -> torch.Tensor:
        if length > self.weight.shape[0]:
            raise ValueError(f"sequence of {length} tokens is longer than the {self.weight.shape[0]} learned positions.")
        return self.weight[:length]


def rope_frequencies(length: int, d_head: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables of shape ``(length, d_head // 2)`` for rotary embeddings (chapter 03)."""
    if d_head % 2:
        raise ValueError(f"d_head must be even for rotary embeddings, got {d_head}.")
    inverse_frequency = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse_frequency[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of channels of ``x`` (``(..., T, d_head)``) by its position's angle (chapter 03).

    The pairs are (i, i + d_head/2), the "rotate half" layout of GPT-NeoX and Llama:
    ``(x1, x2) → (x1 cos θ − x2 sin θ, x1 sin θ + x2 cos θ)``. A rotation by θ_m on the query and
    θ_n on the key leaves their dot product depending on θ_m − θ_n only: relative position.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
