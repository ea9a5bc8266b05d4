"""Generating text from the course GPT (chapter 05): temperature, top-k and top-p sampling.

Each filter takes logits ``(..., vocab)`` and returns logits with the excluded tokens set to
``-inf``, so filters compose and the final softmax renormalises over what is left.
"""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by the temperature: below 1 sharpens the distribution, above 1 flattens it (chapter 05)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (use greedy decoding for 0), got {temperature}.")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf`` (chapter 05).

    Ties with the k-th value are kept, so a row may keep more than k tokens.
    """
    k = min(max(int(k), 1), logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p`` (chapter 05).

    A token is kept when the probability mass of the tokens ranked strictly above it is below
    ``p``; the most likely token is therefore always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token stays even for p <= 0, so sampling never sees all -inf
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` ``(B, vocab)`` → ``(B, 1)`` (chapter 05)."""
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``ids`` ``(B, T)`` by ``max_new_tokens`` sampled tokens, one forward pass per token (chapter 05).

    The model sees at most its context length; chapter 07 removes the recomputation with a KV cache.
    """
    model.eval()
    context = model.config.context_length
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -context:])
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        ids = torch.cat([ids, next_id], dim=1)
    return ids
