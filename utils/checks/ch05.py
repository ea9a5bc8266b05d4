"""Checks for chapter 05, training and generation.

Batching, the learning-rate schedule and the sampling filters are compared with the references in
:mod:`utils.train` and :mod:`utils.generate`; cross-entropy with PyTorch's own
``F.cross_entropy``. ``seed`` and ``cases`` let the hidden tests use inputs the visible ones never
showed. The references are bound here, when the module is imported, before any learner code runs.

When an answer is wrong in a way learners often get it wrong (targets not shifted, a warm-up off
by one, a cosine that misses ``min_lr``, top-k keeping k-1 or k+1 tokens, top-p dropping the token
that crosses p, no max trick, a sum instead of a mean), the sentence names that mistake; otherwise
it reports the first differing element, never the expected answer itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..generate import top_k_filter as _top_k_filter
from ..generate import top_p_filter as _top_p_filter
from ..train import get_batch as _get_batch
from ..train import learning_rate as _learning_rate
from .core import Case, CheckFailed, Forbidden, call_learner, describe, difference
from .core import function_name as _name

_torch_cross_entropy = F.cross_entropy


def _run(fn: Callable, args: tuple, name: str, label: str, reference: Callable, forbidden: tuple = ()):
    """The learner's result on a private copy of ``args``; exceptions and shortcuts become one sentence."""
    return call_learner(fn, copy.deepcopy(args), name, label, forbidden, reference=reference)


# ---------------------------------------------------------------- exercise 1: batches


def _batch_inputs(case: Case) -> tuple[torch.Tensor, int, int, int]:
    """A token stream, a batch size, a context length and the seed of the generator to draw with."""
    context = case.rng.randint(1, 16)
    length = case.rng.randint(context + 2, context + 300)
    data = case.randint(0, 77, (length,))
    return data, case.rng.randint(1, 8), context, case.rng.randrange(2**31)


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int, shift: int) -> torch.Tensor | None:
    if int(starts.max()) + shift + context > len(data):
        return None
    return torch.stack([data[s + shift:s + shift + context] for s in starts.tolist()])


def check_get_batch(get_batch: Callable, cases: int = 6, seed: int = 1) -> None:
    """Exercise 1: ``get_batch(data, batch_size, context_length, generator)`` draws exactly the reference's windows."""
    name = _name(get_batch, "get_batch")
    for index in range(cases):
        data, batch_size, context, generator_seed = _batch_inputs(Case(index, seed * 10_007 + index))
        label = (f"on test input #{index + 1} ({describe(data)}, batch_size={batch_size}, "
                 f"context_length={context})")
        expected = _get_batch(data, batch_size, context, torch.Generator().manual_seed(generator_seed))
        got = _run(get_batch, (data, batch_size, context, torch.Generator().manual_seed(generator_seed)),
                   name, label, _get_batch)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"`{name}` returned {describe(got)} {label}; return a pair (x, y) of tensors.")
        (x, y), (x_expected, y_expected) = got, expected
        found = difference(x, x_expected, atol=0, rtol=0)
        if found and isinstance(x, torch.Tensor) and x.shape == x_expected.shape and x.dtype == x_expected.dtype:
            raise CheckFailed(f"`{name}` returned inputs x that start at other positions than the reference's {label}: "
                              f"draw all the starts with the one call torch.randint(len(data) - context_length - 1, "
                              f"(batch_size,), generator=generator), before anything else uses the generator.")
        if found:
            raise CheckFailed(f"`{name}` returned inputs x with {found} {label}.")
        found = difference(y, y_expected, atol=0, rtol=0)
        if found is None:
            continue
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, x):
            raise CheckFailed(f"`{name}` returned targets y equal to the inputs x {label}: y must be the same windows "
                              f"shifted one token to the right, so that y[:, t] is the token that follows x[:, t].")
        if isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype:
            starts = torch.randint(len(data) - context - 1, (batch_size,),
                                   generator=torch.Generator().manual_seed(generator_seed))
            for shift in (2, 0, -1):
                if starts.min() + shift >= 0 and (window := _windows(data, starts, context, shift)) is not None \
                        and torch.equal(y, window):
                    raise CheckFailed(f"`{name}` returned targets y shifted by {shift} tokens from the inputs {label}: "
                                      f"the shift must be exactly one, y = data[start + 1 : start + 1 + context_length].")
        raise CheckFailed(f"`{name}` returned targets y with {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs give exactly the reference's batches.")


