"""Checks for chapter 07, fast generation: the KV cache, attention over it, its size, and grouped-query attention.

Each ``check_*`` compares the learner's function with the reference in :mod:`utils.kv_cache` on
seeded random inputs; ``seed`` and ``cases`` let the hidden tests use inputs the visible ones never
showed. The references are bound here, when the module is imported, before any learner code runs.

A cache that grows wrongly is named in one sentence: appended along the wrong axis, appended
twice, never appended, overwritten instead of extended, new entries put first, keys and values
swapped. So are the classic slips of the other exercises: a causal mask aligned to the wrong
corner of the cache, tiled instead of repeated heads, strided instead of consecutive groups, a
sum instead of a mean, a cache size without the factor 2 for keys and values.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..attention import scaled_dot_product_attention as _attention
from ..kv_cache import cached_attention as _cached_attention
from ..kv_cache import kv_cache_bytes as _kv_cache_bytes
from ..kv_cache import pool_kv_heads as _pool_kv_heads
from ..kv_cache import repeat_kv as _repeat_kv
from ..kv_cache import update_kv_cache as _update_kv_cache
from .core import (
    Case,
    CheckFailed,
    Forbidden,
    call_learner,
    check_function,
    describe,
    difference,
)
from .core import function_name as _name

_FLOAT32_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}  # different but correct orders of float32 sums differ by ~1e-6


def _run(fn: Callable, args: tuple, name: str, label: str, reference: Callable, forbidden: tuple = ()):
    """The learner's result on a private copy of ``args``; exceptions and shortcuts become one sentence."""
    return call_learner(fn, copy.deepcopy(args), name, label, forbidden, reference=reference)


# ---------------------------------------------------------------- exercise 1: updating the cache


def _cache_steps(case: Case) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A prefilled cache ``(B, H, P, d)`` and a few updates: single decode tokens and a chunk or two.

    Every size differs from the others (batch, heads, positions, features), so a concatenation along
    the wrong axis shows as a shape, and the first update is the usual decode step of one token.
    """
    batch, heads = case.rng.choice([(1, 2), (2, 3), (3, 2), (2, 4)])
    d_head = case.rng.choice([5, 6, 8])
    prefill = case.rng.randint(7, 11)  # larger than batch, heads and any chunk: lengths cannot be mistaken
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    k = case.randn(batch, heads, prefill, d_head, dtype=dtype)
    v = case.randn(batch, heads, prefill, d_head, dtype=dtype)
    sizes = [1, 1, case.rng.randint(2, 4), 1]
    steps = [(case.randn(batch, heads, n, d_head, dtype=dtype), case.randn(batch, heads, n, d_head, dtype=dtype))
             for n in sizes]
    return k, v, steps


def _axis_name(axis: int) -> str:
    return ["batch (0)", "heads (1)", "time (2)", "feature (3)"][axis]


def _growth_hint(got, old: torch.Tensor, new: torch.Tensor, which: str, other_expected: torch.Tensor) -> str | None:
    """Name the way a cache grew wrongly, comparing ``got`` with what each classic mistake returns."""
    if not isinstance(got, torch.Tensor) or got.dim() != 4 or got.dtype != old.dtype:
        return None
    expected, n = torch.cat([old, new], dim=2), new.shape[2]
    if got.shape == old.shape and torch.equal(got, old):
        return (f"returned the {which} cache unchanged: the new {which} were never appended, so later tokens "
                f"could not attend to this one")
    if got.shape == new.shape and torch.equal(got, new):
        return (f"returned only the new {which}: the cache was overwritten instead of extended; concatenate "
                f"the cached and the new {which}")
    if got.shape == old.shape and torch.equal(got[:, :, :-n], old[:, :, :-n]) and torch.equal(got[:, :, -n:], new):
        return (f"wrote the new {which} over the last cached positions instead of appending them: the cache must "
                f"grow by {n} position{'s' if n > 1 else ''}")
    if got.shape[2] == old.shape[2] + 2 * n and torch.equal(got, torch.cat([old, new, new], dim=2)):
        return f"appended the new {which} twice: the cache grew by {2 * n} positions instead of {n}"
    if tuple(got.shape) != tuple(expected.shape):
        grown = [a for a in range(4) if got.shape[a] != old.shape[a]]
        if len(grown) == 1 and grown[0] != 2:
            return (f"appended along the {_axis_name(grown[0])} axis instead of the time axis (2) of "
                    f"(B, heads, T, d_head): the cache must grow by one position per token")
        return (f"returned a {which} cache of shape {tuple(got.shape)} where {tuple(expected.shape)} was expected "
                f"(the cached {old.shape[2]} positions plus the {n} new ones)")
    if torch.equal(got, torch.cat([new, old], dim=2)):
        return f"put the new {which} before the cached ones: append at the end, so that positions stay oldest first"
    if got.shape == other_expected.shape and torch.equal(got, other_expected):
        return f"returned the {'values' if which == 'keys' else 'keys'} where the {which} belong: return (keys, values)"
    return None


def _run_update(fn: Callable, args: tuple, name: str, label: str):
    """``_run``, with torch.cat's complaint about mismatched sizes turned into the axis it was asked to join."""
    try:
        return _run(fn, args, name, label, _update_kv_cache)
    except CheckFailed as failure:
        cause = failure.__cause__
        found = re.search(r"must match except in dimension (-?\d)", str(cause)) if isinstance(cause, RuntimeError) else None
        if found is None or int(found.group(1)) % 4 == 2:
            raise
        axis = int(found.group(1)) % 4
        raise CheckFailed(f"`{name}` concatenated along the {_axis_name(axis)} axis instead of the time axis (2) of "
                          f"(B, heads, T, d_head) {label}: the cache grows by one position per token.") from cause


