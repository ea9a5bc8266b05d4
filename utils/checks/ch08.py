"""Checks for chapter 08, efficient attention.

The masks, causal linear attention and the online-softmax step are compared with the references in
:mod:`utils.efficient_attention`; the learner's tiled attention with exact attention
(:func:`utils.attention.scaled_dot_product_attention`), and it is watched while it runs: a version
that builds a tensor as large as the whole ``T × T`` score matrix is not tiled, whatever it returns.
``seed`` and ``cases`` let the hidden tests use inputs the visible ones never showed. The
references are bound here, when the module is imported, before any learner code runs.

When an answer is wrong in a way learners often get it wrong (a window one key too wide or too
narrow, a window that looks into the future, ``repeat`` for ``repeat_interleave``, sums that include
the future or leave out the current token, a missing rescale in the online softmax, a diagonal
hidden by the causal mask), the sentence names that mistake; otherwise it reports the first
differing element, never the expected answer itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention import scaled_dot_product_attention as _exact_attention
from ..efficient_attention import block_sparse_mask as _block_sparse_mask
from ..efficient_attention import chunked_linear_attention as _chunked_linear_attention
from ..efficient_attention import elu_feature_map as _elu_feature_map
from ..efficient_attention import linear_attention as _linear_attention
from ..efficient_attention import (
    linear_attention_recurrent as _linear_attention_recurrent,
)
from ..efficient_attention import naive_attention as _naive_attention
from ..efficient_attention import online_softmax_update as _online_softmax_update
from ..efficient_attention import sliding_window_mask as _sliding_window_mask
from ..efficient_attention import tiled_attention as _tiled_attention
from .core import Case, CheckFailed, Forbidden, call_learner, describe, difference
from .core import function_name as _name

_torch_attention = F.scaled_dot_product_attention
MINUS_INF = float("-inf")


def _run(fn: Callable, args: tuple, name: str, label: str, reference: Callable, forbidden: tuple = ()):
    """The learner's result on a private copy of ``args``; exceptions and shortcuts become one sentence."""
    return call_learner(fn, copy.deepcopy(args), name, label, forbidden, reference=reference)


