"""Checks for chapter 03, multi-head attention and position.

Heads and positions are compared with the references in :mod:`utils.attention` and
:mod:`utils.positions`; the learner's multi-head attention is compared with the course's
``MultiHeadAttention`` module running PyTorch's ``F.scaled_dot_product_attention``, with the
learner's weight matrices loaded into it. ``apply_rope`` is also held to the property that makes
RoPE worth having: the score between a rotated query at position m and a rotated key at position
n depends on m - n only. ``seed`` and ``cases`` let the hidden tests use inputs the visible ones
never showed. The references are bound here, when the module is imported, before any learner
code runs.

When a wrong answer is exactly what a common mistake gives (splitting heads with the wrong view,
no causal mask, the wrong scale, sin and cos swapped, RoPE's pairs interleaved or rotated the
wrong way), the sentence names that mistake; otherwise it reports the first differing element,
never the expected answer itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import MultiHeadAttention as _MultiHeadAttention
from ..attention import causal_mask as _causal_mask
from ..attention import merge_heads as _merge_heads
from ..attention import scaled_dot_product_attention as _course_attention
from ..attention import split_heads as _split_heads
from ..positions import apply_rope as _apply_rope
from ..positions import rope_frequencies as _rope_frequencies
from ..positions import sinusoidal_positions as _sinusoidal_positions
from .core import Case, CheckFailed, Forbidden, call_learner, describe, difference
from .core import function_name as _name

# Exercise 2 builds attention out of matrix products and a softmax: every ready-made attention is a shortcut.
_ATTENTION_SHORTCUTS = (
    Forbidden(F.scaled_dot_product_attention, "torch.nn.functional.scaled_dot_product_attention"),
    Forbidden(F.multi_head_attention_forward, "torch.nn.functional.multi_head_attention_forward (nn.MultiheadAttention)"),
    Forbidden(_course_attention, "the course's own utils.attention.scaled_dot_product_attention"),
    Forbidden(_MultiHeadAttention.forward, "the course's own utils.attention.MultiHeadAttention"),
)


@dataclass(frozen=True)
class _Mistake:
    """A common wrong answer: ``what`` the learner did, ``fix`` in a few words, and code that does the same."""

    what: str
    fix: str
    make: Callable


def _compare(fn: Callable, reference: Callable, inputs: Sequence[tuple[tuple, str]], name: str, *,
             atol: float, rtol: float, forbidden: Sequence[Forbidden] = (), mistakes: Sequence[_Mistake] = ()) -> float:
    """Run ``fn`` on each ``(args, shown)``; at the first difference, name a mistake that reproduces it if one does.

    A mistake is named only when it gives exactly what ``fn`` returned and differs from the
    reference on that input, so a hint never blames a mistake the learner did not make. Returns
    the largest absolute difference from the reference over all inputs (0 for exact answers).
    """
    largest = 0.0
    for index, (args, shown) in enumerate(inputs):
        label = f"on test input #{index + 1} ({shown})"
        expected = reference(*copy.deepcopy(args))
        got = call_learner(fn, copy.deepcopy(args), name, label, forbidden, reference=reference)
        found = difference(got, expected, atol=atol, rtol=rtol)
        if found is None:
            largest = max(largest, _largest_difference(got, expected))
            continue
        for mistake in mistakes:
            wrong = mistake.make(*copy.deepcopy(args))
            if difference(wrong, expected, atol=atol, rtol=rtol) and not difference(got, wrong, atol=atol, rtol=rtol):
                raise CheckFailed(f"`{name}` {mistake.what} {label}: {mistake.fix}.")
        raise CheckFailed(f"`{name}` returned {found} {label}.")
    return largest


def _largest_difference(got, expected) -> float:
    """The largest absolute difference between two matching results (tensors, or tuples of them)."""
    if isinstance(expected, torch.Tensor):
        return float((got.detach().cpu().double() - expected.detach().cpu().double()).abs().max()) if expected.numel() else 0.0
    if isinstance(expected, (tuple, list)):
        return max((_largest_difference(a, b) for a, b in zip(got, expected)), default=0.0)
    return 0.0


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


# ---------------------------------------------------------------- exercise 1: splitting and merging heads


def _split_view_heads_first(x: torch.Tensor, n_head: int) -> torch.Tensor:
    batch, length, channels = x.shape
    return x.reshape(batch, n_head, length, channels // n_head)


def _split_strided(x: torch.Tensor, n_head: int) -> torch.Tensor:
    batch, length, channels = x.shape
    return x.reshape(batch, length, channels // n_head, n_head).permute(0, 3, 1, 2)


def _merge_without_transpose(x: torch.Tensor) -> torch.Tensor:
    batch, n_head, length, d_head = x.shape
    return x.reshape(batch, length, n_head * d_head)


def _merge_strided(x: torch.Tensor) -> torch.Tensor:
    batch, n_head, length, d_head = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, length, n_head * d_head)


_SPLIT_MISTAKES = (
    _Mistake("gave what x.view(B, n_head, T, d_head) gives",
             "that hands a head channels of other tokens; view x as (B, T, n_head, d_head), then swap axes 1 and 2",
             _split_view_heads_first),
    _Mistake("gave head h every n_head-th channel",
             "head h owns the contiguous block of channels h·d_head to (h+1)·d_head - 1", _split_strided),
)
_MERGE_MISTAKES = (
    _Mistake("reshaped without moving the head axis back",
             "that mixes tokens; swap axes 1 and 2 to get (B, T, n_head, d_head), then reshape",
             _merge_without_transpose),
    _Mistake("interleaved the heads' channels",
             "head h's d_head channels must end up side by side, at h·d_head to (h+1)·d_head - 1", _merge_strided),
)


def _heads_shape(case: Case) -> tuple[int, int, int, int]:
    """B, T, n_head, d_head with T, n_head and d_head at least 2, so that every wrong order shows."""
    return case.rng.randint(1, 3), case.rng.randint(2, 6), case.rng.randint(2, 4), case.rng.randint(2, 5)


def check_heads(split_heads: Callable, merge_heads: Callable, cases: int = 6, seed: int = 1) -> None:
    """Exercise 1: ``split_heads(x, n_head)``: (B, T, C) → (B, n_head, T, d_head), and ``merge_heads``, its inverse."""
    split_inputs, merge_inputs = [], []
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        batch, length, n_head, d_head = _heads_shape(case)
        dtype = torch.float64 if index % 3 == 2 else torch.float32
        x = case.randn(batch, length, n_head * d_head, dtype=dtype)
        split_inputs.append(((x, n_head), f"x of shape {tuple(x.shape)}, n_head={n_head}"))
        heads = case.randn(batch, n_head, length, d_head, dtype=dtype)
        merge_inputs.append(((heads,), f"x of shape {tuple(heads.shape)}"))
    _compare(split_heads, _split_heads, split_inputs, _name(split_heads, "split_heads"), atol=0, rtol=0,
             mistakes=_SPLIT_MISTAKES)
    _compare(merge_heads, _merge_heads, merge_inputs, _name(merge_heads, "merge_heads"), atol=0, rtol=0,
             mistakes=_MERGE_MISTAKES)
    for index, ((x, n_head), shown) in enumerate(split_inputs):
        label = f"on test input #{index + 1} ({shown})"
        heads = call_learner(split_heads, (x.clone(), n_head), _name(split_heads, "split_heads"), label,
                             reference=_split_heads)
        back = call_learner(merge_heads, (heads,), _name(merge_heads, "merge_heads"), label, reference=_merge_heads)
        if difference(back, x, atol=0, rtol=0):
            raise CheckFailed(f"merge_heads(split_heads(x, n_head)) did not give back x {label}.")
    print(f"✓ split_heads and merge_heads: all {cases} test inputs match the reference, and merging undoes splitting.")


# ---------------------------------------------------------------- exercise 2: multi-head attention


def _reference_multi_head_attention(x: torch.Tensor, w_query: torch.Tensor, w_key: torch.Tensor, w_value: torch.Tensor,
                                    w_out: torch.Tensor, n_head: int, causal: bool = True) -> torch.Tensor:
    """The course's module, on PyTorch's fused attention kernel, with these weights loaded into it."""
    with torch.random.fork_rng(devices=[]):  # building the module draws random weights: leave the learner's RNG alone
        module = _MultiHeadAttention(x.shape[-1], n_head, causal=causal, fused=True).to(x.dtype)
    with torch.no_grad():
        for linear, weight in ((module.query, w_query), (module.key, w_key), (module.value, w_value), (module.out, w_out)):
            linear.weight.copy_(weight)
        return module(x)


def _explicit_attention(x, w_query, w_key, w_value, w_out, n_head, causal=True, *, split=_split_heads,
                        merge=_merge_heads, scale: str = "sqrt_d_head", mask: str = "follow", transposed: bool = True,
                        softmax_dim: int = -1, project_out: bool = True) -> torch.Tensor:
    """Multi-head attention written out, with switches that each reproduce one common mistake."""
    project = (lambda w: x @ w.T) if transposed else (lambda w: x @ w)
    q, k, v = (split(project(w), n_head) for w in (w_query, w_key, w_value))
    d_head = q.shape[-1]
    divisor = {"sqrt_d_head": math.sqrt(d_head), "none": 1.0, "sqrt_d_model": math.sqrt(x.shape[-1]),
               "d_head": d_head}[scale]
    scores = q @ k.transpose(-2, -1) / divisor
    if (mask == "follow" and causal) or mask == "always":
        scores = scores.masked_fill(~_causal_mask(x.shape[1]), float("-inf"))
    out = merge(torch.softmax(scores, dim=softmax_dim) @ v)
    return out @ w_out.T if project_out else out


def _attention_mistake(what: str, fix: str, **switches) -> _Mistake:
    return _Mistake(what, fix, lambda *args: _explicit_attention(*args, **switches))


_ATTENTION_MISTAKES = (
    _attention_mistake("let every token attend to later tokens although causal=True",
                       "mask the scores above the diagonal with -inf before the softmax", mask="never"),
    _attention_mistake("applied the causal mask although causal=False", "mask only when `causal` is true",
                       mask="always"),
    _attention_mistake("did not scale the scores", "divide each head's q·kᵀ by sqrt(d_head)", scale="none"),
    _attention_mistake("divided the scores by sqrt(d_model)",
                       "each head's scores are divided by sqrt(d_head), the size of one head", scale="sqrt_d_model"),
    _attention_mistake("divided the scores by d_head", "the scale is 1/sqrt(d_head), not 1/d_head", scale="d_head"),
    _attention_mistake("multiplied by the weight matrices untransposed",
                       "the weights have nn.Linear's (out, in) layout, so a projection is x @ W.T", transposed=False),
    _attention_mistake("split the heads as view(B, n_head, T, d_head)",
                       "that mixes tokens; view as (B, T, n_head, d_head), then swap axes 1 and 2",
                       split=_split_view_heads_first),
    _attention_mistake("merged the heads without moving the head axis back",
                       "that mixes tokens; swap axes 1 and 2 before reshaping to (B, T, d_model)",
                       merge=_merge_without_transpose),
    _attention_mistake("normalized the attention weights over the queries (dim -2)",
                       "each query's weights over the keys (dim -1) must sum to 1", softmax_dim=-2),
    _attention_mistake("did not apply the output projection", "finish with merged @ w_out.T", project_out=False),
)


def _attention_inputs(case: Case, causal: bool) -> tuple:
    batch, length = case.rng.randint(1, 2), case.rng.randint(2, 7)
    n_head, d_head = case.rng.randint(2, 4), case.rng.randint(2, 6)
    d_model = n_head * d_head
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    x = case.randn(batch, length, d_model, dtype=dtype)
    # Weights of the usual scale, times 2 so that the scores span a few units and a wrong scale shows.
    weights = [case.randn(d_model, d_model, dtype=dtype) * (2 / math.sqrt(d_model)) for _ in range(4)]
    return (x, *weights, n_head, causal)


def check_multi_head_attention(multi_head_attention: Callable, cases: int = 6, seed: int = 2) -> None:
    """Exercise 2: ``multi_head_attention(x, w_query, w_key, w_value, w_out, n_head, causal)`` against the module."""
    inputs = []
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        args = _attention_inputs(case, causal=index % 3 != 1)
        x, n_head, causal = args[0], args[5], args[6]
        inputs.append((args, f"{_dtype(x)} x of shape {tuple(x.shape)}, n_head={n_head}, causal={causal}"))
    name = _name(multi_head_attention, "multi_head_attention")
    largest = _compare(multi_head_attention, _reference_multi_head_attention, inputs, name, atol=1e-5, rtol=1e-4,
                       forbidden=_ATTENTION_SHORTCUTS, mistakes=_ATTENTION_MISTAKES)
    print(f"✓ {name}: matches the course's MultiHeadAttention (on PyTorch's attention kernel) on all {cases} "
          f"test inputs, causal and not (largest difference {largest:.1e}).")


# ---------------------------------------------------------------- exercise 3: sinusoidal positions


def _sinusoids(length: int, d_model: int, base: float, *, exponent: str = "2i/d", layout: str = "interleaved",
               sin_first: bool = True, first_position: int = 0) -> torch.Tensor:
    """The sinusoidal table, with switches that each reproduce one common mistake."""
    position = torch.arange(first_position, first_position + length, dtype=torch.float64)[:, None]
    pair = torch.arange(0, d_model // 2, dtype=torch.float64)
    if exponent == "2i/d":
        angles = position / base ** (2 * pair / d_model)
    elif exponent == "i/d":
        angles = position / base ** (pair / d_model)
    else:  # "column": every column j gets its own exponent j / d_model, so a cosine is off its sine's frequency
        column = torch.arange(d_model, dtype=torch.float64)
        table = position / base ** (column / d_model)
        table[:, 0::2], table[:, 1::2] = table[:, 0::2].sin(), table[:, 1::2].cos()
        return table.float()
    first, second = (angles.sin(), angles.cos()) if sin_first else (angles.cos(), angles.sin())
    if layout == "halves":
        return torch.cat((first, second), dim=-1).float()
    return torch.stack((first, second), dim=-1).reshape(length, d_model).float()


def _sinusoid_mistake(what: str, fix: str, **switches) -> _Mistake:
    return _Mistake(what, fix, lambda length, d_model, base=10_000.0: _sinusoids(length, d_model, base, **switches))


_SINUSOID_MISTAKES = (
    _sinusoid_mistake("put cos in the even columns and sin in the odd ones",
                      "column 2i holds the sine and column 2i + 1 the cosine", sin_first=False),
    _sinusoid_mistake("put all the sines first and all the cosines after them",
                      "interleave them, the sine of an angle in column 2i and its cosine in column 2i + 1",
                      layout="halves"),
    _sinusoid_mistake("used the exponent i / d_model for pair i",
                      "pair i (columns 2i and 2i + 1) divides the position by base^(2i / d_model)", exponent="i/d"),
    _sinusoid_mistake("gave each column its own frequency",
                      "columns 2i and 2i + 1 share one angle, position / base^(2i / d_model)", exponent="column"),
    _sinusoid_mistake("numbered the positions from 1", "the first position is 0", first_position=1),
)


def _positions_inputs(case: Case, width_low: int = 1, width_high: int = 32) -> tuple[int, int, float]:
    length = case.rng.randint(1, 60)
    width = 2 * case.rng.randint(width_low, width_high)
    base = 10_000.0 if case.index % 3 != 2 else float(case.rng.choice([100, 500_000]))
    return length, width, base


def check_sinusoidal_positions(sinusoidal_positions: Callable, cases: int = 6, seed: int = 3) -> None:
    """Exercise 3: ``sinusoidal_positions(length, d_model, base)``, a float32 ``(length, d_model)`` table."""
    inputs = []
    for index in range(cases):
        length, d_model, base = _positions_inputs(Case(index, seed * 10_007 + index), width_low=2)
        inputs.append(((length, d_model, base), f"length={length}, d_model={d_model}, base={base:g}"))
    name = _name(sinusoidal_positions, "sinusoidal_positions")
    # float32 angles of up to 60 radians carry rounding of a few 1e-6 whichever order the sum is done in.
    _compare(sinusoidal_positions, _sinusoidal_positions, inputs, name, atol=2e-5, rtol=1e-4,
             mistakes=_SINUSOID_MISTAKES)
    print(f"✓ {name}: all {cases} test inputs match the reference.")


# ---------------------------------------------------------------- exercise 4: RoPE frequencies


def _rope_tables(length: int, d_head: int, base: float, *, exponent: str = "2i/d", swapped: bool = False,
                 doubled: bool = False, first_position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    position = torch.arange(first_position, first_position + length, dtype=torch.float64)[:, None]
    pair = torch.arange(0, d_head // 2, dtype=torch.float64)
    power = 2 * pair / d_head if exponent == "2i/d" else pair / d_head
    angles = position / base ** power
    if doubled:
        angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    return (sin, cos) if swapped else (cos, sin)


def _rope_table_mistake(what: str, fix: str, **switches) -> _Mistake:
    return _Mistake(what, fix, lambda length, d_head, base=10_000.0: _rope_tables(length, d_head, base, **switches))


_ROPE_TABLE_MISTAKES = (
    _rope_table_mistake("returned (sin, cos)", "return the cosines first: (cos, sin)", swapped=True),
    _rope_table_mistake("used the exponent i / d_head for pair i",
                        "pair i turns by position / base^(2i / d_head)", exponent="i/d"),
    _rope_table_mistake("returned d_head columns, each angle twice",
                        "the tables hold one column per pair of channels, d_head // 2 in all", doubled=True),
    _rope_table_mistake("numbered the positions from 1", "the first position is 0", first_position=1),
)


def check_rope_frequencies(rope_frequencies: Callable, cases: int = 6, seed: int = 4) -> None:
    """Exercise 4: ``rope_frequencies(length, d_head, base)`` → ``(cos, sin)``, each float32 ``(length, d_head // 2)``."""
    inputs = []
    for index in range(cases):
        length, d_head, base = _positions_inputs(Case(index, seed * 10_007 + index), width_low=2, width_high=16)
        inputs.append(((length, d_head, base), f"length={length}, d_head={d_head}, base={base:g}"))
    name = _name(rope_frequencies, "rope_frequencies")
    _compare(rope_frequencies, _rope_frequencies, inputs, name, atol=2e-5, rtol=1e-4, mistakes=_ROPE_TABLE_MISTAKES)
    print(f"✓ {name}: all {cases} test inputs match the reference.")


# ---------------------------------------------------------------- exercise 5: applying RoPE


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _rope_backwards(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1)


_ROPE_MISTAKES = (
    _Mistake("rotated the interleaved pairs (2i, 2i + 1)",
             "this course uses the rotate-half layout of GPT-NeoX and Llama, which pairs channel i with i + d_head/2",
             _rope_interleaved),
    _Mistake("rotated by -θ instead of θ",
             "the first half becomes x1·cos - x2·sin and the second x1·sin + x2·cos", _rope_backwards),
)


def _rope_inputs(case: Case) -> tuple:
    batch = [case.rng.randint(1, 3) for _ in range(case.rng.randint(0, 2))]
    length, d_head = case.rng.randint(2, 12), 2 * case.rng.randint(1, 8)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    cos, sin = _rope_frequencies(length, d_head, base=10_000.0 if case.index % 2 == 0 else 100.0)
    return case.randn(*batch, length, d_head, dtype=dtype), cos, sin


def check_apply_rope(apply_rope: Callable, cases: int = 6, seed: int = 5, shifts: int = 20) -> None:
    """Exercise 5: ``apply_rope(x, cos, sin)`` in the rotate-half layout, and the relative-position property."""
    name = _name(apply_rope, "apply_rope")
    inputs = []
    for index in range(cases):
        x, cos, sin = _rope_inputs(Case(index, seed * 10_007 + index))
        inputs.append(((x, cos, sin), f"{_dtype(x)} x of shape {tuple(x.shape)}, cos and sin of shape {tuple(cos.shape)}"))
    # The property first: a wrong formula that is not a rotation at all is best explained by what it breaks.
    largest = check_rope_relative_position(apply_rope, cases=shifts, seed=seed, quiet=True)
    _compare(apply_rope, _apply_rope, inputs, name, atol=1e-5, rtol=1e-4, mistakes=_ROPE_MISTAKES)
    print(f"✓ {name}: all {cases} test inputs match the reference, and on {shifts} random shifts the score "
          f"of a rotated query and key depends only on their distance (largest change {largest:.1e} of |q||k|).")


def check_rope_relative_position(apply_rope: Callable, cases: int = 20, seed: int = 6, d_head: int = 16,
                                 max_position: int = 200, quiet: bool = False) -> float:
    """RoPE's point: ``rope(q, m) · rope(k, n)`` equals ``rope(q, m + s) · rope(k, n + s)``, and lengths are kept.

    Uses the course's own frequency tables, so only ``apply_rope`` is tested. Returns the largest
    change of a score under a shift, relative to ``|q| |k|``.
    """
    name = _name(apply_rope, "apply_rope")
    cos, sin = _rope_frequencies(max_position, d_head)
    largest = 0.0

    def rotate(vector: torch.Tensor, position: int, label: str) -> torch.Tensor:
        row = slice(position, position + 1)  # x of shape (T=1, d_head) with the tables' row for that position
        out = call_learner(apply_rope, (vector[None, :].clone(), cos[row].clone(), sin[row].clone()), name, label,
                           reference=_apply_rope)
        if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (1, d_head)):
            raise CheckFailed(f"`{name}` returned {describe(out)} for x of shape (1, {d_head}) {label}, "
                              f"expected a tensor of shape (1, {d_head}).")
        return out[0].double()

    for index in range(cases):
        case = Case(index, seed * 10_007 + 300 + index)
        q, k = case.randn(d_head), case.randn(d_head)
        shift = case.rng.randint(1, max_position // 2)
        m, n = case.rng.randrange(max_position - shift), case.rng.randrange(max_position - shift)
        label = f"on relative-position test #{index + 1} (positions ({m}, {n}) and ({m + shift}, {n + shift}))"
        scale = float(q.norm() * k.norm())
        rotated_q = rotate(q, m, label)
        before, after = float(q.double().norm()), float(rotated_q.norm())
        if abs(after - before) > 1e-4 * before:
            raise CheckFailed(f"`{name}` changed the length of a vector from {before:.4g} to {after:.4g} {label}: "
                              f"a rotation keeps the length of every pair of channels.")
        score = float(rotated_q @ rotate(k, n, label))
        shifted = float(rotate(q, m + shift, label) @ rotate(k, n + shift, label))
        change = abs(shifted - score) / scale
        if change > 1e-4:
            raise CheckFailed(f"`{name}` gave the rotated query·key score {score:.4g} at positions ({m}, {n}) but "
                              f"{shifted:.4g} at ({m + shift}, {n + shift}) on relative-position test #{index + 1}: "
                              f"rotating each pair by an angle proportional to the position makes the score depend "
                              f"on m - n only.")
        largest = max(largest, change)
    if not quiet:
        print(f"✓ {name}: on {cases} random shifts the score of a rotated query and key depends only on their "
              f"distance (largest change {largest:.1e} of |q||k|).")
    return largest