def check_update_kv_cache(update_kv_cache: Callable, cases: int = 4, seed: int = 1) -> None:
    """Exercise 1: ``update_kv_cache(cache_k, cache_v, k_new, v_new)`` appends along the time axis, every step."""
    name = _name(update_kv_cache, "update_kv_cache")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        cache_k, cache_v, steps = _cache_steps(case)
        for step, (k_new, v_new) in enumerate(steps, start=1):
            label = (f"at update #{step} of test input #{index + 1} (a cache of {describe(cache_k)}, "
                     f"new keys {describe(k_new)})")
            args = (cache_k, cache_v, k_new, v_new)
            got = _run_update(update_kv_cache, args, name, label)
            expected = _update_kv_cache(*args)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise CheckFailed(f"`{name}` returned {describe(got)} {label}; return the pair (keys, values) "
                                  f"of the whole cache.")
            for which, mine, right, old, new, other in (("keys", got[0], expected[0], cache_k, k_new, expected[1]),
                                                        ("values", got[1], expected[1], cache_v, v_new, expected[0])):
                found = difference(mine, right, atol=0, rtol=0)
                if found is None:
                    continue
                hint = _growth_hint(mine, old, new, which, other)
                raise CheckFailed(f"`{name}` {hint} {label}." if hint else f"`{name}` returned {which} with {found} {label}.")
            cache_k, cache_v = expected  # the next update starts from the right cache
    print(f"✓ {name}: the cache grows by exactly the new positions, oldest first, over {cases} runs of "
          f"{len(steps)} updates each.")


def check_update_kv_cache_from_empty(update_kv_cache: Callable) -> None:
    """Exercise 1, hidden: the first update of an empty cache (0 positions) is the prefill."""
    name = _name(update_kv_cache, "update_kv_cache")
    case = Case(0, 7001)
    empty = torch.zeros(2, 3, 0, 4)
    k_new, v_new = case.randn(2, 3, 5, 4), case.randn(2, 3, 5, 4)
    label = "when the cache is empty (0 positions) and 5 prompt positions arrive"
    got = _run(update_kv_cache, (empty, empty.clone(), k_new, v_new), name, label, _update_kv_cache)
    found = difference(got, (k_new, v_new), atol=0, rtol=0)
    if found:
        raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: an empty cache becomes the prompt's keys and values.")


# ---------------------------------------------------------------- exercise 2: attention over the cache