# ---------------------------------------------------------------- exercise 2: cross-entropy

_CROSS_ENTROPY_SHORTCUTS = (
    Forbidden(_torch_cross_entropy, "torch.nn.functional.cross_entropy"),
    Forbidden(F.nll_loss, "torch.nn.functional.nll_loss"),
    Forbidden(F.log_softmax, "torch.nn.functional.log_softmax"),
    Forbidden(torch.log_softmax, "torch.log_softmax"),
    Forbidden(torch.Tensor.log_softmax, "Tensor.log_softmax"),
    Forbidden(torch.special.log_softmax, "torch.special.log_softmax"),
)


def _reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exercise 2's reference: PyTorch's cross-entropy over every position, averaged."""
    return _torch_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _cross_entropy_inputs(case: Case, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(..., vocab)`` with 1 to 3 leading dimensions, and targets of the leading shape."""
    leading = [case.rng.randint(1, 6) for _ in range(case.rng.randint(1, 3))]
    vocab = case.rng.randint(2, 40)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    logits = case.randn(*leading, vocab, dtype=dtype) * case.rng.choice([0.5, 1.0, 3.0]) * scale
    return logits, case.randint(0, vocab, leading)


def _huge_cross_entropy_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits around ±1000, as an over-confident model produces: exp overflows in every dtype."""
    logits, targets = _cross_entropy_inputs(case, scale=1.0)
    offsets = torch.where(torch.rand(logits.shape[:-1], generator=case.gen) < 0.5, 1000.0, -1000.0)
    return logits * 30 + offsets.to(logits.dtype)[..., None], targets


def _compare_cross_entropy(name: str, got, expected: torch.Tensor, logits: torch.Tensor, label: str) -> None:
    if isinstance(got, torch.Tensor) and got.numel() == 1 and got.is_floating_point():
        value, correct = float(got.detach()), float(expected)
        if not math.isfinite(value) and math.isfinite(correct):
            raise CheckFailed(f"`{name}` returned {value} {label}, where the loss is finite: exp overflowed or a "
                              f"probability underflowed to 0 before the log; subtract each row's largest logit "
                              f"before exponentiating (the max trick), or use torch.logsumexp.")
        positions = logits[..., 0].numel()
        if positions > 1 and abs(correct) > 1e-3 and math.isclose(value, correct * positions, rel_tol=1e-4):
            raise CheckFailed(f"`{name}` returned the sum of the {positions} per-position losses {label}; "
                              f"return their mean, so that the loss does not grow with the batch size.")
    # Around ±1000 a float32 holds about 4 decimals after the point, so a correct answer may round differently.
    huge = float(logits.detach().abs().max()) > 100
    found = difference(got, expected, atol=1e-3 if huge else 1e-5, rtol=1e-5)
    if found:
        raise CheckFailed(f"`{name}` returned {found} {label}.")


def check_cross_entropy(cross_entropy: Callable, cases: int = 6, seed: int = 2) -> None:
    """Exercise 2: ``cross_entropy(logits, targets)``: the mean over positions, stable for huge logits."""
    name = _name(cross_entropy, "cross_entropy")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        make = _huge_cross_entropy_inputs if index % 3 == 1 else _cross_entropy_inputs
        logits, targets = make(case)
        size = "huge logits, " if make is _huge_cross_entropy_inputs else ""
        label = f"on test input #{index + 1} ({size}logits {describe(logits)}, targets {describe(targets)})"
        expected = _reference_cross_entropy(logits, targets)
        got = _run(cross_entropy, (logits, targets), name, label, _reference_cross_entropy, _CROSS_ENTROPY_SHORTCUTS)
        _compare_cross_entropy(name, got, expected, logits, label)
    print(f"✓ {name}: all {cases} test inputs match PyTorch's cross-entropy, huge logits included.")


def check_cross_entropy_gradient(cross_entropy: Callable, seed: int = 3) -> None:
    """Exercise 2, hidden: the gradient with respect to the logits is PyTorch's, softmax minus one-hot over N."""
    name = _name(cross_entropy, "cross_entropy")
    logits, targets = _cross_entropy_inputs(Case(0, seed))
    mine = logits.clone().requires_grad_(True)
    label = "on the gradient test"
    got = call_learner(cross_entropy, (mine, targets), name, label, _CROSS_ENTROPY_SHORTCUTS,
                       reference=_reference_cross_entropy)
    if not isinstance(got, torch.Tensor) or not got.requires_grad:
        raise CheckFailed(f"`{name}` returned {describe(got)} that does not depend on the logits, so training "
                          f"could not backpropagate through it; keep the computation in torch.")
    got.backward()
    reference = logits.clone().requires_grad_(True)
    _reference_cross_entropy(reference, targets).backward()
    found = difference(mine.grad, reference.grad, atol=1e-6, rtol=1e-4)
    if found:
        raise CheckFailed(f"The gradient of `{name}` with respect to the logits gave {found}.")
    print(f"✓ {name}: its gradient with respect to the logits matches PyTorch's.")


