"""Efficient attention: sparse masks, linear attention, tiled attention, and measuring memory (chapter 08).

Exact attention builds a ``(T, T)`` score matrix per head: its time and memory grow with the square
of the sequence length T. This module holds the three families of answers that chapter 08 teaches,
next to the tools that measure them:

* **sparse patterns** (``sliding_window_mask``, ``global_token_mask``, ``block_layout``,
  ``block_sparse_mask``, ``mask_density``): each query sees only some keys;
* **linear attention** (``elu_feature_map``, ``performer_feature_map``, ``linear_attention``,
  ``linear_attention_recurrent``, ``chunked_linear_attention``): a positive feature map replaces the
  softmax, so that ``φ(Q) (φ(K)ᵀ V)`` costs O(T) and a causal model becomes a recurrence;
* **tiled attention** (``online_softmax_update``, ``tiled_attention``): exact attention computed
  block by block with the online softmax, FlashAttention's algorithm in plain PyTorch, whose memory
  grows linearly with T;
* **measuring** (``peak_memory``, ``attention_flops``, ``naive_attention``).

Masks follow the course's convention (:mod:`utils.attention`): boolean, True where a query may
attend to a key. ``utils.attention.scaled_dot_product_attention`` is the exact reference every
method here is compared with. The Triton kernel of the chapter lives in :mod:`utils.triton_attention`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .attention import causal_mask, scaled_dot_product_attention

MINUS_INF = float("-inf")

# ---------------------------------------------------------------- the quadratic baseline


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Exact attention that materialises the whole ``(T_q, T_k)`` score matrix: chapter 02's code (chapter 08).

    The baseline every efficient method is measured against. ``causal`` needs ``T_q == T_k``.
    """
    mask = causal_mask(q.shape[-2], q.device) if causal else None
    return scaled_dot_product_attention(q, k, v, mask)


def attention_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool = False) -> float:
    """Floating-point operations of the two matrix products of attention, ``4 · B · H · T² · d`` (chapter 08).

    ``Q Kᵀ`` and ``P V`` each take ``2 · T² · d`` per head (a multiply and an add per term); the
    softmax is a lower-order term and, as in the FlashAttention papers, not counted. A causal mask
    leaves half the work, and a kernel that skips the masked blocks does only that half.
    """
    flops = 4.0 * batch * heads * length * length * head_dim
    return flops / 2 if causal else flops


# ---------------------------------------------------------------- sparse patterns


def sliding_window_mask(length: int, window: int, causal: bool = True,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``(length, length)`` mask: query i sees the keys fewer than ``window`` positions away (chapter 08).

    Causal (the default): keys ``i - window + 1 .. i``, so exactly ``window`` keys, itself included,
    once ``i >= window - 1`` (fewer at the start). Not causal: ``|i - j| < window``, the same reach on
    both sides. This is the local attention of Longformer and Mistral; a stack of L such layers lets
    information travel ``L · (window - 1)`` positions.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]  # query index minus key index
    allowed = distance.abs() < window
    return allowed & (distance >= 0) if causal else allowed