def _cached_attention_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New queries and the whole cache; every other input is a chunk of several new tokens, where masks matter."""
    batch, heads, d_head = case.rng.randint(1, 3), case.rng.randint(1, 4), case.rng.choice([4, 8, 16])
    total = case.rng.randint(3, 12)
    new = [1, case.rng.randint(2, total - 1), 1, total][case.index % 4]  # decode, chunk, decode, prefill
    scale = case.rng.choice([0.5, 1.0, 3.0])
    q = case.randn(batch, heads, new, d_head) * scale
    return q, case.randn(batch, heads, total, d_head) * scale, case.randn(batch, heads, total, d_head)


def _no_mask(q, k, v):
    return _attention(q, k, v)


def _top_left_mask(q, k, v):
    new, total = q.shape[-2], k.shape[-2]
    return _attention(q, k, v, torch.ones(new, total, dtype=torch.bool).tril())


def _unscaled(q, k, v):
    return _cached_attention(q * math.sqrt(q.shape[-1]), k, v)


def _keys_as_values(q, k, v):
    return _cached_attention(q, k, k)


_CACHED_ATTENTION_MISTAKES = (
    (("lets every new query see all the cached keys, the later new tokens included: new query i sits at position "
      "T_total - T_new + i and may see keys up to there only"), _no_mask),
    (("aligns the causal mask to the top-left corner: new query i sits at position T_total - T_new + i, not i, "
      "so its row of the mask is row T_total - T_new + i of the full causal mask"), _top_left_mask),
    ("does not divide the scores by sqrt(d_head)", _unscaled),
    ("mixes the keys instead of the values", _keys_as_values),
)
_CACHED_ATTENTION_SHORTCUTS = (
    Forbidden(F.scaled_dot_product_attention, "torch.nn.functional.scaled_dot_product_attention"),
)


def check_cached_attention(cached_attention: Callable, cases: int = 8, seed: int = 2) -> None:
    """Exercise 2: ``cached_attention(q, k, v)``: new queries over the whole cache, with the bottom-right causal mask."""
    check_function(cached_attention, _cached_attention, _cached_attention_inputs,
                   name=_name(cached_attention, "cached_attention"), cases=cases, seed=seed,
                   forbidden=_CACHED_ATTENTION_SHORTCUTS, mistakes=_CACHED_ATTENTION_MISTAKES, **_FLOAT32_TOLERANCE)


def check_cached_attention_matches_full(cached_attention: Callable, seed: int = 3) -> None:
    """Exercise 2, hidden: decoding token by token over a growing cache gives the full causal attention's rows."""
    name = _name(cached_attention, "cached_attention")
    case = Case(0, seed)
    q, k, v = case.randn(2, 3, 9, 8), case.randn(2, 3, 9, 8), case.randn(2, 3, 9, 8)
    full = _attention(q, k, v, torch.ones(9, 9, dtype=torch.bool).tril())
    for t in range(9):
        label = f"when decoding position {t} over a cache of {t + 1} positions"
        got = _run(cached_attention, (q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]), name, label,
                   _cached_attention, _CACHED_ATTENTION_SHORTCUTS)
        found = difference(got, full[:, :, t:t + 1], **_FLOAT32_TOLERANCE)
        if found:
            raise CheckFailed(f"`{name}` returned {found} {label}, compared with full causal attention.")
    print(f"✓ {name}: decoding one token at a time reproduces full causal attention, row by row.")


# ---------------------------------------------------------------- exercise 3: the size of the cache


def _bytes_inputs(case: Case) -> tuple[int, ...]:
    n_layer, n_kv_head = case.rng.choice([2, 12, 32, 80]), case.rng.choice([1, 4, 8, 32])
    d_head, context = case.rng.choice([32, 64, 128]), case.rng.choice([128, 1000, 4096, 8192])
    if case.index % 2 == 0:  # the defaults: one sequence, 2 bytes per number
        return n_layer, n_kv_head, d_head, context
    return n_layer, n_kv_head, d_head, context, case.rng.choice([1, 3, 16]), case.rng.choice([1, 2, 4])


