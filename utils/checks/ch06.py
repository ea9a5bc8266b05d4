"""Checks for chapter 06, looking inside.

Each ``check_*`` compares the learner's function with the reference in :mod:`utils.interpret` on
seeded random inputs; ``seed`` and ``cases`` let the hidden tests use inputs the visible ones never
showed. When an answer differs, the check tries the classic mistakes of the exercise (the wrong
diagonal, layers multiplied in the wrong order, no residual, no renormalisation, the gradient
without the input, a norm instead of the signed sum, the wrong target, the bias or the ridge left
out) and names the one that reproduces the learner's output in a single sentence.
The references are bound here, when the module is imported, before any learner code runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..interpret import attention_rollout as _attention_rollout
from ..interpret import fit_linear_probe as _fit_linear_probe
from ..interpret import gradient_times_input as _gradient_times_input
from ..interpret import previous_token_score as _previous_token_score
from .core import Case, CheckFailed, call_learner, check_function, describe, difference
from .core import function_name as _name


def _attention_weights(case: Case, *leading: int, length: int) -> torch.Tensor:
    """Rows that sum to 1, sharp or flat; every other input causal, as in a GPT (the first one is not:
    some mistakes only show where a query also sees later keys)."""
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    scores = case.randn(*leading, length, length, dtype=dtype) * case.rng.choice([0.5, 2.0, 4.0])
    if case.index % 2 == 1:
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1)


# ---------------------------------------------------------------- exercise 1: previous-token score


def _previous_inputs(case: Case) -> tuple[torch.Tensor]:
    leading = [case.rng.randint(1, 4) for _ in range(case.rng.randint(0, 2))]
    return (_attention_weights(case, *leading, length=case.rng.randint(3, 10)),)


def _previous_self(weights):
    return torch.diagonal(weights, dim1=-2, dim2=-1).mean(-1)


def _previous_next(weights):
    return torch.diagonal(weights, offset=1, dim1=-2, dim2=-1).mean(-1)


def _previous_over_t(weights):
    return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).sum(-1) / weights.shape[-1]


def _previous_wrapped(weights):
    length = weights.shape[-1]
    positions = torch.arange(length)
    return weights[..., positions, positions - 1].mean(-1)


def _previous_summed(weights):
    return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).sum(-1)


_PREVIOUS_MISTAKES = (
    (("returned the weight each query puts on itself (the main diagonal); the previous token is the diagonal "
      "just below it, weights[..., t, t - 1]"), _previous_self),
    (("returned the weight on the next token (the diagonal above the main one); the previous token is the "
      "diagonal below it, weights[..., t, t - 1]"), _previous_next),
    ("divided by T; only the T - 1 queries 1..T-1 have a previous token, so average over those", _previous_over_t),
    (("counted query 0, whose index t - 1 = -1 wraps around to the last key; only queries 1..T-1 have a "
      "previous token"), _previous_wrapped),
    ("summed the weights over the queries instead of averaging them", _previous_summed),
)


def check_previous_token_score(previous_token_score: Callable, cases: int = 6, seed: int = 61) -> None:
    """Exercise 1: ``previous_token_score(weights)``: ``(..., T, T)`` → ``(...)``, the mean weight on token t - 1."""
    check_function(previous_token_score, _previous_token_score, _previous_inputs,
                   name=_name(previous_token_score, "previous_token_score"), cases=cases, seed=seed,
                   atol=1e-6, rtol=1e-5, mistakes=_PREVIOUS_MISTAKES)


# ---------------------------------------------------------------- exercise 2: attention rollout


def _rollout_inputs(case: Case) -> tuple[torch.Tensor]:
    layers, heads = case.rng.randint(2, 4), case.rng.randint(1, 4)
    return (_attention_weights(case, layers, heads, length=case.rng.randint(3, 7)),)


def _with_identity(maps: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    out = maps + torch.eye(maps.shape[-1], dtype=maps.dtype)
    return out / out.sum(-1, keepdim=True) if normalise else out


def _chain(maps: torch.Tensor, last_on_left: bool = True) -> torch.Tensor:
    rollout = maps[0]
    for layer in maps[1:]:
        rollout = layer @ rollout if last_on_left else rollout @ layer
    return rollout


def _rollout_wrong_order(attentions):
    return _chain(_with_identity(attentions.mean(-3)), last_on_left=False)


def _rollout_no_residual(attentions):
    return _chain(attentions.mean(-3))


def _rollout_not_normalised(attentions):
    return _chain(_with_identity(attentions.mean(-3), normalise=False))


def _rollout_heads_last(attentions):
    return _chain(_with_identity(attentions)).mean(-3)  # (L, H, T, T): the chain runs per head


def _rollout_last_layer(attentions):
    return _with_identity(attentions.mean(-3))[-1]


_ROLLOUT_MISTAKES = (
    (("multiplied the layers in the wrong order: the last layer goes on the left, R = Â_L · … · Â_1, because "
      "each layer reads what the layers below it made"), _rollout_wrong_order),
    (("left out the residual connection: add the identity to each layer's head-averaged map before "
      "renormalising"), _rollout_no_residual),
    (("did not renormalise after adding the identity: divide each row of A + I by its sum, so that every "
      "row is again a distribution"), _rollout_not_normalised),
    (("rolled out every head separately and averaged at the end; average each layer's heads first, then "
      "multiply the layers"), _rollout_heads_last),
    ("returned only the last layer's map; multiply all the layers, R = Â_L · … · Â_1", _rollout_last_layer),
)


def check_attention_rollout(attention_rollout: Callable, cases: int = 6, seed: int = 62) -> None:
    """Exercise 2: ``attention_rollout(attentions)``: ``(L, H, T, T)`` → ``(T, T)``, Abnar & Zuidema's rollout."""
    check_function(attention_rollout, _attention_rollout, _rollout_inputs,
                   name=_name(attention_rollout, "attention_rollout"), cases=cases, seed=seed,
                   atol=1e-5, rtol=1e-4, mistakes=_ROLLOUT_MISTAKES)


