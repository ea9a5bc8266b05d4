"""Attention at growing sequence lengths: naive, tiled, linear and PyTorch's fused kernel, time and peak memory.

    python benchmarks/attention.py                      # 256 to 8192 tokens, causal, 1 × 2 heads × d 64
    python benchmarks/attention.py --lengths 256 1024   # a quick run
    python benchmarks/attention.py --triton             # on a CUDA GPU: the Triton kernel against SDPA, bf16

The four methods, all causal, on the same random q, k, v of shape (batch, heads, T, head_dim):

* naive:  utils.efficient_attention.naive_attention, chapter 02's code: the whole T × T score matrix;
* tiled:  utils.efficient_attention.tiled_attention, FlashAttention's algorithm in plain PyTorch
          (online softmax over block_size × block_size tiles, tiles above the diagonal skipped);
* linear: utils.efficient_attention.chunked_linear_attention, φ = elu + 1 (a different model, not
          an approximation: its outputs are not compared);
* sdpa:   torch.nn.functional.scaled_dot_product_attention(is_causal=True), PyTorch's fused kernel.

Time: the fastest of --repeat calls after one warm-up call (utils.timing.best_of). On a machine busy
with other work, torch's worker threads wait for each other at every small operation, which slows the
tiled loop far more than the rest (on a loaded 2-core machine, 5.8 s with 2 threads against 32 ms
with 1, at 2048 tokens): measure on a quiet machine, or compare with --threads 1. Peak memory:
utils.efficient_attention.peak_memory, the memory a call needs at its peak above what was in use
before it (inputs already allocated): on CPU the process's peak resident memory (Linux VmHWM,
reset just before the call), on CUDA torch.cuda.max_memory_allocated. Every ratio printed compares
figures measured in this run. The tiled result is checked against the naive one at every length.

--triton needs a CUDA GPU and triton: it times utils.triton_attention.flash_attention against
F.scaled_dot_product_attention in bfloat16 (float16 before compute capability 8.0) at 4096 tokens,
head_dim 64, batch 4 × 32 heads, causal and not, and prints TFLOP/s (4·B·H·T²·d, halved when causal),
their ratio and the largest difference between the two outputs. Goals: within 1e-2 of SDPA, and at
least half its throughput.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from utils import efficient_attention as ea
from utils.device import pick
from utils.timing import best_of

MEMORY_GOAL = 8.0      # tiled attention's peak memory at the longest length, at least this many times below naive
TRITON_TOLERANCE = 1e-2
TRITON_THROUGHPUT_GOAL = 0.5

METHODS = {
    "naive": lambda q, k, v, args: ea.naive_attention(q, k, v, causal=True),
    "tiled": lambda q, k, v, args: ea.tiled_attention(q, k, v, causal=True, block_size=args.block_size),
    "linear": lambda q, k, v, args: ea.chunked_linear_attention(q, k, v, chunk_size=args.block_size),
    "sdpa": lambda q, k, v, args: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


def slope(lengths: list[int], values: list[float]) -> float:
    """The exponent b of a least-squares fit values ∝ lengths^b on log-log axes."""
    xs, ys = [math.log(x) for x in lengths], [math.log(max(y, 1e-12)) for y in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def measure(fn, inputs: tuple, args: argparse.Namespace, device: torch.device) -> tuple[float, int | None]:
    """(seconds of the fastest call after a warm-up, peak bytes of one more call) for ``fn(*inputs, args)``."""
    seconds = best_of(lambda: fn(*inputs, args), repeat=args.repeat, warmup=1)
    return seconds, ea.peak_memory(lambda: fn(*inputs, args), device)


def run_cpu(args: argparse.Namespace) -> None:
    device = pick()
    method = ea.peak_memory_method(device)
    print(f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, causal, float32; tiled block and "
          f"linear chunk {args.block_size}; best of {args.repeat} after a warm-up; {torch.get_num_threads()} threads")
    print(f"peak memory: {method or 'not measurable on this platform'}")
    times = {name: [] for name in METHODS}
    memory = {name: [] for name in METHODS}
    worst_difference = 0.0
    header = " ".join(f"{name + ' ms':>10}" for name in METHODS) + " " + " ".join(f"{name + ' MiB':>11}" for name in METHODS)
    print(f"{'tokens':>7} {header}")
    for length in args.lengths:
        generator = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(args.batch, args.heads, length, args.head_dim, generator=generator).to(device)
                   for _ in range(3))
        for name, fn in METHODS.items():
            seconds, peak = measure(fn, (q, k, v), args, device)
            times[name].append(seconds)
            memory[name].append(float("nan") if peak is None else peak / 2**20)
        difference = (METHODS["tiled"](q, k, v, args) - METHODS["naive"](q, k, v, args)).abs().max().item()
        worst_difference = max(worst_difference, difference)
        row = " ".join(f"{times[n][-1] * 1e3:10.1f}" for n in METHODS) + " " + " ".join(
            f"{memory[n][-1]:11.2f}" for n in METHODS)
        print(f"{length:7d} {row}", flush=True)
        del q, k, v

    longest = args.lengths[-1]
    print(f"\ntiled against naive attention: largest difference {worst_difference:.1e} over all lengths "
          f"({'within' if worst_difference <= 1e-5 else 'NOT within'} 1e-5)")
    if method is not None:
        ratio = memory["naive"][-1] / max(memory["tiled"][-1], 1e-9)
        verdict = "goal met" if ratio >= MEMORY_GOAL else "goal NOT met"
        print(f"peak memory at {longest} tokens: naive {memory['naive'][-1]:.1f} MiB, tiled {memory['tiled'][-1]:.1f} MiB, "
              f"linear {memory['linear'][-1]:.1f} MiB, sdpa {memory['sdpa'][-1]:.1f} MiB: tiled is {ratio:.0f}x below "
              f"naive ({verdict}: at least {MEMORY_GOAL:.0f}x)")
        print(f"time at {longest} tokens against naive: tiled {times['tiled'][-1] / times['naive'][-1]:.2f}x, "
              f"linear {times['linear'][-1] / times['naive'][-1]:.2f}x, sdpa {times['sdpa'][-1] / times['naive'][-1]:.2f}x "
              f"the naive time ({times['naive'][-1] * 1e3:.0f} ms)")
    if len(args.lengths) > 1:
        print("growth exponents b (value ∝ T^b, fitted over all lengths): "
              + ", ".join(f"{n} time {slope(args.lengths, times[n]):.2f}" for n in METHODS))
        if method is not None:
            print("                                                   "
                  + ", ".join(f"{n} memory {slope(args.lengths, memory[n]):.2f}" for n in METHODS))


def run_triton(args: argparse.Namespace) -> int:
    from utils import triton_attention

    ok, reason = triton_attention.available("cuda" if torch.cuda.is_available() else "cpu")
    if not ok or not torch.cuda.is_available():
        print(f"--triton needs a CUDA GPU: {reason}")
        return 2
    lengths = args.lengths if args.lengths_given else [4096]
    failed = False
    for causal in (False, True):
        for length in lengths:
            result = triton_attention.compare_with_sdpa(batch=args.triton_batch, heads=args.triton_heads,
                                                        length=length, head_dim=args.head_dim, causal=causal)
            close = result["max_abs_diff"] <= TRITON_TOLERANCE
            fast = result["throughput_ratio"] >= TRITON_THROUGHPUT_GOAL
            failed |= not close
            print(f"{result['device']}, {result['dtype']}, {'causal' if causal else 'not causal'}, "
                  f"{result['batch']}x{result['heads']} heads x {length} tokens x d {result['head_dim']}: "
                  f"triton {result['triton_ms']:.3f} ms = {result['triton_tflops']:.1f} TFLOP/s, "
                  f"sdpa {result['sdpa_ms']:.3f} ms = {result['sdpa_tflops']:.1f} TFLOP/s; "
                  f"ratio {result['throughput_ratio']:.2f}x SDPA's throughput "
                  f"({'goal met' if fast else 'goal NOT met'}: at least {TRITON_THROUGHPUT_GOAL}x); "
                  f"largest difference {result['max_abs_diff']:.1e} "
                  f"({'within' if close else 'NOT within'} {TRITON_TOLERANCE:g})", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths, ascending")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128, help="tiled attention's tile and linear attention's chunk")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement; the fastest counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 gives steadier times on a busy machine")
    parser.add_argument("--triton", action="store_true", help="CUDA: the Triton kernel against SDPA")
    parser.add_argument("--triton-batch", type=int, default=4)
    parser.add_argument("--triton-heads", type=int, default=32)
    args = parser.parse_args()
    args.lengths_given = args.lengths is not None
    args.lengths = sorted(args.lengths or [256, 512, 1024, 2048, 4096, 8192])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.triton:
        return run_triton(args)
    run_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