# ---------------------------------------------------------------- exercise 3: the learning-rate schedule


def _schedule_inputs(case: Case) -> tuple[float, float, int, int]:
    max_lr = case.rng.choice([1e-3, 3e-3, 6e-4, 1.0])
    min_lr = max_lr * case.rng.choice([0.0, 0.1, 0.05])
    warmup = case.rng.randint(1, 50)
    return max_lr, min_lr, warmup, warmup + case.rng.randint(1, 400)


def _schedule_steps(case: Case, warmup: int, max_steps: int) -> list[int]:
    """The steps where mistakes show (the ends of both phases, past the end) and a few random ones."""
    marks = [0, 1, warmup - 1, warmup, warmup + 1, (warmup + max_steps) // 2, max_steps - 1, max_steps,
             max_steps + 1, max_steps + 100]
    marks += [case.rng.randrange(max_steps + 10) for _ in range(6)]
    return sorted({s for s in marks if s >= 0})


def _schedule_hint(got, step: int, max_lr: float, min_lr: float, warmup: int, max_steps: int) -> str | None:
    try:
        value = float(got)
    except (TypeError, ValueError, RuntimeError):  # not a number, or a tensor of several
        return None

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)

    if step < warmup and (close(value, max_lr * step / warmup) or close(value, max_lr * (step + 1) / (warmup + 1))):
        return ("the warm-up is off by one: step s of the warm-up should use max_lr * (s + 1) / warmup_steps, "
                "so that step 0 already moves and step warmup_steps - 1 reaches max_lr")
    if step >= warmup and close(value, max_lr * _learning_rate(step, 1.0, 0.0, warmup, max_steps)) and min_lr > 0:
        return "the cosine decays to 0 instead of to min_lr: scale it between min_lr and max_lr"
    if step == max_steps:
        return ("the cosine does not reach min_lr at max_steps: its progress should run from 0 at warmup_steps "
                "to 1 at max_steps, (step - warmup_steps) / (max_steps - warmup_steps)")
    if step > max_steps:
        return "after max_steps the rate should stay at min_lr"
    return None


