"""Turning text into integers and back. Taught in chapter 01 (tokens and embeddings).

Two tokenizers, both reversible:

* a character tokenizer: the vocabulary is the sorted set of characters in the corpus;
* byte-pair encoding (BPE), byte-level as in GPT-2: start from the 256 byte values and
  repeatedly merge the most frequent adjacent pair into a new token.

``train_bpe`` counts pairs once and then updates the counts only in the words a merge touches,
which is what makes training on the whole corpus take seconds instead of minutes
(``benchmarks/bpe_training.py`` measures the difference).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

Pair = tuple[int, int]

# GPT-2's pre-tokenizer, written for Python's `re`: contractions, words with their leading space,
# digit runs, runs of everything else (punctuation, underscores, emoji), whitespace. BPE never
# merges across these chunk boundaries, so " the" becomes one token but "the." never does.
CHUNK_PATTERN = re.compile(
    r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""", re.UNICODE
)


# ---------------------------------------------------------------- character tokenizer


def build_char_vocab(text: str) -> list[str]:
    """The character vocabulary: every distinct character of ``text``, sorted. Chapter 01."""
    return sorted(set(text))


def encode_chars(text: str, vocab: Sequence[str]) -> list[int]:
    """Map each character of ``text`` to its index in ``vocab``. Chapter 01, exercise 1."""
    index_of = {ch: i for i, ch in enumerate(vocab)}
    return [index_of[ch] for ch in text]


def decode_chars(ids: Iterable[int], vocab: Sequence[str]) -> str:
    """Inverse of :func:`encode_chars`. Chapter 01, exercise 1."""
    return "".join(vocab[i] for i in ids)


@dataclass
class CharTokenizer:
    """A character-level tokenizer with a readable error for characters it has never seen."""

    vocab: list[str]

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(build_char_vocab(text))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise ValueError(
                f"The text contains {len(unknown)} character(s) the vocabulary has never seen, "
                f"e.g. {unknown[0]!r}; a character tokenizer can only encode characters from its training text."
            )
        return encode_chars(text, self.vocab)

    def decode(self, ids: Iterable[int]) -> str:
        return decode_chars(ids, self.vocab)


# ---------------------------------------------------------------- byte-pair encoding


def count_pairs(ids: Sequence[int]) -> dict[Pair, int]:
    """How often each adjacent pair occurs in ``ids``. Chapter 01, exercise 2.

    >>> count_pairs([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts: dict[Pair, int] = {}
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge_pair(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``. Chapter 01, exercise 3.

    Scans left to right and never reuses a token for two merges, so ``[7, 7, 7]`` with pair
    ``(7, 7)`` becomes ``[new_id, 7]``.
    """
    merged: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def bpe_encode(text: str, merges: dict[Pair, int]) -> list[int]:
    """Encode one chunk of text with learned merges. Chapter 01, exercise 4.

    Start from the UTF-8 bytes and apply merges in the order they were learned (lowest new id
    first): at each step merge the adjacent pair with the earliest merge, until none applies.
    """
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        pairs = count_pairs(ids)
        earliest = min(pairs, key=lambda p: merges.get(p, float("inf")))
        if earliest not in merges:
            break  # nothing left to merge
        ids = merge_pair(ids, earliest, merges[earliest])
    return ids


def split_into_chunks(text: str) -> list[str]:
    """Pre-tokenize ``text`` with :data:`CHUNK_PATTERN`; the chunks concatenate back to ``text``."""
    return CHUNK_PATTERN.findall(text)


def train_bpe(text: str, vocab_size: int, progress: bool = False) -> dict[Pair, int]:
    """Learn ``vocab_size - 256`` merges on ``text``; returns ``{pair: new_id}`` in merge order. Chapter 01.

    Ties between equally frequent pairs go to the smallest pair, so training is deterministic.
    """
    if vocab_size < 256:
        raise ValueError(f"A byte-level BPE vocabulary starts with 256 bytes; vocab_size={vocab_size} is smaller.")
    chunk_counts = Counter(split_into_chunks(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    word_freq = list(chunk_counts.values())

    # Pair counts weighted by how often each distinct chunk occurs, and which chunks hold each pair.
    pair_counts: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += word_freq[w]
            where[pair].add(w)

    merges: dict[Pair, int] = {}
    steps = range(256, vocab_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="BPE merges", unit="merge")
    for new_id in steps:
        if not pair_counts:
            break  # every chunk is a single token already
        best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        merges[best] = new_id
        # Only the chunks containing `best` change: remove their old pairs, add their new ones.
        for w in list(where[best]):
            old = words[w]
            new = merge_pair(old, best, new_id)
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= word_freq[w]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
                where[pair].discard(w)
            for pair in zip(new, new[1:]):
                pair_counts[pair] += word_freq[w]
                where[pair].add(w)
            words[w] = new
        where.pop(best, None)
    return merges


def vocab_from_merges(merges: dict[Pair, int]) -> dict[int, bytes]:
    """The bytes each token id stands for: the 256 bytes, then each merge's two halves joined."""
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), new_id in sorted(merges.items(), key=lambda item: item[1]):
        vocab[new_id] = vocab[a] + vocab[b]
    return vocab


@dataclass
class BPETokenizer:
    """Byte-level BPE: GPT-2's recipe at a size that trains on a laptop in seconds. Chapter 01."""

    merges: dict[Pair, int]
    vocab: dict[int, bytes] = field(init=False, repr=False)
    _cache: dict[str, list[int]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.vocab = vocab_from_merges(self.merges)

    @classmethod
    def train(cls, text: str, vocab_size: int, progress: bool = False) -> "BPETokenizer":
        return cls(train_bpe(text, vocab_size, progress=progress))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in split_into_chunks(text):
            if chunk not in self._cache:  # text repeats a lot: encode each distinct chunk once
                self._cache[chunk] = bpe_encode(chunk, self.merges)
            ids.extend(self._cache[chunk])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """A printable form of one token, e.g. ``' the'``, for tables and plots."""
        return self.vocab[token_id].decode("utf-8", errors="replace")