def check_rollout_rows(attention_rollout: Callable, seed: int = 620) -> None:
    """Exercise 2, hidden: every row of a rollout is a distribution, and one layer of one head is (A + I) / 2."""
    name = _name(attention_rollout, "attention_rollout")
    (attentions,) = _rollout_inputs(Case(0, seed))
    got = call_learner(attention_rollout, (attentions.clone(),), name, "on the row-sum test",
                       reference=_attention_rollout)
    if isinstance(got, torch.Tensor) and got.shape == attentions.shape[-2:]:
        found = difference(got.sum(-1), torch.ones(got.shape[-1], dtype=got.dtype), atol=1e-5, rtol=1e-4)
        if found:
            raise CheckFailed(f"The rows of `{name}`'s rollout should each sum to 1, but their sums gave {found}.")
    single = _attention_weights(Case(1, seed + 1), 1, 1, length=5)
    expected = (single[0, 0] + torch.eye(5, dtype=single.dtype)) / 2
    got = call_learner(attention_rollout, (single.clone(),), name, "on one layer of one head",
                       reference=_attention_rollout)
    found = difference(got, expected, atol=1e-5, rtol=1e-4)
    if found:
        raise CheckFailed(f"`{name}` of one layer with one head should be (A + I) / 2, but gave {found}.")
    print(f"✓ {name}: rows sum to 1, and one layer of one head gives (A + I) / 2.")


# ---------------------------------------------------------------- exercise 3: gradient × input


class TinyLanguageModel(nn.Module):
    """A stand-in for a transformer: ``(T, d)`` embeddings → ``(T, V)`` logits, each position mixing earlier ones."""

    def __init__(self, case: Case, length: int, d: int, vocab: int, dtype: torch.dtype):
        super().__init__()
        hidden = case.rng.randint(4, 12)
        self.w_in = nn.Parameter(case.randn(d, hidden, dtype=dtype) / d ** 0.5)
        mixing = case.randn(length, length, dtype=dtype).tril()
        self.register_buffer("mixing", mixing / mixing.abs().sum(-1, keepdim=True))
        self.w_out = nn.Parameter(case.randn(hidden, vocab, dtype=dtype))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (self.mixing @ torch.tanh(embeddings @ self.w_in)) @ self.w_out


def _saliency_inputs(case: Case) -> tuple[TinyLanguageModel, torch.Tensor, int]:
    length, d, vocab = case.rng.randint(3, 8), case.rng.randint(2, 10), case.rng.randint(3, 12)
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    model = TinyLanguageModel(case, length, d, vocab, dtype)
    embeddings = case.randn(length, d, dtype=dtype)
    with torch.no_grad():
        predicted = int(model(embeddings)[-1].argmax())
    target = case.rng.choice([t for t in range(vocab) if t != predicted])  # so that "the largest logit" is wrong
    return model, embeddings, target


