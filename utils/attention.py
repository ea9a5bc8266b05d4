"""Attention: softmax, scaled dot-product attention, masks, and multi-head attention.

Chapter 02 teaches ``softmax``, ``causal_mask``, ``padding_mask`` and
``scaled_dot_product_attention``; chapter 03 teaches ``split_heads``, ``merge_heads`` and
``MultiHeadAttention``. Later chapters import them from here.

Masks follow one convention everywhere in the course: a boolean tensor, ``True`` where a query
may attend to a key, broadcastable to the ``(..., T_query, T_key)`` score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .positions import apply_rope, rope_frequencies


def naive_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(x) / sum(exp(x))`` exactly as written: overflows to inf/NaN for logits above ~88 (chapter 02)."""
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax (chapter 02).

    Subtracting the row maximum changes nothing mathematically (it cancels between numerator and
    denominator) but keeps every exponent at most 0, so ``exp`` never overflows. A row that is
    entirely ``-inf`` (every key masked) has no valid distribution; it comes out as zeros rather
    than NaN, so that padding rows stay harmless.
    """
    row_max = x.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(x - row_max)
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(length, length)`` boolean mask, True on and below the diagonal: token i sees tokens 0..i (chapter 02)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``(batch, 1, length)`` boolean mask, True for the first ``lengths[b]`` keys of row b (chapter 02).

    The middle axis of size 1 broadcasts over queries: every query of a sequence ignores the
    same padded keys.
    """
    positions = torch.arange(length, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, :]


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
):
    """``softmax(q kᵀ / sqrt(d)) v`` with an optional boolean mask (chapter 02).

    q: ``(..., T_q, d)``, k: ``(..., T_k, d)``, v: ``(..., T_k, d_v)``; mask broadcastable to
    ``(..., T_q, T_k)``, True where attending is allowed. Returns ``(..., T_q, d_v)``, and the
    attention weights ``(..., T_q, T_k)`` too when ``return_weights``.

    Dividing by ``sqrt(d)`` keeps the scores' variance near 1 whatever the head size, so the
    softmax does not saturate into a one-hot as d grows.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = softmax(scores, dim=-1)
    out = weights @ v
    return (out, weights) if return_weights else out


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """``(B, T, n_head * d_head)`` → ``(B, n_head, T, d_head)`` (chapter 03).

    Channel block h (columns ``h*d_head`` to ``(h+1)*d_head``) becomes head h.
    """
    batch, length, channels = x.shape
    return x.view(batch, length, n_head, channels // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, n_head, T, d_head)`` → ``(B, T, n_head * d_head)``, the inverse of ``split_heads`` (chapter 03)."""
    batch, n_head, length, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, length, n_head * d_head)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with optional causal mask and rotary positions (chapter 03).

    Separate query, key and value projections (rather than one fused matrix) keep the code close
    to the equations and make loading pretrained weights a plain copy. ``fused=True`` runs the
    heads through PyTorch's ``F.scaled_dot_product_attention`` (same maths, a faster kernel),
    which training uses; asking for the weights always takes the explicit path.
    """

    def __init__(self, d_model: int, n_head: int, causal: bool = True, bias: bool = False,
                 rope: bool = False, rope_base: float = 10_000.0, max_length: int = 1024,
                 dropout: float = 0.0, fused: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}.")
        self.n_head, self.d_head = n_head, d_model // n_head
        self.causal, self.rope, self.fused, self.dropout = causal, rope, fused, dropout
        self.query = nn.Linear(d_model, d_model, bias=bias)
        self.key = nn.Linear(d_model, d_model, bias=bias)
        self.value = nn.Linear(d_model, d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        if rope:
            cos, sin = rope_frequencies(max_length, self.d_head, base=rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        """x: ``(B, T, d_model)``; mask: extra boolean mask broadcastable to ``(B, n_head, T, T)``."""
        length = x.shape[1]
        q = split_heads(self.query(x), self.n_head)
        k = split_heads(self.key(x), self.n_head)
        v = split_heads(self.value(x), self.n_head)
        if self.rope:
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.fused and not return_weights:
            dropout = self.dropout if self.training else 0.0
            if mask is None:  # the common case: let the kernel build the causal mask itself
                out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
            else:
                if self.causal:
                    mask = mask & causal_mask(length, x.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            return self.out(merge_heads(out))
        if self.causal:
            causal = causal_mask(length, x.device)
            mask = causal if mask is None else mask & causal
        out, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
        out = self.out(merge_heads(out))
        return (out, weights) if return_weights else out
