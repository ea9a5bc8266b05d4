"""Fast generation (chapter 07): the KV cache, grouped-query attention, and what the cache costs in memory.

A GPT generates one token per forward pass. Run naively, step t recomputes the keys and values
of all t earlier tokens, although they never change: causal attention means a token's keys and
values depend only on the tokens before it. A KV cache keeps them. Generation then has two
phases:

* **prefill**: one forward pass over the whole prompt, which fills the cache (many tokens at once,
  big matrix products: compute-bound);
* **decode**: one forward pass per new token, over that token only, attending to the cache (one row
  at a time: bound by memory traffic and, for a model as small as the course's, Python overhead).

The cache costs memory, ``2 · layers · kv_heads · d_head · tokens`` numbers per sequence, which is
why Llama-2-70B, Llama-3 and Mistral share each key/value head among several query heads
(grouped-query attention, GQA; one shared head is multi-query attention, MQA).

``forward_with_cache`` walks the course GPT's own modules (:mod:`utils.model`) with their own
weights, so the cached and uncached models are the same model: greedy generation gives the same
tokens with and without the cache, which the tests assert.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (
    MultiHeadAttention,
    causal_mask,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)
from .generate import sample_next
from .positions import apply_rope, rope_frequencies

# ---------------------------------------------------------------- the cache


def update_kv_cache(cache_k: torch.Tensor, cache_v: torch.Tensor, k_new: torch.Tensor,
                    v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append new keys and values to a layer's cache along the time axis (chapter 07, exercise 1).

    All four tensors are ``(B, heads, T, d_head)``; the cache may hold ``T = 0`` positions. Returns
    the whole cache, ``(B, heads, T_past + T_new, d_head)`` each: keys and values of every token so
    far, oldest first, which is the order the query's scores and the causal mask assume.
    """
    return torch.cat([cache_k, k_new], dim=-2), torch.cat([cache_v, v_new], dim=-2)