def _gradient(logits_fn, embeddings, score_of):
    inputs = embeddings.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(score_of(logits_fn(inputs)), inputs)
    return gradient, inputs.detach()


def _saliency_gradient_only(logits_fn, embeddings, target):
    gradient, _ = _gradient(logits_fn, embeddings, lambda logits: logits[-1, target])
    return gradient.sum(-1)


def _saliency_gradient_norm(logits_fn, embeddings, target):
    gradient, _ = _gradient(logits_fn, embeddings, lambda logits: logits[-1, target])
    return gradient.norm(dim=-1)


def _saliency_l2(logits_fn, embeddings, target):
    gradient, inputs = _gradient(logits_fn, embeddings, lambda logits: logits[-1, target])
    return (gradient * inputs).norm(dim=-1)


def _saliency_abs(logits_fn, embeddings, target):
    return _gradient_times_input(logits_fn, embeddings, target).abs()


def _saliency_largest(logits_fn, embeddings, target):
    gradient, inputs = _gradient(logits_fn, embeddings, lambda logits: logits[-1].max())
    return (gradient * inputs).sum(-1)


def _saliency_every_position(logits_fn, embeddings, target):
    gradient, inputs = _gradient(logits_fn, embeddings, lambda logits: logits[:, target].sum())
    return (gradient * inputs).sum(-1)


def _saliency_log_probability(logits_fn, embeddings, target):
    gradient, inputs = _gradient(logits_fn, embeddings, lambda logits: F.log_softmax(logits[-1], -1)[target])
    return (gradient * inputs).sum(-1)


def _saliency_loss(logits_fn, embeddings, target):
    return -_saliency_log_probability(logits_fn, embeddings, target)


_SALIENCY_MISTAKES = (
    (("returned the gradient summed over the embedding dimension without multiplying it by the input; "
      "gradient × input is (grad * embeddings).sum(-1)"), _saliency_gradient_only),
    ("returned the L2 norm of the gradient; gradient × input is the signed sum (grad * embeddings).sum(-1)",
     _saliency_gradient_norm),
    (("returned the L2 norm of gradient × input; this exercise asks for the signed sum over the embedding "
      "dimension, (grad * embeddings).sum(-1), so that a token can push the logit down"), _saliency_l2),
    ("returned absolute values; keep the sign, so that a token that pushes the logit down shows as negative",
     _saliency_abs),
    ("differentiated the largest logit at the last position instead of the logit of `target`",
     _saliency_largest),
    (("differentiated the target's logit summed over every position; the score is its logit at the last "
      "position only, logits[-1, target]"), _saliency_every_position),
    ("differentiated the target's log-probability (log-softmax); the score is the raw logit, logits[-1, target]",
     _saliency_log_probability),
    ("differentiated the cross-entropy loss; the score is the raw logit of the target, logits[-1, target]",
     _saliency_loss),
)


def check_gradient_times_input(gradient_times_input: Callable, cases: int = 6, seed: int = 63) -> None:
    """Exercise 3: ``gradient_times_input(logits_fn, embeddings, target)``: ``(T,)`` signed saliency of each token."""
    check_function(gradient_times_input, _gradient_times_input, _saliency_inputs,
                   name=_name(gradient_times_input, "gradient_times_input"), cases=cases, seed=seed,
                   atol=1e-5, rtol=1e-4, mistakes=_SALIENCY_MISTAKES)


def check_saliency_completeness(gradient_times_input: Callable, seed: int = 630) -> None:
    """Exercise 3, hidden: for a linear model gradient × input adds up exactly to the target logit."""
    name = _name(gradient_times_input, "gradient_times_input")
    case = Case(0, seed)
    weights = case.randn(6, 5, dtype=torch.float64)
    mixing = case.randn(4, 4, dtype=torch.float64).tril()

    def linear_logits(embeddings):
        return mixing @ embeddings @ weights

    embeddings = case.randn(4, 6, dtype=torch.float64)
    got = call_learner(gradient_times_input, (linear_logits, embeddings.clone(), 2), name,
                       "on a linear model", reference=_gradient_times_input)
    if not isinstance(got, torch.Tensor) or got.shape != (4,):
        raise CheckFailed(f"`{name}` returned {describe(got)} on a linear model with 4 tokens; expected shape (4,).")
    total, logit = float(got.sum()), float(linear_logits(embeddings)[-1, 2])
    if abs(total - logit) > 1e-6 * max(1.0, abs(logit)):
        raise CheckFailed(f"For a linear model gradient × input should add up to the target logit ({logit:.4g}), "
                          f"but `{name}` gave scores adding up to {total:.4g}.")
    print(f"✓ {name}: on a linear model the scores add up exactly to the target logit.")


