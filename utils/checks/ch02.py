"""Checks for chapter 02, attention.

Softmax and the masks are compared with the references in :mod:`utils.attention`; the learner's
attention is compared with PyTorch's own ``F.scaled_dot_product_attention``, which follows the
course's mask convention (a boolean mask, True where a query may attend to a key). ``seed`` and
``cases`` let the hidden tests use inputs the visible ones never showed. The references are bound
here, when the module is imported, before any learner code runs.

When an answer is wrong in a way learners often get it wrong (no max trick, normalizing over the
wrong dimension, the wrong scale, an inverted mask), the sentence names that mistake; otherwise
it reports the first differing element, never the expected answer itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..attention import causal_mask as _causal_mask
from ..attention import padding_mask as _padding_mask
from ..attention import scaled_dot_product_attention as _course_attention
from ..attention import softmax as _softmax
from .core import Case, CheckFailed, Forbidden, call_learner, describe, difference

_torch_attention = F.scaled_dot_product_attention

# Exercise 1 is the softmax itself, so every library softmax is a shortcut (log_softmax too: exp of it is one).
_SOFTMAX_SHORTCUTS = (
    Forbidden(torch.softmax, "torch.softmax"),
    Forbidden(torch.special.softmax, "torch.special.softmax"),
    Forbidden(torch.Tensor.softmax, "Tensor.softmax"),
    Forbidden(F.softmax, "torch.nn.functional.softmax"),
    Forbidden(torch.log_softmax, "torch.log_softmax"),
    Forbidden(torch.Tensor.log_softmax, "Tensor.log_softmax"),
    Forbidden(F.log_softmax, "torch.nn.functional.log_softmax"),
)

# Exercise 2 may use any softmax, but not a ready-made attention.
_ATTENTION_SHORTCUTS = (
    Forbidden(_torch_attention, "torch.nn.functional.scaled_dot_product_attention"),
    Forbidden(_course_attention, "the course's own utils.attention.scaled_dot_product_attention"),
)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                         scale: float | None = None) -> torch.Tensor:
    """Exercise 2's reference: PyTorch's attention; its boolean ``attn_mask`` means 'may attend' too."""
    return _torch_attention(q, k, v, attn_mask=mask, scale=scale)


def _run(fn: Callable, args: tuple, name: str, label: str, reference: Callable,
         forbidden: tuple = ()) -> torch.Tensor:
    """The learner's result on a private copy of ``args``; exceptions and shortcuts become one sentence."""
    return call_learner(fn, copy.deepcopy(args), name, label, forbidden, reference=reference)


def _same(got, expected, atol: float, rtol: float) -> bool:
    return difference(got, expected, atol=atol, rtol=rtol) is None


def _nonfinite_where_finite(got, expected) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.is_floating_point()
            and bool((~torch.isfinite(got.detach()) & torch.isfinite(expected)).any()))


# ---------------------------------------------------------------- exercise 1: softmax


