"""Checks for chapter 01, tokens and embeddings.

Each ``check_*`` compares the learner's function with the reference in :mod:`utils.tokenizers`
or :mod:`utils.embeddings` on seeded random inputs; ``seed`` and ``cases`` let the hidden tests
use inputs the visible ones never showed. The references are bound here, when the module is
imported, before any learner code runs.
"""

from __future__ import annotations

import string
from typing import Callable

import torch
import torch.nn.functional as F

from ..embeddings import embed_one_hot as _embed_one_hot
from ..tokenizers import bpe_encode as _bpe_encode
from ..tokenizers import count_pairs as _count_pairs
from ..tokenizers import decode_chars as _decode_chars
from ..tokenizers import encode_chars as _encode_chars
from ..tokenizers import merge_pair as _merge_pair
from ..tokenizers import train_bpe as _train_bpe
from .core import Case, CheckFailed, Forbidden, call_learner, check_function, expect

_ALPHABET = string.ascii_letters + string.digits + " .,;:!?'\n-é"


def _random_text(case: Case, low: int = 1, high: int = 60, alphabet: str = _ALPHABET) -> str:
    return "".join(case.rng.choice(alphabet) for _ in range(case.rng.randint(low, high)))


def _random_ids(case: Case, low: int = 0, high: int = 60, vocab: int = 6) -> list[int]:
    # A small vocabulary makes repeated pairs (and overlapping runs like 3, 3, 3) common.
    return [case.rng.randrange(vocab) for _ in range(case.rng.randint(low, high))]


# ---------------------------------------------------------------- exercise 1: characters


def check_char_tokenizer(encode_chars: Callable, decode_chars: Callable, cases: int = 6, seed: int = 1) -> None:
    """Exercise 1: ``encode_chars(text, vocab)`` and ``decode_chars(ids, vocab)``, and their round trip."""

    def inputs(case: Case) -> tuple:
        text = _random_text(case)
        vocab = sorted(set(text) | set(case.rng.sample(_ALPHABET, 5)))
        return text, vocab

    def ids_inputs(case: Case) -> tuple:
        text, vocab = inputs(case)
        return _encode_chars(text, vocab), vocab

    check_function(encode_chars, _encode_chars, inputs, cases=cases, seed=seed, quiet=True)
    check_function(decode_chars, _decode_chars, ids_inputs, cases=cases, seed=seed, quiet=True)
    for index in range(cases):
        text, vocab = inputs(Case(index, seed * 7 + index))
        if decode_chars(encode_chars(text, vocab), vocab) != text:
            raise CheckFailed(f"decode_chars(encode_chars(text)) did not give back the text for test input #{index + 1}.")
    print(f"✓ encode_chars and decode_chars: all {cases} test inputs match the reference and round-trip.")


# ---------------------------------------------------------------- exercise 2: pair counts


def check_count_pairs(count_pairs: Callable, cases: int = 6, seed: int = 2) -> None:
    """Exercise 2: ``count_pairs(ids)`` returns ``{(a, b): count}`` over adjacent pairs."""
    check_function(count_pairs, _count_pairs, lambda case: (_random_ids(case),), cases=cases, seed=seed)


# ---------------------------------------------------------------- exercise 3: merging a pair


def check_merge_pair(merge_pair: Callable, cases: int = 8, seed: int = 3) -> None:
    """Exercise 3: ``merge_pair(ids, pair, new_id)``, left to right, never overlapping."""

    def inputs(case: Case) -> tuple:
        ids = _random_ids(case, low=0, high=40, vocab=4)
        # Mostly a pair that occurs, sometimes one that does not.
        if len(ids) >= 2 and case.rng.random() < 0.8:
            i = case.rng.randrange(len(ids) - 1)
            pair = (ids[i], ids[i + 1])
        else:
            pair = (case.rng.randrange(4), case.rng.randrange(4))
        return ids, pair, 100 + case.index

    check_function(merge_pair, _merge_pair, inputs, cases=cases, seed=seed)


# ---------------------------------------------------------------- exercise 4: BPE encoding

_TRAINING_TEXT = (
    "the cat sat on the mat. the hat is on the cat, and that is that. "
    "these then thee thou that the other the thesis "
) * 3
_MERGES = _train_bpe(_TRAINING_TEXT, 256 + 40)


def check_bpe_encode(bpe_encode: Callable, cases: int = 8, seed: int = 4) -> None:
    """Exercise 4: ``bpe_encode(text, merges)`` applies merges earliest-learned first."""

    def inputs(case: Case) -> tuple:
        words = ["the", "that", "cat", "hat", "thesis", "other", "mat", "a", "é"]
        text = " ".join(case.rng.choice(words) for _ in range(case.rng.randint(0, 6)))
        return text, dict(_MERGES)

    check_function(bpe_encode, _bpe_encode, inputs, cases=cases, seed=seed)


# ---------------------------------------------------------------- exercise 5: one-hot embeddings

_EMBEDDING_SHORTCUTS = (
    Forbidden(F.embedding, "torch.nn.functional.embedding"),
    Forbidden(torch.index_select, "torch.index_select"),
    Forbidden(torch.Tensor.index_select, "Tensor.index_select"),
    Forbidden(torch.gather, "torch.gather"),
    Forbidden(torch.Tensor.gather, "Tensor.gather"),
    Forbidden(torch.take, "torch.take"),
    Forbidden(
        torch.Tensor.__getitem__,
        "indexing with a tensor of ids (weight[ids])",
        when=lambda args: len(args) > 1 and _holds_integer_tensor(args[1]),
    ),
)


def _holds_integer_tensor(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and not i.is_floating_point() and i.dtype != torch.bool for i in items)


def check_embed_one_hot(embed_one_hot: Callable, cases: int = 6, seed: int = 5) -> None:
    """Exercise 5: ``embed_one_hot(ids, weight)`` as a one-hot matrix product, no lookup shortcut."""

    def inputs(case: Case) -> tuple:
        vocab, dim = case.rng.randint(2, 30), case.rng.randint(1, 16)
        shape = [case.rng.randint(1, 5) for _ in range(case.rng.randint(1, 3))]
        dtype = torch.float64 if case.index % 3 == 2 else torch.float32
        return case.randint(0, vocab, shape), case.randn(vocab, dim, dtype=dtype)

    check_function(embed_one_hot, _embed_one_hot, inputs, cases=cases, seed=seed, forbidden=_EMBEDDING_SHORTCUTS)


def check_embedding_gradient(embed_one_hot: Callable, seed: int = 6) -> None:
    """Exercise 5, hidden: the gradient reaches ``weight`` exactly as it does through a lookup."""
    case = Case(0, seed)
    ids, weight = case.randint(0, 12, (3, 7)), case.randn(12, 5)
    upstream = case.randn(3, 7, 5)
    mine = weight.clone().requires_grad_(True)
    out = call_learner(embed_one_hot, (ids, mine), "embed_one_hot", "on the gradient test", _EMBEDDING_SHORTCUTS,
                       reference=_embed_one_hot)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailed("`embed_one_hot` returned a tensor that does not depend on `weight`, so no gradient reaches it.")
    (out * upstream).sum().backward()
    reference = weight.clone().requires_grad_(True)
    (_embed_one_hot(ids, reference) * upstream).sum().backward()
    expect(mine.grad, reference.grad, "The gradient of `embed_one_hot` with respect to `weight`")
    print("✓ embed_one_hot: the gradient reaches the weight matrix as through a lookup.")