def check_learning_rate(learning_rate: Callable, cases: int = 6, seed: int = 4) -> None:
    """Exercise 3: ``learning_rate(step, max_lr, min_lr, warmup_steps, max_steps)`` at the steps where mistakes show."""
    name = _name(learning_rate, "learning_rate")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        max_lr, min_lr, warmup, max_steps = _schedule_inputs(case)
        settings = f"max_lr={max_lr:g}, min_lr={min_lr:g}, warmup_steps={warmup}, max_steps={max_steps}"
        # The end of the cosine first: a schedule that never reaches min_lr is named as such.
        for step in [max_steps] + _schedule_steps(case, warmup, max_steps):
            args = (step, max_lr, min_lr, warmup, max_steps)
            label = f"at step {step} ({settings})"
            got = _run(learning_rate, args, name, label, _learning_rate)
            expected = _learning_rate(*args)
            found = difference(got, expected, atol=1e-12, rtol=1e-6)
            if found is None:
                continue
            hint = _schedule_hint(got, step, *args[1:])
            raise CheckFailed(f"`{name}` returned {found} {label}" + (f"; {hint}." if hint else "."))
    print(f"✓ {name}: all {cases} schedules match the reference at every step tested.")


# ---------------------------------------------------------------- exercise 4: top-k


def _top_k_inputs(case: Case) -> tuple[torch.Tensor, int]:
    """Logits ``(..., vocab)``; every third input has whole-number logits, so ties with the k-th are common."""
    leading = [case.rng.randint(1, 4) for _ in range(case.rng.randint(0, 2))]
    vocab = case.rng.randint(2, 30)
    if case.index % 3 == 1:
        logits = case.randint(-3, 4, (*leading, vocab)).float()
    else:
        dtype = torch.float64 if case.index % 3 == 2 else torch.float32
        logits = case.randn(*leading, vocab, dtype=dtype) * 2
    return logits, case.rng.randint(1, vocab)


def _kept(logits) -> torch.Tensor | None:
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        return (logits.detach() > float("-inf")).sum(-1)
    return None


def _excluded_hint(got, expected: torch.Tensor, logits: torch.Tensor) -> tuple[str, str] | None:
    """The right tokens kept, but the dropped ones set to a finite number rather than -inf."""
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not got.is_floating_point():
        return None
    got = got.detach()
    dropped = torch.isneginf(expected)
    filled = dropped & ~torch.isneginf(got) & (got != logits)
    if torch.equal(got[~dropped], expected[~dropped]) and filled.any():
        return (f"set a dropped logit to {got[filled][0].item():g}",
                "use -inf, the only value the softmax turns into a probability of exactly 0")
    return None


def _top_k_hint(got, logits: torch.Tensor, k: int) -> tuple[str, str] | None:
    """Name the usual mistakes by comparing with them: > instead of >=, exactly k without ties, k + 1."""
    if not isinstance(got, torch.Tensor) or got.shape != logits.shape or got.dtype != logits.dtype:
        return None
    expected = _top_k_filter(logits, k)
    excluded = _excluded_hint(got, expected, logits)
    if excluded:
        return excluded
    values = torch.sort(logits, dim=-1, descending=True).values
    minus_inf = float("-inf")
    if torch.equal(got, logits.masked_fill(logits <= values[..., k - 1:k], minus_inf)):
        return "dropped the k-th largest logit itself", "keep every logit >= the k-th largest (>=, not >)"
    top = torch.topk(logits, k, dim=-1)
    exactly_k = torch.full_like(logits, minus_inf).scatter(-1, top.indices, top.values)
    kept, kept_expected = _kept(got), _kept(expected)
    if not torch.equal(exactly_k, expected) and bool(kept.eq(k).all()):
        return ("kept exactly k logits but dropped others tied with the k-th largest",
                "keep every logit >= the k-th largest")
    if k < logits.shape[-1] and torch.equal(got, logits.masked_fill(logits < values[..., k:k + 1], minus_inf)):
        return "kept the k + 1 largest logits", "the k-th largest is values[..., k - 1] when counting from 0"
    if bool((kept > kept_expected).any()):
        return "kept more logits than the k largest and their ties", "keep every logit >= the k-th largest"
    if bool((kept < kept_expected).any()):
        return "kept fewer logits than the k largest and their ties", "keep every logit >= the k-th largest"
    return None