class KVCache:
    """Every layer's keys and values for the tokens seen so far (chapter 07).

    ``update(layer, k, v)`` appends with :func:`update_kv_cache` and returns the layer's whole
    cache. Concatenating copies the cache at every step; serving systems preallocate the buffer
    instead (Hugging Face's static cache, vLLM's paged blocks), which matters at thousands of
    tokens, not at the course's hundreds.
    """

    def __init__(self, n_layer: int, max_length: int | None = None):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.max_length = max_length

    def length_at(self, layer: int) -> int:
        """Positions cached so far in ``layer``."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[-2]

    @property
    def length(self) -> int:
        """Positions cached in the last layer: the tokens every layer has seen (also during a forward pass)."""
        return self.length_at(-1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer], self.values[layer] = update_kv_cache(self.keys[layer], self.values[layer], k, v)
        if self.max_length is not None and self.keys[layer].shape[-2] > self.max_length:
            raise ValueError(f"the KV cache would hold {self.keys[layer].shape[-2]} positions, "
                             f"more than its max_length of {self.max_length}.")
        return self.keys[layer], self.values[layer]

    def copy(self) -> KVCache:
        """A cache that starts from the same entries and grows on its own (the tensors are shared, never modified)."""
        twin = KVCache(len(self.keys), self.max_length)
        twin.keys, twin.values = list(self.keys), list(self.values)
        return twin

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values of every layer."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


# ---------------------------------------------------------------- attention over the cache


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The new queries attend to every cached position up to their own (chapter 07, exercise 2).

    q: ``(B, H, T_new, d)``, the queries of the newest ``T_new`` tokens; k, v: ``(B, H, T_total, d)``,
    the whole cache, those tokens included (last). New query i sits at position
    ``T_total - T_new + i``, so it may see keys ``0 .. T_total - T_new + i``: the causal mask is the
    bottom-right corner of the full one. In the decode step (``T_new = 1``) nothing is masked.
    ``fused=True`` runs PyTorch's attention kernel on the same mask, as the model does.
    """
    new, total = q.shape[-2], k.shape[-2]
    mask = None if new == 1 else causal_mask(total, q.device)[total - new:]
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return scaled_dot_product_attention(q, k, v, mask)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, kv_heads, T, d)`` → ``(B, kv_heads · n_rep, T, d)``: each key/value head serves ``n_rep`` query heads (chapter 07, exercise 4).

    Head g is repeated in place, ``[0, 0, 1, 1]`` for two heads and ``n_rep = 2``, so query heads
    ``g·n_rep .. (g+1)·n_rep - 1`` share key/value head g: the layout of Llama's ``repeat_kv`` and of
    :func:`pool_kv_heads`. (Tiling, ``[0, 1, 0, 1]``, pairs the wrong heads.)
    """
    if n_rep == 1:
        return x
    batch, heads, length, d_head = x.shape
    return x[:, :, None].expand(batch, heads, n_rep, length, d_head).reshape(batch, heads * n_rep, length, d_head)


def attend_with_cache(attn: nn.Module, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
    """One attention layer for new tokens ``x`` ``(B, T_new, d_model)``, reading and extending ``cache``.

    The module's own projections and rotary tables are used; the rotation angles start at the
    cache's length, because the new tokens sit after the cached ones (RoPE encodes absolute
    positions as rotations, so a token at position 130 must be rotated as position 130, not 0).
    """
    start, new = cache.length_at(layer), x.shape[1]
    n_kv_head = getattr(attn, "n_kv_head", attn.n_head)
    q = split_heads(attn.query(x), attn.n_head)
    k = split_heads(attn.key(x), n_kv_head)
    v = split_heads(attn.value(x), n_kv_head)
    if attn.rope:
        cos, sin = attn.rope_cos[start:start + new], attn.rope_sin[start:start + new]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.update(layer, k, v)  # the cache stores the kv heads only: that is GQA's saving
    n_rep = attn.n_head // n_kv_head
    out = cached_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), fused=attn.fused)
    return attn.out(merge_heads(out))


@torch.inference_mode()
def forward_with_cache(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits ``(B, T_new, vocab)`` for the new tokens ``ids`` ``(B, T_new)``, given the cached earlier ones (chapter 07).

    The course GPT's forward pass (:class:`utils.model.GPT`: pre-norm blocks, RMSNorm, SwiGLU, tied
    head) with one change: attention takes its keys and values from the cache, which this call
    extends by ``T_new`` positions. With an empty cache it is the prefill, and its logits equal
    ``model(ids)``'s.
    """
    config = model.config
    if not (config.prenorm and config.causal) or model.token_type_embedding is not None:
        raise ValueError("forward_with_cache runs pre-norm causal GPTs (the course GPT), not encoders or post-norm models.")
    start, new = cache.length, ids.shape[1]
    if start + new > config.context_length:
        raise ValueError(f"{start} cached + {new} new tokens exceed the model's context_length of "
                         f"{config.context_length}; use extend_context(model, length) for a longer window.")
    x = model.token_embedding(ids)
    if model.positions is not None:  # learned absolute positions, offset by the cache
        x = x + model.positions.weight[start:start + new]
    elif config.position == "sinusoidal":
        x = x + model.sinusoids[start:start + new]
    for layer, block in enumerate(model.blocks):
        x = x + attend_with_cache(block.attn, block.norm1(x), cache, layer)
        x = x + block.mlp(block.norm2(x))
    return model.lm_head(model.final_norm(x))


def extend_context(model, context_length: int):
    """A copy of ``model`` whose attention window is ``context_length`` tokens (chapter 07).

    Rotary positions have no table of learned vectors to run out of: the copy shares nothing but
    the weights' values and recomputes the rotation tables. Whether the model is any good beyond
    the length it was trained on is another matter (it is not, much); the benchmark uses this only
    to time generation of more tokens than the course model's 128, with and without the cache.
    """
    if model.config.position not in ("rope", "none"):
        raise ValueError(f"only rotary or no positions extend; this model uses {model.config.position!r} positions.")
    longer = copy.deepcopy(model)
    longer.config = dataclasses.replace(model.config, context_length=context_length)
    for block in longer.blocks:
        attn = block.attn
        if attn.rope:
            attn.rope_cos, attn.rope_sin = (t.to(attn.rope_cos.device) for t in
                                            rope_frequencies(context_length, attn.d_head, model.config.rope_base))
    return longer


# ---------------------------------------------------------------- generation with and without the cache


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:  # greedy: the most likely token, deterministic, so cached and uncached runs can be compared
        return logits.argmax(dim=-1, keepdim=True)
    return sample_next(logits, temperature, top_k, top_p, generator)


