"""A FlashAttention forward kernel in Triton, for GPUs (chapter 08).

The same algorithm as :func:`utils.efficient_attention.tiled_attention`, written as one GPU kernel:
each program instance owns a block of ``BLOCK_M`` queries of one (batch, head), keeps them and
its running max, running sum and output accumulator in registers, and streams the keys and values
through in blocks of ``BLOCK_N`` with the online softmax. Scores never reach the GPU's main memory,
which is what makes FlashAttention fast: attention is limited by memory traffic, not arithmetic.

Triton is optional. It compiles for NVIDIA (and AMD) GPUs and ships with PyTorch's CUDA wheels and on
Colab; this module imports without it (``HAS_TRITON`` is then False) and :func:`available` says in
one sentence why the kernel cannot run. With ``TRITON_INTERPRET=1`` set before the import, Triton's
interpreter runs the kernel on CPU tensors with NumPy: slow, but it checks the kernel's logic without
a GPU (the course's tests do this when triton is installed).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package and the chapter work without it; the kernel needs it
    triton = None
    tl = None

HAS_TRITON = triton is not None
LOG2_E = 1.4426950408889634  # the kernel uses exp2, the GPU's native exponential: e^x = 2^(x · log2 e)


def interpreted() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def available(device: torch.device | str) -> tuple[bool, str]:
    """``(can run, one sentence why or why not)`` for the kernel on ``device`` (chapter 08)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not HAS_TRITON:
            return False, ("Triton is not installed here, so the kernel cannot be compiled (`pip install triton`; "
                           "Colab's GPU runtimes ship it).")
        return True, f"Triton {triton.__version__} compiles the kernel for {torch.cuda.get_device_name(device)}."
    if HAS_TRITON and interpreted():
        return True, "Triton's interpreter (TRITON_INTERPRET=1) runs the kernel with NumPy on the CPU, slowly."
    return False, (f"Triton compiles kernels for NVIDIA and AMD GPUs and this notebook runs on the {device.type}, so "
                   f"there is nothing to compile the kernel for; on a GPU runtime (in Colab: Runtime, Change runtime "
                   f"type, GPU) this cell runs it and compares it with PyTorch's scaled_dot_product_attention.")