def _random_logits(case: Case, scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """Logits of 1 to 3 dimensions (sizes 1 to 7) and a dimension to normalize over, often not the last."""
    shape = [case.rng.randint(1, 7) for _ in range(case.rng.randint(1, 3))]
    if len(shape) > 1:
        shape[case.rng.randrange(len(shape))] = case.rng.randint(3, 7)  # at least one real distribution
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    dim = case.rng.randrange(-len(shape), len(shape))
    return case.randn(*shape, dtype=dtype) * scale, dim


def _huge_logits(case: Case) -> tuple[torch.Tensor, int]:
    """Rows of logits around ±1000: exp overflows (and underflows) in every floating-point dtype but float64's top."""
    rows, width = case.rng.randint(2, 5), case.rng.randint(2, 8)
    offsets = torch.tensor([1000.0 if row % 2 == 0 else -1000.0 for row in range(rows)])[:, None]
    return case.randn(rows, width) * 30 + offsets, -1


def _masked_logits(case: Case) -> tuple[torch.Tensor, int]:
    """Logits with some -inf entries, as a masked attention row has, and one row that is entirely -inf."""
    rows, width = case.rng.randint(2, 5), case.rng.randint(2, 8)
    logits = case.randn(rows, width)
    logits[torch.rand(rows, width, generator=case.gen) < 0.4] = float("-inf")
    logits[:, case.rng.randrange(width)] = case.randn(rows)  # every row keeps at least one finite logit...
    logits[case.rng.randrange(rows)] = float("-inf")  # ...except this one: every key masked
    return logits, -1


def check_softmax(softmax: Callable, cases: int = 6, seed: int = 1) -> None:
    """Exercise 1: ``softmax(x, dim)``, stable for huge logits, zeros for a row that is all -inf."""
    name = getattr(softmax, "__name__", "softmax")
    for index in range(cases):
        x, dim = _random_logits(Case(index, seed * 10_007 + index))
        label = f"on test input #{index + 1} ({describe(x)}, dim={dim})"
        expected = _softmax(x, dim)
        got = _run(softmax, (x, dim), name, label, _softmax, _SOFTMAX_SHORTCUTS)
        found = difference(got, expected, atol=1e-6, rtol=1e-5)
        if found is None:
            continue
        sums = got.sum(dim=dim) if isinstance(got, torch.Tensor) and got.shape == x.shape else None
        if sums is not None and torch.isfinite(sums).all() and not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise CheckFailed(f"`{name}` returned values that do not sum to 1 along dim={dim} {label}: "
                              f"normalize over the dimension the caller passes as `dim`.")
        raise CheckFailed(f"`{name}` returned {found} {label}.")

    for index in range(cases):
        x, dim = _huge_logits(Case(index, seed * 10_007 + 500 + index))
        label = f"on test input #{index + 1} of the large-logit tests ({describe(x)} with logits near ±1000)"
        expected = _softmax(x, dim)
        got = _run(softmax, (x, dim), name, label, _softmax, _SOFTMAX_SHORTCUTS)
        if _nonfinite_where_finite(got, expected):
            raise CheckFailed(f"`{name}` returned NaN or inf {label}: exp overflows above about 88 in float32 "
                              f"(and every term can underflow to 0), so subtract each row's maximum before "
                              f"exponentiating (the max trick).")
        found = difference(got, expected, atol=1e-6, rtol=1e-5)
        if found:
            raise CheckFailed(f"`{name}` returned {found} {label}.")

    for index in range(cases):
        x, dim = _masked_logits(Case(index, seed * 10_007 + 900 + index))
        label = f"on test input #{index + 1} of the masked tests ({describe(x)} with -inf entries)"
        expected = _softmax(x, dim)
        got = _run(softmax, (x, dim), name, label, _softmax, _SOFTMAX_SHORTCUTS)
        if _nonfinite_where_finite(got, expected):
            all_masked = torch.isinf(x).all(dim=-1)
            bad_rows = (~torch.isfinite(got.detach())).any(dim=-1)
            if bool((bad_rows & all_masked).any()) and not bool((bad_rows & ~all_masked).any()):
                raise CheckFailed(f"`{name}` returned NaN for a row whose logits are all -inf {label}: "
                                  f"such a row has no distribution, and the contract asks for zeros there.")
        found = difference(got, expected, atol=1e-6, rtol=1e-5)
        if found:
            raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {3 * cases} test inputs match the reference, "
          f"including logits near ±1000 and rows of -inf.")


# ---------------------------------------------------------------- exercise 2: scaled dot-product attention


def _attention_inputs(case: Case, mask_kind: str | None = None) -> tuple:
    """q, k, v with 0 to 2 batch dimensions, T_q != T_k and d != d_v in general, and maybe a mask.

    ``d`` is at least 3 so that dividing by d, by sqrt(d) and by nothing all give different answers.
    Every query may attend to at least one key; ``_fully_masked_inputs`` covers the other case.
    """
    mask_kind = mask_kind or ["none", "causal", "keys", "full"][case.index % 4]
    batch = [case.rng.randint(1, 3) for _ in range(case.rng.randint(0, 2))]
    t_q = case.rng.randint(1, 7)
    t_k = t_q if mask_kind == "causal" else case.rng.randint(2, 7)
    d, d_v = case.rng.randint(3, 16), case.rng.randint(1, 8)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    q = case.randn(*batch, t_q, d, dtype=dtype) * 2  # scores of a few units: a wrong scale shows
    k = case.randn(*batch, t_k, d, dtype=dtype)
    v = case.randn(*batch, t_k, d_v, dtype=dtype)
    if mask_kind == "none":
        return q, k, v, None
    if mask_kind == "causal":
        return q, k, v, torch.ones(t_q, t_q, dtype=torch.bool).tril()
    rows = 1 if mask_kind == "keys" else t_q  # (..., 1, T_k) broadcasts over queries, like a padding mask
    mask = torch.rand(*batch, rows, t_k, generator=case.gen) < 0.6
    kept = torch.randint(0, t_k, mask.shape[:-1], generator=case.gen)
    return q, k, v, mask | F.one_hot(kept, t_k).bool()


def _fully_masked_inputs(case: Case) -> tuple:
    """A mask under which one query may attend to no key at all (think of a padded query of an empty sequence)."""
    q, k, v, mask = _attention_inputs(case, mask_kind="full")
    mask[..., case.rng.randrange(mask.shape[-2]), :] = False
    return q, k, v, mask