@torch.inference_mode()
def generate(model, ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             token_times: list[float] | None = None) -> torch.Tensor:
    """Extend ``ids`` ``(B, T)`` by ``max_new_tokens`` tokens, greedy when ``temperature`` is 0 (chapter 07).

    ``use_cache=False`` recomputes the whole sequence at every step, as chapter 05's loop does;
    ``use_cache=True`` runs one prefill over the prompt, then one single-token decode step per
    token. Both see the whole sequence, so it must fit the model's context (no sliding window:
    a window would make the two compute different things). ``token_times``, if given, receives the
    seconds elapsed after each new token.
    """
    model.eval()
    if ids.shape[1] + max_new_tokens - 1 > model.config.context_length:
        raise ValueError(f"{ids.shape[1]} prompt + {max_new_tokens} new tokens exceed the model's context_length of "
                         f"{model.config.context_length}; use extend_context(model, length) for a longer window.")
    cache = KVCache(len(model.blocks), model.config.context_length) if use_cache else None
    start, step_input = time.perf_counter(), ids
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = forward_with_cache(model, step_input, cache)[:, -1]
        else:
            logits = model(ids)[0][:, -1]
        next_id = _next_token(logits, temperature, top_k, top_p, generator)
        ids = torch.cat([ids, next_id], dim=1)
        step_input = next_id  # the cache holds everything before it
        if token_times is not None:
            if ids.is_cuda:  # kernels run asynchronously: wait for them, or the clock measures only their launch
                torch.cuda.synchronize()
            token_times.append(time.perf_counter() - start)
    return ids


# ---------------------------------------------------------------- grouped-query attention


def pool_kv_heads(weight: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Mean-pool a key or value projection from ``n_head`` heads to ``n_kv_head`` (chapter 07, exercise 5).

    ``weight`` is ``(n_head · d_head, ...)``, the ``nn.Linear`` layout (a bias is ``(n_head · d_head,)``):
    rows ``h·d_head .. (h+1)·d_head - 1`` produce head h. Consecutive heads form a group,
    ``n_head / n_kv_head`` of them, and the group's rows are averaged: the conversion of the GQA
    paper (Ainslie et al., 2023), which found mean-pooling the best starting point for uptraining.
    """
    if n_head % n_kv_head:
        raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}.")
    rest = weight.shape[1:]
    d_head = weight.shape[0] // n_head
    return weight.reshape(n_kv_head, n_head // n_kv_head, d_head, *rest).mean(dim=1).reshape(n_kv_head * d_head, *rest)


class GroupedQueryAttention(MultiHeadAttention):
    """Multi-head attention whose ``n_head`` query heads share ``n_kv_head`` key/value heads (chapter 07).

    The same module as :class:`utils.attention.MultiHeadAttention` with smaller key and value
    projections (``d_model → n_kv_head · d_head``); each key/value head is repeated for its group of
    query heads (:func:`repeat_kv`) before the usual attention. ``n_kv_head = 1`` is multi-query
    attention (MQA), ``n_kv_head = n_head`` plain multi-head attention.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, **kwargs):
        super().__init__(d_model, n_head, **kwargs)
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}.")
        self.n_kv_head = n_kv_head
        bias = self.query.bias is not None
        self.key = nn.Linear(d_model, n_kv_head * self.d_head, bias=bias)
        self.value = nn.Linear(d_model, n_kv_head * self.d_head, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        length, n_rep = x.shape[1], self.n_head // self.n_kv_head
        q = split_heads(self.query(x), self.n_head)
        k = split_heads(self.key(x), self.n_kv_head)
        v = split_heads(self.value(x), self.n_kv_head)
        if self.rope:
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if self.causal:
            causal = causal_mask(length, x.device)
            mask = causal if mask is None else mask & causal
        if self.fused and not return_weights:
            dropout = self.dropout if self.training else 0.0
            return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)))
        out, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
        out = self.out(merge_heads(out))
        return (out, weights) if return_weights else out