def _bytes_hints(got, args: tuple) -> list[str]:
    """The known mistakes whose byte count equals ``got`` on these arguments (several can coincide)."""
    n_layer, n_kv_head, d_head, context, batch, element = args if len(args) == 6 else (*args, 1, 2)
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        return []
    numbers = n_layer * n_kv_head * d_head * context * batch
    right = 2 * numbers * element
    candidates = (
        (numbers * element, "counts only the keys (or only the values); the cache holds both, a factor 2"),
        (2 * numbers, "counts numbers, not bytes: multiply by bytes_per_element"),
        (right * 8, "counts bits, not bytes"),
        (right // n_layer, "leaves out the number of layers: every layer has its own cache"),
        (right // batch, "leaves out the batch: every sequence has its own cache"),
        (right // context, "leaves out the context length: the cache holds every token"),
    )
    return [phrase for value, phrase in candidates if got == value and value != right]


def check_kv_cache_bytes(kv_cache_bytes: Callable, cases: int = 8, seed: int = 4) -> None:
    """Exercise 3: ``kv_cache_bytes(n_layer, n_kv_head, d_head, context_length, batch_size=1, bytes_per_element=2)``.

    A wrong count is named by the known mistake it equals; where two mistakes give the same number
    (with the default 2 bytes, forgetting the keys-and-values factor 2 looks like forgetting the
    bytes), the later inputs decide which one it is.
    """
    name = _name(kv_cache_bytes, "kv_cache_bytes")
    fields = ("n_layer", "n_kv_head", "d_head", "context_length", "batch_size", "bytes_per_element")
    first_failure = None
    for index in range(cases + 8):  # the extra inputs only serve to tell coinciding mistakes apart
        args = _bytes_inputs(Case(index, seed * 10_007 + index))
        label = f"for {', '.join(f'{f}={a}' for f, a in zip(fields, args))}"
        got = _run(kv_cache_bytes, args, name, label, _kv_cache_bytes)
        expected = _kv_cache_bytes(*args)
        if isinstance(got, float) and got == expected:
            raise CheckFailed(f"`{name}` returned the float {got:g} {label}; return an int (use // or int(), not /).")
        found = difference(got, expected)
        if found is None:
            if index >= cases and first_failure is None:
                break
            continue
        hints = _bytes_hints(got, args)
        if len(hints) == 1:
            raise CheckFailed(f"`{name}` {hints[0]} {label}.")
        first_failure = first_failure or f"`{name}` returned {found} {label}."
    if first_failure:
        raise CheckFailed(first_failure)
    print(f"✓ {name}: all {cases} configurations give the reference's byte count.")


# ---------------------------------------------------------------- exercise 4: repeat_kv


def _repeat_inputs(case: Case) -> tuple[torch.Tensor, int]:
    """Several kv heads and n_rep >= 2 first, where tiling and repeating differ; n_rep = 1 later."""
    heads = case.rng.randint(2, 4)
    n_rep = case.rng.randint(2, 4) if case.index < 4 else case.rng.randint(1, 4)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    return case.randn(case.rng.randint(1, 3), heads, case.rng.randint(1, 6), case.rng.choice([2, 4, 8]), dtype=dtype), n_rep


def _tiled(x, n_rep):
    return x.repeat(1, n_rep, 1, 1)


_REPEAT_MISTAKES = (
    (("tiles the heads ([0, 1, 0, 1]) instead of repeating each in place ([0, 0, 1, 1]): query heads "
      "g·n_rep .. (g+1)·n_rep - 1 must all get kv head g"), _tiled),
)


def check_repeat_kv(repeat_kv: Callable, cases: int = 6, seed: int = 5) -> None:
    """Exercise 4: ``repeat_kv(x, n_rep)``: ``(B, kv_heads, T, d)`` → ``(B, kv_heads·n_rep, T, d)``, each head in place."""
    check_function(repeat_kv, _repeat_kv, _repeat_inputs, name=_name(repeat_kv, "repeat_kv"), cases=cases, seed=seed,
                   atol=0, rtol=0, mistakes=_REPEAT_MISTAKES)


# ---------------------------------------------------------------- exercise 5: pooling heads into groups


def _pool_inputs(case: Case) -> tuple[torch.Tensor, int, int]:
    """A projection of 4, 6 or 8 heads pooled into groups of at least 2 heads, several groups first."""
    n_head, n_kv_head = [(4, 2), (6, 2), (8, 4), (6, 3), (4, 1), (8, 2)][case.index % 6]
    d_head, d_in = case.rng.choice([2, 3, 4]), case.rng.choice([5, 8, 12])
    return case.randn(n_head * d_head, d_in), n_head, n_kv_head


def _strided(weight, n_head, n_kv_head):
    d_head = weight.shape[0] // n_head
    return weight.reshape(n_head // n_kv_head, n_kv_head, d_head, -1).mean(0).reshape(n_kv_head * d_head, -1)


def _summed(weight, n_head, n_kv_head):
    d_head = weight.shape[0] // n_head
    return weight.reshape(n_kv_head, n_head // n_kv_head, d_head, -1).sum(1).reshape(n_kv_head * d_head, -1)


def _first_of_group(weight, n_head, n_kv_head):
    d_head = weight.shape[0] // n_head
    return weight.reshape(n_kv_head, n_head // n_kv_head, d_head, -1)[:, 0].reshape(n_kv_head * d_head, -1)


def _pooled_channels(weight, n_head, n_kv_head):
    """Averaging neighbouring rows (channels) instead of whole heads."""
    group = n_head // n_kv_head
    return weight.reshape(-1, group, weight.shape[1]).mean(1)


_POOL_MISTAKES = (
    (("pools heads that are n_kv_head apart ({0, 2}, {1, 3}) instead of consecutive ones ({0, 1}, {2, 3}), which "
      "are the query heads that repeat_kv gives each kv head"), _strided),
    ("sums the heads of a group instead of averaging them", _summed),
    ("keeps the first head of each group instead of their mean", _first_of_group),
    (("averages neighbouring rows instead of whole heads: reshape to (n_kv_head, group, d_head, d_in) and average "
      "over the group axis"), _pooled_channels),
)


def check_pool_kv_heads(pool_kv_heads: Callable, cases: int = 6, seed: int = 6) -> None:
    """Exercise 5: ``pool_kv_heads(weight, n_head, n_kv_head)`` averages each group of consecutive heads' rows."""
    check_function(pool_kv_heads, _pool_kv_heads, _pool_inputs, name=_name(pool_kv_heads, "pool_kv_heads"),
                   cases=cases, seed=seed, mistakes=_POOL_MISTAKES, **_FLOAT32_TOLERANCE)
