"""Generating with and without a KV cache: the chapter-05 course model, greedy, 512 new tokens.

    python benchmarks/kv_cache.py                         # 512 tokens after a 16-token prompt, best of 3
    python benchmarks/kv_cache.py --tokens 32 --repeat 1  # a quick smoke run (figures then mean little)
    python benchmarks/kv_cache.py --threads 1             # one CPU thread: steadier when other work shares the CPU

What is compared. Both sides run the same weights, the course model of chapter 05, and generate
greedily (the most likely token at every step), so they must produce the same tokens; the script
asserts that they do before it prints any time.

* without the cache: every step runs the model over the whole sequence so far and keeps the last
  position's logits (chapter 05's loop, ``utils.kv_cache.generate(use_cache=False)``);
* with the cache: one prefill over the prompt, then one single-token decode step per new token
  (``utils.kv_cache.generate(use_cache=True)``).

The policy beyond the context. The course model was trained with a 128-token window, and
16 + 512 tokens do not fit in it. Chapter 05's loop would slide the window (recompute the last
128 tokens), and a cache cannot reproduce that exactly: a cached key was computed when the tokens
before it were still in view. So neither side slides: the model's window is extended to
prompt + tokens positions with ``utils.kv_cache.extend_context`` (rotary positions have no table
to run out of; the text degrades beyond 128 tokens, the arithmetic being timed does not change)
and both sides attend to the whole sequence. The cost per token grows with the sequence without
a cache (quadratic in total) and stays almost flat with it.

Times are the best of ``--repeat`` runs (wall clock, ``time.perf_counter``); ratios are between
figures measured in this run. Then the memory side: the cache of the course model and of its
grouped-query conversions, measured from the tensors and checked against the formula.
"""

from __future__ import annotations

import argparse
import time

import torch

from utils.kv_cache import (
    KVCache,
    extend_context,
    forward_with_cache,
    generate,
    kv_cache_bytes,
    to_grouped_query,
)
from utils.train import corpus_tensors, course_model


def timed_generation(model, prompt: torch.Tensor, tokens: int, use_cache: bool, repeat: int):
    """The best of ``repeat`` runs: ``(ids, seconds after each new token)``."""
    best_ids, best_times = None, None
    for _ in range(repeat):
        token_times: list[float] = []
        ids = generate(model, prompt, tokens, use_cache=use_cache, token_times=token_times)
        if best_times is None or token_times[-1] < best_times[-1]:
            best_ids, best_times = ids, token_times
    return best_ids, best_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="new tokens to generate")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens (from the validation text)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the fastest counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = course_model(verbose=False)
    _, val_data, tokenizer = corpus_tensors()
    prompt = val_data[:args.prompt][None]
    window = args.prompt + args.tokens
    longer = extend_context(model, window) if window > model.config.context_length else model
    print(f"course model: {sum(p.numel() for p in model.parameters()):,} parameters, trained window "
          f"{model.config.context_length}; benchmark window {longer.config.context_length} "
          f"(prompt {args.prompt} + {args.tokens} new tokens), greedy, CPU threads: {torch.get_num_threads()}")

    generate(longer, prompt, 8, use_cache=True)  # warm-up: first calls allocate and pick kernels
    generate(longer, prompt, 8, use_cache=False)
    plain_ids, plain_times = timed_generation(longer, prompt, args.tokens, False, args.repeat)
    cached_ids, cached_times = timed_generation(longer, prompt, args.tokens, True, args.repeat)
    if not torch.equal(plain_ids, cached_ids):
        first = int((plain_ids != cached_ids).nonzero()[0, 1]) - args.prompt
        raise SystemExit(f"the cached and uncached runs differ from new token {first} on: the cache is wrong")
    print(f"identical tokens with and without the cache: all {args.tokens} of them")
    print(f"sample: {tokenizer.decode(cached_ids[0, args.prompt:args.prompt + 80].tolist())!r}")

    print(f"\n{'generated':>10} {'no cache':>10} {'KV cache':>10} {'no cache':>12} {'KV cache':>12} {'speed-up':>9}")
    print(f"{'tokens':>10} {'s':>10} {'s':>10} {'tokens/s':>12} {'tokens/s':>12} {'':>9}")
    lengths = sorted({n for n in (32, 64, 128, 256, 512, 1024) if n < args.tokens} | {args.tokens})
    for n in lengths:
        plain, cached = plain_times[n - 1], cached_times[n - 1]
        print(f"{n:>10} {plain:>10.3f} {cached:>10.3f} {n / plain:>12,.0f} {n / cached:>12,.0f} {plain / cached:>8.1f}x")
    ratio = plain_times[-1] / cached_times[-1]
    print(f"\n{args.tokens} tokens: {ratio:.1f}x faster with the KV cache "
          f"({plain_times[-1]:.2f} s without, {cached_times[-1]:.2f} s with)")

    # Where the time goes with the cache: the prefill is one wide forward pass, each decode step a thin one.
    best_prefill, best_step = float("inf"), float("inf")
    for _ in range(max(args.repeat, 3)):
        cache = KVCache(len(longer.blocks))
        start = time.perf_counter()
        forward_with_cache(longer, prompt, cache)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        start = time.perf_counter()
        forward_with_cache(longer, prompt[:, :1], cache)
        best_step = min(best_step, time.perf_counter() - start)
    print(f"prefill of {args.prompt} tokens: {best_prefill * 1e3:.2f} ms ({args.prompt / best_prefill:,.0f} tokens/s); "
          f"one decode step: {best_step * 1e3:.2f} ms ({1 / best_step:,.0f} tokens/s); "
          f"uncached step at {window - 1} tokens: {(plain_times[-1] - plain_times[-2]) * 1e3:.2f} ms")

    # Memory: what grouped-query attention saves, measured from the cache tensors after a prefill.
    context = model.config.context_length
    ids = val_data[:context][None]
    print(f"\nKV cache of one {context}-token sequence in float32, course model ({len(model.blocks)} layers, "
          f"d_head {model.blocks[0].attn.d_head}):")
    full_bytes = None
    for n_kv_head in (model.config.n_head, 2, 1):
        converted = model if n_kv_head == model.config.n_head else to_grouped_query(model, n_kv_head)
        cache = KVCache(len(converted.blocks))
        forward_with_cache(converted, ids, cache)
        formula = kv_cache_bytes(len(model.blocks), n_kv_head, model.blocks[0].attn.d_head, context, 1, 4)
        assert cache.nbytes() == formula, (cache.nbytes(), formula)
        full_bytes = full_bytes or cache.nbytes()
        kind = "multi-head" if n_kv_head == model.config.n_head else "multi-query" if n_kv_head == 1 else "grouped-query"
        print(f"  {kind:>13}, kv heads {n_kv_head}: {cache.nbytes():>9,} bytes, {full_bytes / cache.nbytes():.0f}x "
              f"less than multi-head; equal to the formula")


if __name__ == "__main__":
    main()