def to_grouped_query(model, n_kv_head: int):
    """A copy of the GPT ``model`` with every attention layer converted to ``n_kv_head`` key/value heads (chapter 07).

    Queries and the output projection are copied; keys and values are mean-pooled over each group of
    heads with :func:`pool_kv_heads`. No training: the loss rises, and a short uptraining brings
    most of it back (the GQA paper uptrains for 5 % of the original steps).
    """
    config = model.config
    converted = copy.deepcopy(model)
    for block in converted.blocks:
        old = block.attn
        new = GroupedQueryAttention(config.d_model, config.n_head, n_kv_head, causal=config.causal, bias=config.bias,
                                    rope=old.rope, rope_base=config.rope_base, max_length=config.context_length,
                                    dropout=config.dropout, fused=old.fused)
        new = new.to(old.query.weight.device, old.query.weight.dtype)
        with torch.no_grad():
            for name in ("query", "out"):
                getattr(new, name).load_state_dict(getattr(old, name).state_dict())
            for name in ("key", "value"):
                for param_name, param in getattr(old, name).named_parameters():
                    getattr(getattr(new, name), param_name).copy_(pool_kv_heads(param, config.n_head, n_kv_head))
        if old.rope:  # keep the (possibly extended) rotation tables of the model being converted
            new.rope_cos, new.rope_sin = old.rope_cos, old.rope_sin
        block.attn = new
    return converted


# ---------------------------------------------------------------- memory accounting


def kv_cache_bytes(n_layer: int, n_kv_head: int, d_head: int, context_length: int, batch_size: int = 1,
                   bytes_per_element: int = 2) -> int:
    """Bytes of a full KV cache (chapter 07, exercise 3).

    ``2`` (a key and a value) ``· n_layer · n_kv_head · d_head`` numbers per token, for every token of
    every sequence, at ``bytes_per_element`` each (2 for float16/bfloat16, 4 for float32).
    """
    return 2 * n_layer * n_kv_head * d_head * context_length * batch_size * bytes_per_element


@dataclass(frozen=True)
class AttentionShape:
    """What decides a model's KV-cache size, as its published configuration gives it."""

    name: str
    n_layer: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads: n_head for MHA, fewer for GQA, 1 for MQA
    d_head: int
    context_length: int  # the longest context the released model supports
    source: str

    @property
    def kind(self) -> str:
        return "MHA" if self.n_kv_head == self.n_head else "MQA" if self.n_kv_head == 1 else "GQA"

    def cache_bytes(self, tokens: int, batch_size: int = 1, bytes_per_element: int = 2) -> int:
        return kv_cache_bytes(self.n_layer, self.n_kv_head, self.d_head, tokens, batch_size, bytes_per_element)


# From each model's config.json on the Hugging Face hub (field names in the source note);
# d_head = hidden size / attention heads unless the config gives it.
PUBLISHED_MODELS: tuple[AttentionShape, ...] = (
    AttentionShape("GPT-2 (124M)", 12, 12, 12, 64, 1024,
                   "openai-community/gpt2: n_layer 12, n_head 12, n_embd 768, n_positions 1024"),
    AttentionShape("Falcon-7B", 32, 71, 1, 64, 2048,
                   "tiiuae/falcon-7b: num_hidden_layers 32, num_attention_heads 71, hidden_size 4544, "
                   "multi_query true (query_key_value has 4544 + 2·64 outputs)"),
    AttentionShape("Llama-2-7B", 32, 32, 32, 128, 4096,
                   "meta-llama/Llama-2-7b-hf: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 32, "
                   "hidden_size 4096, max_position_embeddings 4096"),
    AttentionShape("Llama-2-70B", 80, 64, 8, 128, 4096,
                   "meta-llama/Llama-2-70b-hf: num_hidden_layers 80, num_attention_heads 64, num_key_value_heads 8, "
                   "hidden_size 8192, max_position_embeddings 4096"),
    AttentionShape("Llama-3-8B", 32, 32, 8, 128, 8192,
                   "meta-llama/Meta-Llama-3-8B: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, "
                   "hidden_size 4096, max_position_embeddings 8192"),
    AttentionShape("Mistral-7B", 32, 32, 8, 128, 32768,
                   "mistralai/Mistral-7B-v0.1: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, "
                   "hidden_size 4096, max_position_embeddings 32768 (sliding_window 4096)"),
)


def attention_shape(model, name: str = "course GPT") -> AttentionShape:
    """The :class:`AttentionShape` of a course GPT (converted to GQA or not), for the same calculator."""
    attn = model.blocks[0].attn
    return AttentionShape(name, len(model.blocks), attn.n_head, getattr(attn, "n_kv_head", attn.n_head), attn.d_head,
                          model.config.context_length, "utils.model.GPTConfig")