def _same(got, expected, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    return difference(got, expected, atol=atol, rtol=rtol) is None


# ---------------------------------------------------------------- exercise 1: the sliding window


def _window_rule(length: int, keep) -> torch.Tensor:
    """The mask ``keep(query - key)`` over all pairs: how the usual wrong windows are built."""
    positions = torch.arange(length)
    return keep(positions[:, None] - positions[None, :])


def _window_mistake(got, length: int, window: int) -> str | None:
    if not (isinstance(got, torch.Tensor) and got.shape == (length, length) and got.dtype == torch.bool):
        return None
    wrong = [
        (lambda d: (d >= 0) & (d <= window),
         (f"lets each query see {window + 1} keys, itself and the {window} before it: a window of {window} is "
          f"{window} keys, the query itself and the {window - 1} before it (query - key < window, not <=)")),
        (lambda d: (d >= 0) & (d < window - 1),
         (f"lets each query see only {max(window - 1, 0)} keys: a window of {window} is {window} keys, the query "
          f"itself and the {window - 1} before it (query - key < window)")),
        (lambda d: d.abs() < window,
         "lets queries see keys after them: the window is causal, query i sees keys i - window + 1 to i"),
        (lambda d: (d <= 0) & (d > -window),
         "is transposed: rows are queries and columns keys, so row i is True at columns i - window + 1 to i"),
        (lambda d: d >= 0,
         "is the plain causal mask: a query must not see keys window or more positions before it"),
    ]
    for rule, phrase in wrong:
        if torch.equal(got, _window_rule(length, rule)):
            return phrase
    return None


def check_sliding_window_mask(sliding_window_mask: Callable, cases: int = 8, seed: int = 1) -> None:
    """Exercise 1: ``sliding_window_mask(length, window)``: causal, each query sees ``window`` keys, itself included."""
    name = _name(sliding_window_mask, "sliding_window_mask")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        length = case.rng.randint(4, 24)
        window = case.rng.randint(2, length - 1) if index % 4 else case.rng.choice([1, length, length + 3])
        label = f"on test input #{index + 1} (length={length}, window={window})"
        expected = _sliding_window_mask(length, window)
        got = _run(sliding_window_mask, (length, window), name, label, _sliding_window_mask)
        found = difference(got, expected)
        if found is None:
            continue
        mistake = _window_mistake(got, length, window)
        if mistake:
            raise CheckFailed(f"`{name}` {mistake} {label}.")
        raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs match the reference, windows of 1 and longer than the sequence included.")


# ---------------------------------------------------------------- exercise 2: block-sparse masks


def _layout_inputs(case: Case) -> tuple[torch.Tensor, int]:
    """A random boolean block layout, square or not, and a block size of 1 to 5."""
    rows = case.rng.randint(1, 6)
    columns = rows if case.index % 2 == 0 else case.rng.randint(1, 6)
    layout = torch.rand(rows, columns, generator=case.gen) < 0.5
    layout[0, 0] = bool(case.index % 3)  # corners of both kinds
    return layout, case.rng.randint(2, 5) if case.index else 1


def check_block_sparse_mask(block_sparse_mask: Callable, cases: int = 8, seed: int = 2) -> None:
    """Exercise 2: ``block_sparse_mask(layout, block_size)`` expands every layout entry to a square tile."""
    name = _name(block_sparse_mask, "block_sparse_mask")
    for index in range(cases):
        layout, block_size = _layout_inputs(Case(index, seed * 10_007 + index))
        label = f"on test input #{index + 1} (a {layout.shape[0]}×{layout.shape[1]} layout, block_size={block_size})"
        expected = _block_sparse_mask(layout, block_size)
        got = _run(block_sparse_mask, (layout, block_size), name, label, _block_sparse_mask)
        found = difference(got, expected)
        if found is None:
            continue
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == torch.bool:
            if torch.equal(got, layout.repeat(block_size, block_size)):
                raise CheckFailed(f"`{name}` repeated the whole layout block_size times {label}: each entry must "
                                  f"become its own block_size × block_size tile (repeat_interleave, not repeat).")
            if layout.shape[0] == layout.shape[1] and torch.equal(got, expected.T):
                raise CheckFailed(f"`{name}` returned the transposed mask {label}: layout rows are blocks of "
                                  f"queries, so token row i takes layout row i // block_size.")
        raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs match the reference, non-square layouts included.")


# ---------------------------------------------------------------- exercise 3: causal linear attention

_LINEAR_SHORTCUTS = (
    Forbidden(_linear_attention_recurrent, "the course's own utils.efficient_attention.linear_attention_recurrent"),
    Forbidden(_chunked_linear_attention, "the course's own utils.efficient_attention.chunked_linear_attention"),
)


def _reference_causal_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _linear_attention(q, k, v, causal=True)


def _linear_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k ``(..., T, d)`` and v ``(..., T, d_v)`` with 0 to 2 batch dimensions; every third in float64."""
    batch = [case.rng.randint(1, 3) for _ in range(case.rng.randint(0, 2))]
    length, d, d_v = case.rng.randint(2, 16), case.rng.randint(2, 8), case.rng.randint(1, 6)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    return (case.randn(*batch, length, d, dtype=dtype), case.randn(*batch, length, d, dtype=dtype),
            case.randn(*batch, length, d_v, dtype=dtype))


def _exclusive_linear(q, k, v):
    """The sums over the keys before t only: the current token left out."""
    phi_q, phi_k = _elu_feature_map(q), _elu_feature_map(k)
    scores = (phi_q @ phi_k.transpose(-2, -1)).tril(-1)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)


def _linear_mistake(got, q, k, v) -> str | None:
    if not (isinstance(got, torch.Tensor) and got.shape == (*q.shape[:-1], v.shape[-1]) and got.dtype == q.dtype):
        return None
    phi_q, phi_k = _elu_feature_map(q), _elu_feature_map(k)
    causal_scores = (phi_q @ phi_k.transpose(-2, -1)).tril()
    mistakes = [
        (lambda: _linear_attention(q, k, v, causal=False),
         ("summed over all T keys, the future included: at position t the sums run over keys 1..t only "
          "(cumulative sums over the time dimension)")),
        (lambda: _exclusive_linear(q, k, v),
         "left out the current token: the sums at position t include key t itself"),
        (lambda: causal_scores @ v,
         "did not divide by the normaliser φ(q_t)·z_t, the running sum of φ(k_j) read with φ(q_t)"),
        (lambda: _linear_attention(q, k, v, causal=True, feature_map=lambda x: x),
         "did not apply the feature map φ(x) = elu(x) + 1 to the queries and keys"),
        (lambda: _linear_attention(q, k, v, causal=True, feature_map=torch.relu),
         "used relu as the feature map: this exercise's φ is elu(x) + 1, positive everywhere"),
        (lambda: _naive_attention(q, k, v, causal=True),
         "computed softmax attention: linear attention replaces exp(q·k/√d) with φ(q)·φ(k)"),
    ]
    for wrong, phrase in mistakes:
        with torch.no_grad():
            mistaken = wrong()
        if _same(got.detach(), mistaken, atol=1e-5, rtol=1e-4):
            return phrase
    return None


def check_causal_linear_attention(causal_linear_attention: Callable, cases: int = 8, seed: int = 3) -> None:
    """Exercise 3: ``causal_linear_attention(q, k, v)`` with φ = elu + 1, through cumulative sums."""
    name = _name(causal_linear_attention, "causal_linear_attention")
    for index in range(cases):
        q, k, v = _linear_inputs(Case(index, seed * 10_007 + index))
        label = (f"on test input #{index + 1} ({str(q.dtype).replace('torch.', '')} q, k {tuple(q.shape)}, "
                 f"v {tuple(v.shape)})")
        expected = _reference_causal_linear(q, k, v)
        got = _run(causal_linear_attention, (q, k, v), name, label, _reference_causal_linear,
                   (Forbidden(_linear_attention, "the course's own utils.efficient_attention.linear_attention"),
                    *_LINEAR_SHORTCUTS))
        found = difference(got, expected, atol=1e-5, rtol=1e-4)
        if found is None:
            continue
        mistake = _linear_mistake(got, q, k, v)
        if mistake:
            raise CheckFailed(f"`{name}` {mistake} {label}.")
        raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs match the reference.")


# ---------------------------------------------------------------- exercise 4: the online-softmax step


def _update_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """A running state after 0 to 2 earlier blocks, and a new block whose scores are larger in some rows.

    Input #1 starts from the empty state (m = -inf, ℓ = 0, o = 0). Scores hold some -inf (masked
    keys), but every row has at least one finite score in its first block.
    """
    batch = [case.rng.randint(1, 3) for _ in range(case.rng.randint(0, 2))]
    rows, d_v = case.rng.randint(2, 6), case.rng.randint(1, 5)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32

    def block() -> tuple[torch.Tensor, torch.Tensor]:
        width = case.rng.randint(1, 6)
        scores = case.randn(*batch, rows, width, dtype=dtype) * 2
        hidden = torch.rand(scores.shape, generator=case.gen) < 0.25
        hidden[..., 0] = False
        return scores.masked_fill(hidden, MINUS_INF), case.randn(*batch, width, d_v, dtype=dtype)

    row_max = torch.full((*batch, rows, 1), MINUS_INF, dtype=dtype)
    row_sum = torch.zeros(*batch, rows, 1, dtype=dtype)
    out = torch.zeros(*batch, rows, d_v, dtype=dtype)
    for _ in range(0 if case.index == 0 else case.rng.randint(1, 2)):
        row_max, row_sum, out = _online_softmax_update(row_max, row_sum, out, *block())
    scores, values = block()
    grows = torch.rand(*batch, rows, 1, generator=case.gen) < 0.6  # these rows get a new, larger maximum
    return row_max, row_sum, out, torch.where(grows, scores + 3.0, scores), values


def _update_mistakes(row_max, row_sum, out, scores, values):
    """(phrase, the state a usual mistake returns) pairs."""
    new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
    weights = torch.exp(scores - new_max)
    rescale = torch.exp(row_max - new_max)
    new_sum, new_out = rescale * row_sum + weights.sum(-1, keepdim=True), rescale * out + weights @ values
    block_max = scores.amax(-1, keepdim=True)
    block_weights = torch.exp(scores - block_max)
    fix = "multiply the old value by exp(old max - new max) before adding the block's terms"
    return [
        ("did not rescale the running sum row_sum when the maximum changed: " + fix,
         (new_max, row_sum + weights.sum(-1, keepdim=True), new_out)),
        ("did not rescale out when the maximum changed: " + fix,
         (new_max, new_sum, out + weights @ values)),
        ("rescaled neither row_sum nor out when the maximum changed: " + fix,
         (new_max, row_sum + weights.sum(-1, keepdim=True), out + weights @ values)),
        ("rescaled by exp(new max - old max): the factor is exp(old max - new max), at most 1",
         (new_max, torch.exp(new_max - row_max) * row_sum + weights.sum(-1, keepdim=True),
          torch.exp(new_max - row_max) * out + weights @ values)),
        ("took the new maximum from the block alone: it must be the larger of the old maximum and the block's",
         (block_max, torch.exp(row_max - block_max) * row_sum + block_weights.sum(-1, keepdim=True),
          torch.exp(row_max - block_max) * out + block_weights @ values)),
        ("divided out by the running sum: keep out unnormalised, Σ exp(s_j - m) v_j, until the last block",
         (new_max, new_sum, new_out / new_sum)),
    ]


_STATE = ("row_max", "row_sum", "out")


def check_online_softmax_update(online_softmax_update: Callable, cases: int = 8, seed: int = 4) -> None:
    """Exercise 4: ``online_softmax_update(row_max, row_sum, out, scores, values)`` returns the new state."""
    name = _name(online_softmax_update, "online_softmax_update")
    for index in range(cases):
        args = _update_inputs(Case(index, seed * 10_007 + index))
        _, _, out, scores, _ = args
        state = "the empty state" if index == 0 else "a state after earlier blocks"
        label = (f"on test input #{index + 1} ({state}, scores {describe(scores)}, out {tuple(out.shape)})")
        expected = _online_softmax_update(*args)
        got = _run(online_softmax_update, args, name, label, _online_softmax_update)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"`{name}` returned {describe(got)} {label}; return the triple (row_max, row_sum, out).")
        wrong = [(part, found) for part, got_part, expected_part in zip(_STATE, got, expected)
                 if (found := difference(got_part, expected_part, atol=1e-5, rtol=1e-5))]
        if not wrong:
            continue
        with torch.no_grad():
            for phrase, mistaken in _update_mistakes(*args):
                if _same(tuple(got), mistaken, atol=1e-5, rtol=1e-5):
                    raise CheckFailed(f"`{name}` {phrase} ({label.removeprefix('on ')}).")
        part, found = wrong[0]
        raise CheckFailed(f"`{name}` returned a new {part} with {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs match the reference, a maximum that grows included.")


# ---------------------------------------------------------------- exercise 5: tiled attention

_TILED_SHORTCUTS = (
    Forbidden(_torch_attention, "torch.nn.functional.scaled_dot_product_attention"),
    Forbidden(_exact_attention, "the course's own utils.attention.scaled_dot_product_attention"),
    Forbidden(_naive_attention, "the course's own utils.efficient_attention.naive_attention"),
    Forbidden(_tiled_attention, "the course's own utils.efficient_attention.tiled_attention"),
)


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch call returns while the learner's code runs."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor):
                self.numel = max(self.numel, item.numel())
        return result


def _reference_tiled(q, k, v, block_size: int, causal: bool) -> torch.Tensor:
    """Exercise 5's reference: exact attention with the full score matrix (the result must not depend on tiling)."""
    return _naive_attention(q, k, v, causal=causal)