def global_token_mask(length: int, global_tokens: int | Sequence[int],
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``(length, length)`` mask: True in the rows and columns of the global tokens (chapter 08).

    A global token (an int n means the first n tokens, e.g. a [CLS] or a task prompt) attends to every
    token and every token attends to it, so any two tokens are at most two hops apart. Combine it
    with a local pattern by ``|``, and with a causal mask by ``&``.
    """
    is_global = torch.zeros(length, dtype=torch.bool, device=device)
    if isinstance(global_tokens, int):
        is_global[:global_tokens] = True
    else:
        is_global[torch.as_tensor(list(global_tokens), dtype=torch.long, device=device)] = True
    return is_global[:, None] | is_global[None, :]


def block_layout(n_blocks: int, local_blocks: int = 1, global_blocks: int = 1, random_blocks: int = 0,
                 causal: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """A BigBird-style ``(n_blocks, n_blocks)`` block pattern: local band, global blocks, random blocks (chapter 08).

    Block row r (queries of block r) keeps the ``local_blocks`` blocks on each side of the diagonal
    (the diagonal included), the first ``global_blocks`` block columns and rows, and
    ``random_blocks`` more block columns drawn with ``generator``. ``causal`` keeps only block
    columns ``<= r``. Expand it to a token mask with :func:`block_sparse_mask`.
    """
    index = torch.arange(n_blocks)
    distance = index[:, None] - index[None, :]
    layout = distance.abs() <= local_blocks
    layout |= (index[:, None] < global_blocks) | (index[None, :] < global_blocks)
    for row in range(n_blocks):
        if random_blocks <= 0:
            break
        allowed = row + 1 if causal else n_blocks
        picks = torch.randperm(allowed, generator=generator)[:random_blocks]
        layout[row, picks] = True
    return layout & (distance >= 0) if causal else layout


def block_sparse_mask(layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """Expand a ``(n_q_blocks, n_k_blocks)`` boolean block layout to a token mask (chapter 08).

    Token (i, j) is allowed when block ``(i // block_size, j // block_size)`` is: every layout entry
    becomes a ``block_size × block_size`` tile. A kernel works on whole tiles, which is why sparse
    attention in practice is block-sparse: a tile it may skip is work it never does.
    """
    return layout.bool().repeat_interleave(block_size, dim=0).repeat_interleave(block_size, dim=1)


def mask_density(mask: torch.Tensor) -> float:
    """The fraction of (query, key) pairs a mask allows: the fraction of the dense work left (chapter 08)."""
    return mask.float().mean().item()


# ---------------------------------------------------------------- linear attention


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1``, the positive feature map of Katharopoulos et al. (2020) (chapter 08).

    Positive everywhere (so the normaliser ``φ(q)·Σφ(k)`` never vanishes or changes sign), smooth,
    and as cheap as a ReLU. Linear attention with it is a different model from softmax attention,
    trained as such, not an approximation of it.
    """
    return F.elu(x) + 1


def performer_feature_map(head_dim: int, n_features: int,
                          generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Positive random features whose dot products estimate softmax attention's ``exp(q·k/√d)`` (chapter 08).

    Performer's FAVOR+ (Choromanski et al., 2021): with ``w ~ N(0, I)``,
    ``E[exp(w·x - |x|²/2) · exp(w·y - |y|²/2)] = exp(x·y)``. Scaling q and k by ``d^(-1/4)`` turns
    ``x·y`` into the attention score ``q·k/√d``, so ``linear_attention`` with this map approaches
    softmax attention as ``n_features`` grows (the error falls like ``1/√n_features``). Plain
    Gaussian projections; Performer's orthogonal ones lower the variance further.
    """
    projection = torch.randn(n_features, head_dim, generator=generator)

    def feature_map(x: torch.Tensor) -> torch.Tensor:
        x = x * head_dim ** -0.25
        w = projection.to(device=x.device, dtype=x.dtype)
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(n_features)

    return feature_map


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                     feature_map: Callable[[torch.Tensor], torch.Tensor] = elu_feature_map,
                     eps: float = 1e-6) -> torch.Tensor:
    """Attention with ``sim(q, k) = φ(q)·φ(k)`` in place of ``exp(q·k/√d)``: O(T) time and memory (chapter 08).

    ``out_i = φ(q_i)ᵀ S / (φ(q_i)·z + eps)`` with ``S = Σ_j φ(k_j) v_jᵀ`` (a ``(d, d_v)`` matrix) and
    ``z = Σ_j φ(k_j)``. Multiplying ``φ(K)ᵀ V`` first is what removes the ``(T, T)`` matrix.
    ``causal``: the sums run over ``j <= i`` only, as cumulative sums over time; this version keeps
    every prefix state ``S_i``, a ``(T, d, d_v)`` tensor, to stay a line of code
    (:func:`chunked_linear_attention` computes the same without it).
    """
    phi_q, phi_k = feature_map(q), feature_map(k)
    if not causal:
        state = phi_k.transpose(-2, -1) @ v                      # (..., d, d_v)
        normaliser = phi_k.sum(dim=-2)                           # (..., d)
        numerator = phi_q @ state
        denominator = (phi_q * normaliser[..., None, :]).sum(-1, keepdim=True)
        return numerator / (denominator + eps)
    states = torch.cumsum(phi_k[..., :, None] * v[..., None, :], dim=-3)   # (..., T, d, d_v): S_1 .. S_T
    normalisers = torch.cumsum(phi_k, dim=-2)                                # (..., T, d): z_1 .. z_T
    numerator = (phi_q[..., None, :] @ states).squeeze(-2)
    denominator = (phi_q * normalisers).sum(-1, keepdim=True)
    return numerator / (denominator + eps)


def linear_attention_weights(q: torch.Tensor, k: torch.Tensor,
                             feature_map: Callable[[torch.Tensor], torch.Tensor] = elu_feature_map,
                             causal: bool = False) -> torch.Tensor:
    """The ``(T_q, T_k)`` weights linear attention implies, ``φ(q_i)·φ(k_j) / Σ_j' φ(q_i)·φ(k_j')`` (chapter 08).

    Linear attention never builds this matrix; this function does, to compare it with softmax
    attention's weights (a diagnostic for short sequences, quadratic like exact attention).
    """
    weights = feature_map(q) @ feature_map(k).transpose(-2, -1)
    if causal:
        weights = weights * causal_mask(q.shape[-2], q.device)
    return weights / weights.sum(-1, keepdim=True)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               feature_map: Callable[[torch.Tensor], torch.Tensor] = elu_feature_map,
                               eps: float = 1e-6, state: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Causal linear attention as a recurrent network, one token at a time (chapter 08).

    The state after token t is ``(S_t, z_t)``: ``S_t = S_{t-1} + φ(k_t) v_tᵀ`` and
    ``z_t = z_{t-1} + φ(k_t)``; the output reads it with ``φ(q_t)``. Its size, ``d × d_v + d`` per
    head, does not depend on t, unlike a KV cache, which holds ``2 · t · d`` numbers. Returns
    ``(out, (S, z))``; pass the state back in to continue a sequence.
    """
    phi_q, phi_k = feature_map(q), feature_map(k)
    if state is None:
        S = phi_k.new_zeros(*phi_k.shape[:-2], phi_k.shape[-1], v.shape[-1])
        z = phi_k.new_zeros(*phi_k.shape[:-2], phi_k.shape[-1])
    else:
        S, z = state
    outputs = []
    for t in range(q.shape[-2]):
        S = S + phi_k[..., t, :, None] * v[..., t, None, :]
        z = z + phi_k[..., t, :]
        numerator = (phi_q[..., t, None, :] @ S).squeeze(-2)
        outputs.append(numerator / ((phi_q[..., t, :] * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outputs, dim=-2), (S, z)


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64,
                             feature_map: Callable[[torch.Tensor], torch.Tensor] = elu_feature_map,
                             eps: float = 1e-6) -> torch.Tensor:
    """Causal linear attention, chunk by chunk: the fast form, with O(T) memory (chapter 08).

    Inside a chunk of C tokens the causal sums are a small masked ``(C, C)`` product; the chunks
    before it enter through the running state ``(S, z)``, carried as in the recurrent form. Same
    result as ``linear_attention(..., causal=True)``, without its ``(T, d, d_v)`` prefix states and
    without the recurrent form's T Python steps. Mamba-2 and the gated linear-attention kernels
    use this same split.
    """
    phi_q, phi_k = feature_map(q), feature_map(k)
    S = phi_k.new_zeros(*phi_k.shape[:-2], phi_k.shape[-1], v.shape[-1])
    z = phi_k.new_zeros(*phi_k.shape[:-2], 1, phi_k.shape[-1])
    within = causal_mask(chunk_size, q.device)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, q.shape[-2], chunk_size):
        end = min(start + chunk_size, q.shape[-2])
        fq, fk, vc = phi_q[..., start:end, :], phi_k[..., start:end, :], v[..., start:end, :]
        scores = (fq @ fk.transpose(-2, -1)) * within[:end - start, :end - start]  # (C, C), causal inside
        numerator = fq @ S + scores @ vc
        denominator = (fq * z).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True)
        out[..., start:end, :] = numerator / (denominator + eps)
        S = S + fk.transpose(-2, -1) @ vc
        z = z + fk.sum(dim=-2, keepdim=True)
    return out


# ---------------------------------------------------------------- tiled attention with the online softmax


def online_softmax_update(row_max: torch.Tensor, row_sum: torch.Tensor, out: torch.Tensor,
                          scores: torch.Tensor, values: torch.Tensor):
    """Fold one block of keys into a running softmax-weighted sum (chapter 08).

    The state of each query row after some blocks: ``row_max`` m ``(..., T_q, 1)``, the largest score
    so far; ``row_sum`` ℓ ``(..., T_q, 1)``, ``Σ exp(s_j - m)``; ``out`` ``(..., T_q, d_v)``,
    ``Σ exp(s_j - m) v_j``, not yet divided by ℓ. For a new block of ``scores`` ``(..., T_q, B)``
    (may hold -inf: masked keys) and ``values`` ``(..., B, d_v)``:

        m' = max(m, max_j s_j)
        ℓ' = exp(m - m') ℓ + Σ_j exp(s_j - m')
        o' = exp(m - m') o + Σ_j exp(s_j - m') v_j

    The factor ``exp(m - m')`` rescales what was summed relative to the old maximum so that it is
    relative to the new one. After the last block ``out / row_sum`` is exactly softmax attention.
    Start from ``m = -inf, ℓ = 0, o = 0``; a row that has seen only -inf scores keeps that state.
    """
    new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
    # A row with every score -inf so far has new_max -inf: use 0 there, so exp gives 0, never NaN.
    safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
    rescale = torch.exp(row_max - safe_max)
    weights = torch.exp(scores - safe_max)
    row_sum = rescale * row_sum + weights.sum(dim=-1, keepdim=True)
    out = rescale * out + weights @ values
    return new_max, row_sum, out


def _block_allowed(q_start: int, q_end: int, k_start: int, k_end: int, causal: bool, window: int | None,
                   device) -> torch.Tensor | None:
    """The mask of one (query block, key block) tile, or None when every pair in it is allowed."""
    if not causal and window is None:
        return None
    distance = torch.arange(q_start, q_end, device=device)[:, None] - torch.arange(k_start, k_end, device=device)[None, :]
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if causal:
        allowed &= distance >= 0
    if window is not None:
        allowed &= distance.abs() < window
    return None if bool(allowed.all()) else allowed


def _block_skipped(q_start: int, q_end: int, k_start: int, k_end: int, causal: bool, window: int | None) -> bool:
    """True when no query of the tile may see any key of it: the tile is never computed."""
    if causal and k_start > q_end - 1:                           # every key after every query
        return True
    if window is not None:
        nearest = max(0, k_start - (q_end - 1), q_start - (k_end - 1))  # smallest |i - j| in the tile
        return nearest >= window
    return False


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    block_size: int = 128, window: int | None = None) -> torch.Tensor:
    """Exact attention computed tile by tile with the online softmax: FlashAttention's forward (chapter 08).

    For each block of ``block_size`` queries, walk over the blocks of keys, compute that tile's
    scores, and fold them in with :func:`online_softmax_update`; divide by the running sum at the
    end. No ``(T, T)`` matrix ever exists: the largest temporary is one ``block_size × block_size``
    tile per head, so memory grows linearly with T. Tiles that the causal mask or the sliding
    ``window`` (the rule of :func:`sliding_window_mask`) hides entirely are skipped, which is where
    sparse attention saves time. Equal to ``utils.attention.scaled_dot_product_attention`` with the
    same mask up to float rounding. ``causal`` and ``window`` need ``T_q == T_k``.

    FlashAttention does the same inside one GPU kernel, with a tile in on-chip memory; here every
    tile is a few PyTorch calls, so Python's loop costs time at small sizes.
    """
    length_q, length_k = q.shape[-2], k.shape[-2]
    if (causal or window is not None) and length_q != length_k:
        raise ValueError("causal and window masks need as many queries as keys")
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    for q_start in range(0, length_q, block_size):
        q_end = min(q_start + block_size, length_q)
        q_block = q[..., q_start:q_end, :] * scale
        row_max = torch.full((*q_block.shape[:-1], 1), MINUS_INF, dtype=q.dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(*q_block.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        for k_start in range(0, length_k, block_size):
            k_end = min(k_start + block_size, length_k)
            if _block_skipped(q_start, q_end, k_start, k_end, causal, window):
                continue
            scores = q_block @ k[..., k_start:k_end, :].transpose(-2, -1)
            allowed = _block_allowed(q_start, q_end, k_start, k_end, causal, window, q.device)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, MINUS_INF)
            row_max, row_sum, acc = online_softmax_update(row_max, row_sum, acc, scores, v[..., k_start:k_end, :])
        # A query that may see no key at all (only possible with odd masks) gets zeros, like utils.attention.softmax.
        out[..., q_start:q_end, :] = acc / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return out


def tiles_computed(length: int, block_size: int, causal: bool = False, window: int | None = None) -> tuple[int, int]:
    """``(computed, total)``: how many of the ``(T / block_size)²`` tiles :func:`tiled_attention` computes (chapter 08)."""
    starts = range(0, length, block_size)
    total = computed = 0
    for q_start in starts:
        for k_start in starts:
            total += 1
            computed += not _block_skipped(q_start, min(q_start + block_size, length), k_start,
                                           min(k_start + block_size, length), causal, window)
    return computed, total


# ---------------------------------------------------------------- peak memory


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _process_memory(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS: resident now, VmHWM: its peak) in bytes."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024


def peak_memory_method(device: torch.device | str = "cpu") -> str | None:
    """How :func:`peak_memory` measures on ``device``, in words, or None where it cannot (chapter 08)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, above what was allocated before the call"
    if device.type != "cpu":
        return None
    try:
        _process_memory("VmHWM")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except (OSError, AttributeError):
        return None
    return ("peak resident memory of this process (Linux VmHWM, reset through /proc/self/clear_refs) above "
            "the resident memory just before the call, after returning freed heap pages with malloc_trim")


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Bytes of memory ``fn()`` needs at its peak beyond what was in use before it (chapter 08).

    On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. On CPU PyTorch keeps no
    such statistic, so on Linux this reads the process's peak resident memory (``VmHWM``), reset to
    the current level just before the call: it sees every page the call touches, the tensors the
    algorithm materialises and the library's own buffers alike, to a page (4 KiB) plus some noise of
    a few hundred KiB. The result of ``fn`` is freed before measuring ends, so it counts only while
    it is being made. Returns None where neither works (macOS, Windows, MPS): see
    :func:`peak_memory_method`. Run ``fn`` once before measuring, so that one-time set-up (thread
    pools, lazy initialisation) is not counted.
    """
    device = torch.device(device)
    if peak_memory_method(device) is None:
        return None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # give freed heap pages back, so that reusing them counts as new memory
    before = _process_memory("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    result = fn()
    del result
    return max(0, _process_memory("VmHWM") - before)