# --- kernel begins
if HAS_TRITON:

    @triton.jit
    def _attend_to_block(acc, row_max, row_sum, q, K, V, start_n, offs_m, offs_n, offs_d, seq_len, qk_scale,
                         stride_kn, stride_kk, stride_vn, stride_vk, CAUSAL_MASK: tl.constexpr):
        """Fold one block of BLOCK_N keys into the running state: the online softmax, in log2 units."""
        cols = start_n + offs_n
        in_range = cols < seq_len
        k = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kk,  # Kᵀ: (HEAD_DIM, BLOCK_N)
                    mask=in_range[None, :], other=0.0)
        scores = tl.dot(q, k) * qk_scale                                           # (BLOCK_M, BLOCK_N), fp32
        keep = in_range[None, :]
        if CAUSAL_MASK:  # only the blocks that straddle the diagonal pay for the causal mask
            keep = keep & (cols[None, :] <= offs_m[:, None])
        scores = tl.where(keep, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)        # exp(old max - new max): what was summed shrinks to the new max
        weights = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(weights, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vk, mask=in_range[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        return acc, new_max, row_sum

    @triton.jit
    def _flash_attention_forward(Q, K, V, O,
                                 stride_qb, stride_qh, stride_qm, stride_qk,
                                 stride_kb, stride_kh, stride_kn, stride_kk,
                                 stride_vb, stride_vh, stride_vn, stride_vk,
                                 stride_ob, stride_oh, stride_om, stride_ok,
                                 n_heads, seq_len, qk_scale,
                                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head) against every key block they may see."""
        block_m = tl.program_id(0)
        batch_head = tl.program_id(1)
        batch = (batch_head // n_heads).to(tl.int64)  # 64-bit offsets: large batches overflow 32 bits
        head = (batch_head % n_heads).to(tl.int64)
        q_base = Q + batch * stride_qb + head * stride_qh
        k_base = K + batch * stride_kb + head * stride_kh
        v_base = V + batch * stride_vb + head * stride_vh
        o_base = O + batch * stride_ob + head * stride_oh

        offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                    mask=offs_m[:, None] < seq_len, other=0.0)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        if CAUSAL:
            # Key blocks wholly before this query block: every key visible, no mask to apply.
            for start_n in range(0, block_m * BLOCK_M, BLOCK_N):
                acc, row_max, row_sum = _attend_to_block(acc, row_max, row_sum, q, k_base, v_base, start_n, offs_m,
                                                         offs_n, offs_d, seq_len, qk_scale, stride_kn, stride_kk,
                                                         stride_vn, stride_vk, CAUSAL_MASK=False)
            # The blocks on the diagonal; the blocks after it are never loaded at all.
            for start_n in range(block_m * BLOCK_M, tl.minimum((block_m + 1) * BLOCK_M, seq_len), BLOCK_N):
                acc, row_max, row_sum = _attend_to_block(acc, row_max, row_sum, q, k_base, v_base, start_n, offs_m,
                                                         offs_n, offs_d, seq_len, qk_scale, stride_kn, stride_kk,
                                                         stride_vn, stride_vk, CAUSAL_MASK=True)
        else:
            for start_n in range(0, seq_len, BLOCK_N):
                acc, row_max, row_sum = _attend_to_block(acc, row_max, row_sum, q, k_base, v_base, start_n, offs_m,
                                                         offs_n, offs_d, seq_len, qk_scale, stride_kn, stride_kk,
                                                         stride_vn, stride_vk, CAUSAL_MASK=False)

        acc = acc / row_sum[:, None]
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok, acc.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < seq_len)

    # On a GPU the block sizes and pipeline depth are chosen by timing a few configurations once per
    # (length, head size, causal). BLOCK_M must be a multiple of BLOCK_N for the causal split above.
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=stages, num_warps=warps)
                for m in (64, 128) for n in (32, 64, 128) if m % n == 0
                for stages in (2, 3, 4) for warps in (4, 8)]
    _flash_attention_forward_tuned = triton.autotune(configs=_CONFIGS, key=["seq_len", "HEAD_DIM", "CAUSAL"])(
        _flash_attention_forward)
# --- kernel ends


def kernel_source() -> str:
    """The kernel's source text, to print in the notebook; works without triton installed."""
    text = Path(__file__).read_text()
    return text.split("# --- kernel begins\n", 1)[1].split("# --- kernel ends", 1)[0]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Attention of ``q, k, v`` ``(B, H, T, d)`` through the Triton kernel; ``d`` a power of two from 16 to 256.

    On a GPU the block sizes are autotuned unless given; under the interpreter they default to 16.
    Accumulates in float32 whatever the input dtype (bfloat16 on a GPU is the usual), and returns
    the input dtype. Same maths as ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)``.
    """
    if not HAS_TRITON:
        raise RuntimeError(available(q.device)[1])
    batch, heads, length, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have one shape (B, H, T, d); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"the head size must be a power of two from 16 to 256, got {head_dim}")
    out = torch.empty_like(q)
    args = (q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), heads, length,
            LOG2_E / math.sqrt(head_dim))
    if block_m is None and block_n is None and q.is_cuda and not interpreted():
        def grid(meta):
            return triton.cdiv(length, meta["BLOCK_M"]), batch * heads

        _flash_attention_forward_tuned[grid](*args, CAUSAL=causal, HEAD_DIM=head_dim)
        return out
    block_m, block_n = block_m or (64 if q.is_cuda else 16), block_n or (32 if q.is_cuda else 16)
    if block_m % block_n:
        raise ValueError(f"block_m ({block_m}) must be a multiple of block_n ({block_n})")
    _flash_attention_forward[(triton.cdiv(length, block_m), batch * heads)](
        *args, CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def compare_with_sdpa(batch: int = 4, heads: int = 32, length: int = 4096, head_dim: int = 64,
                      causal: bool = False, dtype: torch.dtype | None = None, seed: int = 0) -> dict:
    """Time the kernel against ``F.scaled_dot_product_attention`` on CUDA; their outputs' largest difference (chapter 08).

    ``dtype`` defaults to bfloat16 where the GPU computes in it (compute capability 8.0 and later,
    e.g. A100, H100; not Colab's T4) and float16 elsewhere. Times are medians of
    ``triton.testing.do_bench``; TFLOP/s count the two matrix products only, ``4·B·H·T²·d``, halved
    when causal (the work a kernel that skips masked blocks does). Returns a dict of the figures.
    """
    import torch.nn.functional as F
    import triton.testing

    from .efficient_attention import attention_flops

    if not torch.cuda.is_available():
        raise RuntimeError("compare_with_sdpa needs a CUDA GPU")
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype, generator=generator)
               for _ in range(3))
    ours = flash_attention(q, k, v, causal=causal)  # compiles and autotunes once
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    triton_ms = triton.testing.do_bench(lambda: flash_attention(q, k, v, causal=causal), return_mode="median")
    sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                      return_mode="median")
    flops = attention_flops(batch, heads, length, head_dim, causal=causal)
    return {
        "device": torch.cuda.get_device_name(), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
        "heads": heads, "length": length, "head_dim": head_dim, "causal": causal,
        "max_abs_diff": (ours.float() - reference.float()).abs().max().item(),
        "triton_ms": triton_ms, "sdpa_ms": sdpa_ms,
        "triton_tflops": flops / triton_ms / 1e9, "sdpa_tflops": flops / sdpa_ms / 1e9,
        "throughput_ratio": sdpa_ms / triton_ms,
    }