def _tiled_inputs(case: Case) -> tuple:
    """q, k, v ``(B, H, T, d)`` with B·H <= 2, T from 40 to 100, a block size of T/10 to T/8, often not a divisor.

    At most T/8, so that one tile, or even one block of keys against every query, stays well below
    the T × T / 2 numbers that count as the whole score matrix; at least T/10, so that the check
    walks about a hundred tiles, not thousands.
    """
    batch, heads = (1, 2) if case.index % 2 else (2, 1)
    length = case.rng.randint(40, 100)
    d, d_v = case.rng.randint(2, 8), case.rng.randint(1, 8)
    dtype = torch.float64 if case.index % 4 == 3 else torch.float32
    q = case.randn(batch, heads, length, d, dtype=dtype) * 2
    k = case.randn(batch, heads, length, d, dtype=dtype)
    v = case.randn(batch, heads, length, d_v, dtype=dtype)
    return q, k, v, case.rng.randint(length // 10, length // 8), case.index % 2 == 1


def _update_without(rescale_sum: bool, rescale_out: bool) -> Callable:
    """An online-softmax step that forgets to rescale the running sum, the output, or both."""
    def update(row_max, row_sum, out, scores, values):
        new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
        rescale, weights = torch.exp(row_max - new_max), torch.exp(scores - new_max)
        new_sum = (rescale * row_sum if rescale_sum else row_sum) + weights.sum(-1, keepdim=True)
        return new_max, new_sum, (rescale * out if rescale_out else out) + weights @ values
    return update


def _tiled_loop(q, k, v, block_size: int, causal: bool, update: Callable = _online_softmax_update,
                divide: bool = True) -> torch.Tensor:
    """The exercise's loop with a given update step, to reproduce the mistakes made inside it."""
    length, scale = q.shape[-2], 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype)
    for q_start in range(0, length, block_size):
        q_block = q[..., q_start:q_start + block_size, :] * scale
        rows = q_block.shape[-2]
        state = (torch.full((*q_block.shape[:-1], 1), MINUS_INF, dtype=q.dtype),
                 torch.zeros(*q_block.shape[:-1], 1, dtype=q.dtype), torch.zeros(*q_block.shape[:-1], v.shape[-1], dtype=v.dtype))
        for k_start in range(0, q_start + rows if causal else length, block_size):
            scores = q_block @ k[..., k_start:k_start + block_size, :].transpose(-2, -1)
            if causal:
                later = torch.arange(k_start, k_start + scores.shape[-1])[None, :] > torch.arange(q_start, q_start + rows)[:, None]
                scores = scores.masked_fill(later, MINUS_INF)
            state = update(*state, scores, v[..., k_start:k_start + block_size, :])
        out[..., q_start:q_start + rows, :] = state[2] / state[1] if divide else state[2]
    return out