def check_top_k_filter(top_k_filter: Callable, cases: int = 8, seed: int = 5) -> None:
    """Exercise 4: ``top_k_filter(logits, k)`` keeps every logit at least the k-th largest, the rest become -inf."""
    name = _name(top_k_filter, "top_k_filter")
    for index in range(cases):
        logits, k = _top_k_inputs(Case(index, seed * 10_007 + index))
        label = f"on test input #{index + 1} ({describe(logits)}, k={k})"
        expected = _top_k_filter(logits, k)
        got = _run(top_k_filter, (logits, k), name, label, _top_k_filter)
        found = difference(got, expected, atol=0, rtol=0)
        if found is None:
            continue
        hint = _top_k_hint(got, logits, k)
        if hint:
            raise CheckFailed(f"`{name}` {hint[0]} {label}: {hint[1]}.")
        raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs match the reference, ties included.")


# ---------------------------------------------------------------- exercise 5: top-p


def _top_p_inputs(case: Case) -> tuple[torch.Tensor, float]:
    """Logits ``(..., vocab)`` from flat to peaked, and a p in [0.05, 0.95]."""
    leading = [case.rng.randint(1, 4) for _ in range(case.rng.randint(0, 2))]
    vocab = case.rng.randint(2, 30)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    logits = case.randn(*leading, vocab, dtype=dtype) * case.rng.choice([0.5, 1.5, 4.0])
    return logits, round(case.rng.uniform(0.05, 0.95), 3)


def _check_top_p_one(name: str, top_p_filter: Callable, logits: torch.Tensor, p: float, label: str) -> None:
    expected = _top_p_filter(logits, p)
    got = _run(top_p_filter, (logits, p), name, label, _top_p_filter)
    found = difference(got, expected, atol=0, rtol=0)
    if found is None:
        return
    excluded = _excluded_hint(got, expected, logits)
    if excluded:
        raise CheckFailed(f"`{name}` {excluded[0]} {label}: {excluded[1]}.")
    kept, kept_expected = _kept(got), _kept(expected)
    if kept is not None and kept.shape == kept_expected.shape:
        if bool((kept < kept_expected).any()):
            if bool((kept == 0).any()):
                raise CheckFailed(f"`{name}` dropped every token of a row {label}: the most likely token must "
                                  f"always be kept.")
            raise CheckFailed(f"`{name}` dropped the token whose probability takes the running total past p "
                              f"{label}: keep a token when the probability of the tokens ranked above it is still "
                              f"below p, so that the kept tokens reach p.")
        if bool((kept > kept_expected).any()):
            raise CheckFailed(f"`{name}` kept more tokens than the smallest set that reaches p {label}: stop "
                              f"after the first token whose running total reaches p.")
        if torch.equal(kept, kept_expected) and got.shape == expected.shape:
            raise CheckFailed(f"`{name}` kept the right number of tokens but not the right ones {label}: map the "
                              f"mask from sorted order back to the original token positions.")
    raise CheckFailed(f"`{name}` returned {found} {label}.")


def check_top_p_filter(top_p_filter: Callable, cases: int = 8, seed: int = 6) -> None:
    """Exercise 5: ``top_p_filter(logits, p)`` keeps the smallest set of most likely tokens whose probability reaches p."""
    name = _name(top_p_filter, "top_p_filter")
    for index in range(cases):
        logits, p = _top_p_inputs(Case(index, seed * 10_007 + index))
        _check_top_p_one(name, top_p_filter, logits, p, f"on test input #{index + 1} ({describe(logits)}, p={p:g})")
    print(f"✓ {name}: all {cases} test inputs match the reference.")


def check_top_p_edges(top_p_filter: Callable) -> None:
    """Exercise 5, hidden: a tiny p keeps only the top token; a p near 1 keeps all of a flat row."""
    name = _name(top_p_filter, "top_p_filter")
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 2.9, -5.0, 0.0]])
    _check_top_p_one(name, top_p_filter, logits, 0.01, "with p=0.01 (only the most likely token should stay)")
    flat = torch.linspace(-0.01, 0.01, 6)[None, :]
    _check_top_p_one(name, top_p_filter, flat, 0.99, "on a nearly flat row with p=0.99 (every token should stay)")
    print(f"✓ {name}: the edge cases keep the right tokens.")
