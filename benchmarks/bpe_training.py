"""BPE training speed: the course's incremental trainer against recounting every pair each merge.

    python benchmarks/bpe_training.py [--merges 64]

Both trainers learn the same merges on the same training text (the chapter 01 corpus); the script
checks that they agree, then prints each one's time and the ratio, all measured in this run. It
then times the incremental trainer at the chapter's vocabulary sizes (512 and 2048 tokens).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from utils import data, tokenizers


def train_bpe_recount(text: str, vocab_size: int) -> dict[tuple[int, int], int]:
    """The textbook loop: after every merge, recount all pairs of all chunks (weighted by frequency)."""
    chunk_counts = Counter(tokenizers.split_into_chunks(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freq = list(chunk_counts.values())
    merges = {}
    for new_id in range(256, vocab_size):
        pair_counts: Counter = Counter()
        for ids, f in zip(words, freq):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += f
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        merges[best] = new_id
        words = [tokenizers.merge_pair(ids, best, new_id) for ids in words]
    return merges


def train_bpe_whole_text(text: str, vocab_size: int) -> dict[tuple[int, int], int]:
    """No pre-tokenization either: the whole text is one sequence, recounted after every merge."""
    ids = list(text.encode("utf-8"))
    merges = {}
    for new_id in range(256, vocab_size):
        pairs = tokenizers.count_pairs(ids)
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        merges[best] = new_id
        ids = tokenizers.merge_pair(ids, best, new_id)
    return merges


def seconds(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=256, help="merges for the head-to-head comparison")
    parser.add_argument("--whole-text-merges", type=int, default=8, help="merges for the slowest baseline")
    parser.add_argument("--vocab-sizes", default="512,2048", help="vocabulary sizes to time at full settings")
    args = parser.parse_args()

    train_text, val_text = data.train_val_split(data.load_shakespeare(verbose=False))
    print(f"training text: {len(train_text):,} characters")

    vocab_size = 256 + args.merges
    baseline_s, baseline = seconds(lambda: train_bpe_recount(train_text, vocab_size))
    course_s, course = seconds(lambda: tokenizers.train_bpe(train_text, vocab_size))
    assert course == baseline, "the incremental trainer learned different merges than the recount baseline"
    print(f"{args.merges} merges: recount every merge {baseline_s:.2f} s, incremental {course_s:.2f} s "
          f"-> {baseline_s / course_s:.1f}x faster, identical merges")

    few = args.whole_text_merges
    whole_s, _ = seconds(lambda: train_bpe_whole_text(train_text, 256 + few))
    few_s, _ = seconds(lambda: tokenizers.train_bpe(train_text, 256 + few))
    print(f"{few} merges without pre-tokenization: {whole_s / few:.2f} s per merge "
          f"(about {whole_s / few * args.merges / 60:.1f} min for {args.merges} merges); "
          f"incremental {few_s:.2f} s in all -> {whole_s / few_s:.0f}x faster")

    for vocab_size in (int(size) for size in args.vocab_sizes.split(",")):
        train_s, learned = seconds(lambda: tokenizers.train_bpe(train_text, vocab_size))
        tokenizer = tokenizers.BPETokenizer(learned)
        encode_s, ids = seconds(lambda: tokenizer.encode(val_text))
        assert tokenizer.decode(ids) == val_text
        print(f"vocabulary {vocab_size}: train {train_s:.2f} s, encode validation {encode_s:.2f} s, "
              f"compression {len(val_text) / len(ids):.2f} characters per token")


if __name__ == "__main__":
    main()