def _tiled_mistake(got, q, k, v, block_size: int, causal: bool) -> str | None:
    if not (isinstance(got, torch.Tensor) and got.shape == (*q.shape[:-1], v.shape[-1]) and got.dtype == q.dtype):
        return None
    with torch.no_grad():
        looped = [
            (_tiled_loop(q, k, v, block_size, causal, _update_without(False, True)),
             ("did not rescale the running sum when a later block raised the maximum: multiply it by "
              "exp(old max - new max) before adding the block's terms")),
            (_tiled_loop(q, k, v, block_size, causal, _update_without(True, False)),
             ("did not rescale the output accumulator when a later block raised the maximum: multiply it by "
              "exp(old max - new max) before adding the block's terms")),
            (_tiled_loop(q, k, v, block_size, causal, _update_without(False, False)),
             ("rescaled neither the running sum nor the output when a later block raised the maximum: multiply "
              "both by exp(old max - new max) before adding the block's terms")),
            (_tiled_loop(q, k, v, block_size, causal, divide=False),
             "did not divide the output by the running sum after the last block of keys"),
        ]
    for mistaken, phrase in looped:
        if _same(got.detach(), mistaken):
            return phrase
    length = q.shape[-2]
    if causal:
        strict = torch.ones(length, length, dtype=torch.bool).tril(-1)
        with torch.no_grad():
            hides_diagonal = _exact_attention(q, k, v, strict)
        if _same(got.detach(), hides_diagonal):
            return "hid each query's own key: the causal mask allows key j for query i when j <= i"
        if _same(got.detach(), _naive_attention(q, k, v, causal=False)):
            return "ignored `causal`: when it is True, query i may only see keys j <= i"
    elif _same(got.detach(), _naive_attention(q, k, v, causal=True)):
        return "applied a causal mask although `causal` is False"
    scale = math.sqrt(q.shape[-1])
    if _same(got.detach(), _naive_attention(q * scale, k, v, causal=causal)):
        return "did not scale the scores: divide q·kᵀ by sqrt(d)"
    return None