def _attention_mistake(got, q, k, v, mask) -> tuple[str, str] | None:
    """(what went wrong, how to fix it) for a common mistake that reproduces ``got``, if one does."""
    if not (isinstance(got, torch.Tensor) and got.shape[:-1] == q.shape[:-1] and got.dtype == q.dtype):
        return None
    d = q.shape[-1]
    if _same(got, _reference_attention(q, k, v, mask, scale=1.0), 1e-5, 1e-4):
        return "did not scale the scores", "divide q·kᵀ by sqrt(d), where d is the size of the last dimension of q"
    if _same(got, _reference_attention(q, k, v, mask, scale=1.0 / d), 1e-5, 1e-4):
        return "divided the scores by d", "the scale is 1/sqrt(d), which keeps the scores' variance near 1"
    if mask is not None and _same(got, _reference_attention(q, k, v, ~mask), 1e-5, 1e-4):
        return ("treated True in the mask as 'hidden'",
                "in this course, as in PyTorch, True means 'may attend' and False means 'hidden'")
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if _same(got, _softmax(scores, dim=-2) @ v, 1e-5, 1e-4):
        return ("normalized the weights over the queries (dim -2)",
                "each query's weights over the keys (dim -1) must sum to 1")
    return None


def check_attention(scaled_dot_product_attention: Callable, cases: int = 8, seed: int = 2) -> None:
    """Exercise 2: ``scaled_dot_product_attention(q, k, v, mask=None)`` against PyTorch's, without calling it."""
    fn = scaled_dot_product_attention
    name = getattr(fn, "__name__", "scaled_dot_product_attention")
    fully_masked_cases = max(2, cases // 3)
    stages = [(_attention_inputs, cases, 0, ""), (_fully_masked_inputs, fully_masked_cases, 700, " of the fully-masked tests")]
    for make, count, offset, kind in stages:
        for index in range(count):
            q, k, v, mask = make(Case(index, seed * 10_007 + offset + index))
            shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            masked = "no mask" if mask is None else f"a mask of shape {tuple(mask.shape)}"
            label = f"on test input #{index + 1}{kind} ({str(q.dtype).replace('torch.', '')} {shapes}, {masked})"
            expected = _reference_attention(q, k, v, mask)
            got = _run(fn, (q, k, v, mask), name, label, _reference_attention, _ATTENTION_SHORTCUTS)
            found = difference(got, expected, atol=1e-5, rtol=1e-4)
            if found is None:
                continue
            if kind:
                _explain_fully_masked(got, expected, mask, name, label)
            mistake = _attention_mistake(got, q, k, v, mask)
            if mistake:
                raise CheckFailed(f"`{name}` {mistake[0]} {label}: {mistake[1]}.")
            raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: matches torch.nn.functional.scaled_dot_product_attention on all "
          f"{cases + fully_masked_cases} test inputs, masked and unmasked.")


def _explain_fully_masked(got, expected, mask, name: str, label: str) -> None:
    """If only the queries that may attend to nothing are wrong, say what those should give."""
    if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype):
        return
    nothing_visible = ~mask.any(dim=-1)  # (..., T_q), broadcast like the scores
    row_wrong = ~torch.isclose(got.detach(), expected, atol=1e-5, rtol=1e-4).all(dim=-1)
    nothing_visible = nothing_visible.expand(row_wrong.shape)
    if not bool((row_wrong & ~nothing_visible).any()):
        if not bool(torch.isfinite(got.detach()).all()):
            raise CheckFailed(f"`{name}` returned NaN for a query whose keys are all masked {label}: its scores "
                              f"are all -inf, and a softmax like exercise 1's turns such a row into zeros.")
        raise CheckFailed(f"`{name}` returned a nonzero output for a query whose keys are all masked {label}: "
                          f"fill hidden scores with float('-inf'), not a large negative number, so that such a "
                          f"query gets zero weights.")


# ---------------------------------------------------------------- exercises 3 and 4: masks


def _check_mask(fn: Callable, reference: Callable, inputs: list[tuple[tuple, str]], name: str, what: str) -> None:
    for index, (args, shown) in enumerate(inputs):
        label = f"on test input #{index + 1} ({shown})"
        got = _run(fn, args, name, label, reference)
        found = difference(got, reference(*args))
        if found:
            raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {len(inputs)} test inputs match the reference {what}.")


def check_causal_mask(causal_mask: Callable, cases: int = 6, seed: int = 3) -> None:
    """Exercise 3: ``causal_mask(length)``, a ``(length, length)`` bool tensor, True on and below the diagonal."""
    lengths = [1] + [Case(index, seed * 10_007 + index).rng.randint(2, 16) for index in range(1, cases)]
    inputs = [((length,), f"length={length}") for length in lengths]
    _check_mask(causal_mask, _causal_mask, inputs, getattr(causal_mask, "__name__", "causal_mask"),
                "(lengths 1 to 16)")


def check_padding_mask(padding_mask: Callable, cases: int = 6, seed: int = 4) -> None:
    """Exercise 4: ``padding_mask(lengths, length)``, a ``(batch, 1, length)`` bool tensor."""
    inputs = []
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        length, batch = case.rng.randint(1, 10), case.rng.randint(1, 5)
        lengths = case.randint(0, length + 1, (batch,))
        if index == 1:  # an empty sequence and a full one side by side
            lengths = torch.tensor([0, length])
        inputs.append(((lengths, length), f"lengths={lengths.tolist()}, length={length}"))
    _check_mask(padding_mask, _padding_mask, inputs, getattr(padding_mask, "__name__", "padding_mask"),
                "(empty and full sequences included)")