# ---------------------------------------------------------------- exercise 4: linear probe


def _probe_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    count, d, classes = case.rng.randint(20, 80), case.rng.randint(2, 8), case.rng.randint(2, 5)
    features = case.randn(count, d, dtype=torch.float64) * case.rng.choice([0.5, 1.0, 3.0]) + case.rng.choice([0.0, 2.0])
    labels = case.randint(0, classes, (count,))
    return features, labels, classes, case.rng.choice([0.1, 1.0, 5.0])


def _probe_no_ridge(features, labels, num_classes, ridge):
    return _fit_linear_probe(features, labels, num_classes, 0.0)


def _probe_bias_not_regularised(features, labels, num_classes, ridge):
    inputs = torch.cat([features, torch.ones_like(features[:, :1])], 1)
    targets = F.one_hot(labels, num_classes).to(inputs.dtype)
    penalty = torch.eye(inputs.shape[1], dtype=inputs.dtype) * ridge
    penalty[-1, -1] = 0
    return torch.linalg.solve(inputs.T @ inputs + penalty, inputs.T @ targets)


def _probe_bias_first(features, labels, num_classes, ridge):
    inputs = torch.cat([torch.ones_like(features[:, :1]), features], 1)
    targets = F.one_hot(labels, num_classes).to(inputs.dtype)
    return torch.linalg.solve(inputs.T @ inputs + ridge * torch.eye(inputs.shape[1], dtype=inputs.dtype),
                              inputs.T @ targets)


_PROBE_MISTAKES = (
    ("left out the ridge term; solve (XᵀX + ridge · I) W = XᵀY", _probe_no_ridge),
    ("did not regularise the bias; the contract adds ridge · I of size d + 1, the bias row included",
     _probe_bias_not_regularised),
    ("put the column of ones first; the bias goes in the last row of W, so append the ones as the last column",
     _probe_bias_first),
)


def check_fit_linear_probe(fit_linear_probe: Callable, cases: int = 6, seed: int = 64) -> None:
    """Exercise 4: ``fit_linear_probe(features, labels, num_classes, ridge)``: the ``(d + 1, C)`` ridge solution."""
    name = _name(fit_linear_probe, "fit_linear_probe")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        args = _probe_inputs(case)
        features, _, classes, ridge = args
        label = (f"on test input #{index + 1} (features {describe(features)}, {classes} classes, "
                 f"ridge={ridge:g})")
        expected = _fit_linear_probe(*args)
        got = call_learner(fit_linear_probe, copy.deepcopy(args), name, label, reference=_fit_linear_probe)
        d = features.shape[1]
        if isinstance(got, torch.Tensor) and got.shape != expected.shape:
            if tuple(got.shape) == (d, classes):
                raise CheckFailed(f"`{name}` returned shape {tuple(got.shape)} {label}, with no bias row: append a "
                                  f"column of ones to the features, so that W has d + 1 = {d + 1} rows.")
            if tuple(got.shape) in ((d + 1,), (d + 1, 1)):
                raise CheckFailed(f"`{name}` returned shape {tuple(got.shape)} {label}: it regressed the class "
                                  f"numbers; regress the one-hot labels, one column per class, shape ({d + 1}, {classes}).")
        found = difference(got, expected, atol=1e-7, rtol=1e-5)
        if found:
            for phrase, wrong in _PROBE_MISTAKES:
                if isinstance(got, torch.Tensor) and difference(got, wrong(*copy.deepcopy(args)), 1e-7, 1e-5) is None:
                    raise CheckFailed(f"`{name}` {phrase} (test input #{index + 1}).")
            raise CheckFailed(f"`{name}` returned {found} {label}.")
    print(f"✓ {name}: all {cases} test inputs match the reference.")