def check_tiled_attention(tiled_attention: Callable, cases: int = 6, seed: int = 5) -> None:
    """Exercise 5: ``tiled_attention(q, k, v, block_size, causal)`` equals exact attention and never holds T × T scores."""
    name = _name(tiled_attention, "tiled_attention")
    for index in range(cases):
        q, k, v, block_size, causal = args = _tiled_inputs(Case(index, seed * 10_007 + index))
        length = q.shape[-2]
        label = (f"on test input #{index + 1} ({str(q.dtype).replace('torch.', '')} q {tuple(q.shape)}, "
                 f"v {tuple(v.shape)}, block_size={block_size}, causal={causal})")
        expected = _reference_tiled(*args)
        private = copy.deepcopy(args)
        with _LargestTensor() as watch:
            got = call_learner(tiled_attention, private, name, label, _TILED_SHORTCUTS, reference=_reference_tiled)
        if watch.numel >= length * length / 2:
            raise CheckFailed(f"`{name}` built a tensor of {watch.numel:,} numbers {label}, as large as the whole "
                              f"{length} × {length} score matrix: a tiled version holds one block of scores at a "
                              f"time, at most block_size × block_size per head.")
        found = difference(got, expected, atol=1e-5, rtol=1e-4)
        if found is None:
            continue
        mistake = _tiled_mistake(got, q, k, v, block_size, causal)
        if mistake:
            raise CheckFailed(f"`{name}` {mistake} ({label.removeprefix('on ')}).")
        raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs equal exact attention within 1e-5, one tile of scores at a time.")
