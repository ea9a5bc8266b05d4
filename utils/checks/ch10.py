"""Checks for chapter 10, LoRA and parameter-efficient fine-tuning.

Each ``check_*`` compares the learner's function with the reference in :mod:`utils.lora` on seeded
random inputs; ``seed`` and ``cases`` let the hidden tests use inputs the visible ones never showed.
The references are bound here, when the module is imported, before any learner code runs. The
test adapters have a random, non-zero ``B`` (as after training), so a missing or inverted
``alpha / r`` changes the result and is named.

The mistakes named in one sentence: ``B`` initialised randomly (the model would not start as the
base model), ``A`` zero as well (nothing would ever train), ``A`` and ``B`` with swapped shapes, an
``A`` far too large; a missing ``alpha / r`` scale, ``r / alpha``, ``alpha`` alone, a missing base
term, the scale on the base as well; a merge that forgets the scale, subtracts the update, returns
only the update or changes the weight in place; a DoRA norm over columns, over the whole matrix, of
``W`` instead of the adapted weight, and a missing magnitude.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..lora import dora_weight as _dora_weight
from ..lora import init_lora as _init_lora
from ..lora import lora_forward as _lora_forward
from ..lora import merge_lora as _merge_lora
from .core import (
    Case,
    CheckFailed,
    _name_the_mistake,
    call_learner,
    check_function,
    describe,
    difference,
)
from .core import function_name as _name


def _adapter(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """A weight ``(out, in)`` and a trained-looking adapter: A and B both random, alpha ≠ rank, alpha ≠ 1."""
    in_features, out_features = case.rng.choice([16, 24, 32]), case.rng.choice([8, 20, 40])
    rank = case.rng.choice([2, 4, 8])
    alpha = float(case.rng.choice([rank * 2, rank * 4, 3 * rank / 2 + 0.5]))
    weight = case.randn(out_features, in_features) / math.sqrt(in_features)
    a = case.randn(rank, in_features) / math.sqrt(in_features)
    b = case.randn(out_features, rank) * 0.3
    return weight, a, b, alpha, rank


# ---------------------------------------------------------------- exercise 1: initialisation


def _init_inputs(case: Case) -> tuple[int, int, int]:
    return case.rng.choice([32, 64, 96]), case.rng.choice([16, 48, 128]), case.rng.choice([1, 4, 8])


def check_init_lora(init_lora: Callable, cases: int = 5, seed: int = 1) -> None:
    """Exercise 1: ``init_lora(in_features, out_features, rank)`` → ``(A (rank, in), B (out, rank))``, B zeros."""
    name = _name(init_lora, "init_lora")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        in_features, out_features, rank = _init_inputs(case)
        label = f"on test input #{index + 1} (in_features={in_features}, out_features={out_features}, rank={rank})"
        torch.manual_seed(case.seed)  # a learner's torch.rand/randn draw from the global generator
        got = call_learner(init_lora, (in_features, out_features, rank), name, label, reference=_init_lora)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"`{name}` returned {describe(got)} {label}; return the tuple (A, B).")
        a, b = got
        for tensor, what in ((a, "A"), (b, "B")):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise CheckFailed(f"`{name}` returned {what} as {describe(tensor)} {label}; return float tensors.")
        if (tuple(a.shape), tuple(b.shape)) == ((out_features, rank), (rank, in_features)):
            raise CheckFailed(f"`{name}` returned A and B with each other's shapes {label}; A is (rank, in_features) "
                              f"= ({rank}, {in_features}), applied first, and B is (out_features, rank).")
        if tuple(a.shape) != (rank, in_features):
            raise CheckFailed(f"`{name}` returned A of shape {tuple(a.shape)} {label}, expected "
                              f"(rank, in_features) = ({rank}, {in_features}).")
        if tuple(b.shape) != (out_features, rank):
            raise CheckFailed(f"`{name}` returned B of shape {tuple(b.shape)} {label}, expected "
                              f"(out_features, rank) = ({out_features}, {rank}).")
        if not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
            raise CheckFailed(f"`{name}` returned a non-finite value in A or B {label}.")
        if bool((b != 0).any()):
            raise CheckFailed(f"`{name}` returned a B that is not all zeros {label} (initialised randomly?): then "
                              f"B A ≠ 0 and the adapted model no longer starts as the pretrained one; B starts at "
                              f"zeros, A at random.")
        if bool((a == 0).all()):
            raise CheckFailed(f"`{name}` returned an A of zeros {label}: with A = 0 and B = 0 the gradients of both "
                              f"are zero and the adapter never trains; draw A at random, uniform in "
                              f"±1/sqrt(in_features).")
        spread = float(a.std()) * math.sqrt(in_features) if a.numel() > 1 else float(a.abs().max()) * math.sqrt(
            in_features)
        if spread > 4.0 and not math.isclose(float(a.std()), 1 / rank, rel_tol=0.3):
            raise CheckFailed(f"`{name}` returned an A whose values are far too large (std {float(a.std()):.3g}) "
                              f"{label}; draw it uniform in ±1/sqrt(in_features), as nn.Linear does, so that "
                              f"x Aᵀ stays at the scale of x.")
        if spread < 0.05:
            raise CheckFailed(f"`{name}` returned an A whose values are nearly zero (std {float(a.std()):.3g}) "
                              f"{label}; draw it uniform in ±1/sqrt(in_features), so that B gets a gradient.")
        if rank > 1 and int(torch.linalg.matrix_rank(a.double())) < rank:
            raise CheckFailed(f"`{name}` returned an A whose {rank} rows are not independent {label} (the same "
                              f"row repeated?); draw every entry at random, or the update uses fewer than "
                              f"{rank} directions.")
    print(f"✓ {name}: right shapes, B zeros, A random at the right scale on all {cases} test inputs.")


# ---------------------------------------------------------------- exercise 2: the forward pass


def _forward_inputs(case: Case) -> tuple:
    weight, a, b, alpha, rank = _adapter(case)
    x = case.randn(case.rng.randint(1, 3), case.rng.randint(1, 6), weight.shape[1])
    return x, weight, a, b, alpha, rank


_FORWARD_MISTAKES = (
    ("left out the alpha / r scale of the update", lambda x, w, a, b, alpha, r: F.linear(x, w) + x @ a.t() @ b.t()),
    ("scaled the update by r / alpha instead of alpha / r",
     lambda x, w, a, b, alpha, r: F.linear(x, w) + (r / alpha) * (x @ a.t() @ b.t())),
    ("scaled the update by alpha alone, without dividing by r",
     lambda x, w, a, b, alpha, r: F.linear(x, w) + alpha * (x @ a.t() @ b.t())),
    ("scaled the update by 1 / r, without alpha",
     lambda x, w, a, b, alpha, r: F.linear(x, w) + (x @ a.t() @ b.t()) / r),
    ("returned only the update and left out the frozen base x Wᵀ",
     lambda x, w, a, b, alpha, r: (alpha / r) * (x @ a.t() @ b.t())),
    ("scaled the base output x Wᵀ by alpha / r as well; only the update is scaled",
     lambda x, w, a, b, alpha, r: (alpha / r) * (F.linear(x, w) + x @ a.t() @ b.t())),
)


def check_lora_forward(lora_forward: Callable, cases: int = 6, seed: int = 2) -> None:
    """Exercise 2: ``lora_forward(x, weight, A, B, alpha, rank)`` = ``x Wᵀ + (alpha / r) x Aᵀ Bᵀ``."""
    check_function(lora_forward, _lora_forward, _forward_inputs, name=_name(lora_forward, "lora_forward"),
                   cases=cases, seed=seed, atol=1e-5, rtol=1e-5, mistakes=_FORWARD_MISTAKES)


# ---------------------------------------------------------------- exercise 3: merging


_MERGE_MISTAKES = (
    (("forgot the alpha / r scale when merging, so the merged layer computes W + B A, not what the adapter "
      "computed"), lambda w, a, b, alpha, r: w + b @ a),
    ("scaled by r / alpha instead of alpha / r", lambda w, a, b, alpha, r: w + (r / alpha) * (b @ a)),
    ("subtracted the update (that is unmerging); merging adds (alpha / r) B A",
     lambda w, a, b, alpha, r: w - (alpha / r) * (b @ a)),
    ("returned only the update (alpha / r) B A; the merged weight is W plus it",
     lambda w, a, b, alpha, r: (alpha / r) * (b @ a)),
)


def check_merge_lora(merge_lora: Callable, cases: int = 6, seed: int = 3) -> None:
    """Exercise 3: ``merge_lora(weight, A, B, alpha, rank)`` = ``W + (alpha / r) B A``, a new tensor."""
    name = _name(merge_lora, "merge_lora")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        args = _adapter(case)
        label = f"on test input #{index + 1} (weight {describe(args[0])}, rank={args[4]}, alpha={args[3]:g})"
        mine = copy.deepcopy(args)
        got = call_learner(merge_lora, mine, name, label, reference=_merge_lora)
        expected = _merge_lora(*args)
        if difference(got, expected, atol=1e-5, rtol=1e-5) is None:
            if not torch.equal(mine[0], args[0]):
                raise CheckFailed(f"`{name}` changed `weight` in place {label}; return a new tensor "
                                  f"(weight + ...), so that the base weight stays as it was and the adapter "
                                  f"can be taken out again.")
            continue
        _name_the_mistake(got, expected, args, _MERGE_MISTAKES, name, index, atol=1e-5, rtol=1e-5)
        if isinstance(got, torch.Tensor) and got.dim() == 2 and tuple(got.shape) == tuple(reversed(expected.shape)):
            raise CheckFailed(f"`{name}` returned shape {tuple(got.shape)} {label}, the transpose of the weight's "
                              f"{tuple(expected.shape)}; the update is B A (out, r)·(r, in), not Aᵀ Bᵀ.")
        raise CheckFailed(f"`{name}` returned {difference(got, expected, atol=1e-5, rtol=1e-5)} {label}.")
    print(f"✓ {name}: all {cases} test inputs match the reference, and the base weight is left as it was.")


# ---------------------------------------------------------------- exercise 4: DoRA


def _dora_inputs(case: Case) -> tuple:
    weight, a, b, alpha, rank = _adapter(case)
    magnitude = weight.norm(dim=1) * torch.exp(0.3 * case.randn(weight.shape[0]))  # trained away from the norms
    return weight, a, b, magnitude, alpha, rank


def _adapted(w, a, b, alpha, r):
    return w + (alpha / r) * (b @ a)


_DORA_MISTAKES = (
    ("normalised the columns (norm over dim=0); DoRA gives each output row its own length: norm over dim=1",
     lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, alpha, r)
     / _adapted(w, a, b, alpha, r).norm(dim=0, keepdim=True)),
    ("divided by the norm of the whole matrix; each output row is divided by its own norm (dim=1)",
     lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, alpha, r) / _adapted(w, a, b, alpha, r).norm()),
    ("divided by the row norms of W; the direction is the *adapted* weight W + (alpha / r) B A over its own norms",
     lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, alpha, r) / w.norm(dim=1, keepdim=True)),
    ("left out the alpha / r scale of B A",
     lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, r, r) / _adapted(w, a, b, r, r).norm(
         dim=1, keepdim=True)),
    ("left out the magnitude; every row must be rescaled to length magnitude[row]",
     lambda w, a, b, m, alpha, r: _adapted(w, a, b, alpha, r) / _adapted(w, a, b, alpha, r).norm(dim=1,
                                                                                                 keepdim=True)),
)


def check_dora_weight(dora_weight: Callable, cases: int = 6, seed: int = 4) -> None:
    """Exercise 4: ``dora_weight(weight, A, B, magnitude, alpha, rank)``: rows of W + (alpha/r) B A of length m."""
    check_function(dora_weight, _dora_weight, _dora_inputs, name=_name(dora_weight, "dora_weight"),
                   cases=cases, seed=seed, atol=1e-5, rtol=1e-5, mistakes=_DORA_MISTAKES)
