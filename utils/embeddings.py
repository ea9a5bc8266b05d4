"""Embeddings: a token id picks a row of a learned matrix. Taught in chapter 01.

A lookup ``weight[ids]`` and the product ``one_hot(ids) @ weight`` give the same vectors; the
lookup is what ``torch.nn.Embedding`` does because it never builds the mostly-zero one-hot matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_one_hot(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Embed integer ``ids`` of any shape with ``weight`` of shape (vocab, dim) as a one-hot product.

    Returns a tensor of shape ``ids.shape + (dim,)`` with ``weight``'s dtype. Chapter 01, exercise 5.
    """
    one_hot = F.one_hot(ids, num_classes=weight.shape[0]).to(weight.dtype)
    return one_hot @ weight


def embed_lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same embedding as a row lookup: what ``torch.nn.Embedding`` computes. Chapter 01."""
    return weight[ids]
