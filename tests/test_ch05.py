"""Chapter 05's checks accept correct answers, written several ways, and name the usual mistakes in one sentence."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils import checks, generate, train
from utils.checks import ch05

MINUS_INF = float("-inf")


def rejection(check, fn, *args, **kwargs) -> str:
    """The one-sentence message ``check`` raises for ``fn``; fails the test if it accepts it."""
    with pytest.raises(checks.CheckFailed) as info:
        check(fn, *args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a check message must be one line"
    assert "tensor(" not in message, "a check message must never print a whole tensor"
    return message


# ---------------------------------------------------------------- exercise 1: get_batch


def get_batch(data, batch_size, context_length, generator=None):
    starts = torch.randint(len(data) - context_length - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + context_length] for s in starts])
    y = torch.stack([data[s + 1:s + 1 + context_length] for s in starts])
    return x, y


def get_batch_by_indexing(data, batch_size, context_length, generator=None):
    starts = torch.randint(len(data) - context_length - 1, (batch_size,), generator=generator)
    positions = starts[:, None] + torch.arange(context_length)
    return data[positions], data[positions + 1]


def test_get_batch_accepts_correct_answers(capsys):
    ch05.check_get_batch(get_batch)
    ch05.check_get_batch(get_batch_by_indexing, cases=20, seed=99)
    assert "✓" in capsys.readouterr().out


def test_get_batch_rejects_unshifted_targets():
    def unshifted(data, batch_size, context_length, generator=None):
        x, _ = get_batch(data, batch_size, context_length, generator)
        return x, x.clone()

    assert "equal to the inputs" in rejection(ch05.check_get_batch, unshifted)


def test_get_batch_rejects_a_shift_of_two():
    def shifted_twice(data, batch_size, context_length, generator=None):
        starts = torch.randint(len(data) - context_length - 1, (batch_size,), generator=generator)
        x = torch.stack([data[s:s + context_length] for s in starts])
        y = torch.stack([data[s + 2:s + 2 + context_length] for s in starts])
        return x, y

    assert "shifted by 2 tokens" in rejection(ch05.check_get_batch, shifted_twice)


def test_get_batch_rejects_other_random_draws():
    def other_range(data, batch_size, context_length, generator=None):
        starts = torch.randint(len(data) - context_length, (batch_size,), generator=generator)
        x = torch.stack([data[s:s + context_length] for s in starts])
        return x, torch.stack([data[s + 1:s + 1 + context_length] for s in starts])

    def ignores_generator(data, batch_size, context_length, generator=None):
        return get_batch(data, batch_size, context_length, None)

    for wrong in (other_range, ignores_generator):
        assert "torch.randint(len(data) - context_length - 1" in rejection(ch05.check_get_batch, wrong)


def test_get_batch_forbids_the_course_function():
    assert "shortcut" in rejection(ch05.check_get_batch, lambda *a: train.get_batch(*a))


# ---------------------------------------------------------------- exercise 2: cross-entropy


def cross_entropy(logits, targets):
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    largest = logits.max(dim=-1, keepdim=True).values
    log_sum_exp = largest.squeeze(-1) + torch.log(torch.exp(logits - largest).sum(dim=-1))
    return (log_sum_exp - logits[torch.arange(len(targets)), targets]).mean()


def cross_entropy_logsumexp(logits, targets):
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(logits, dim=-1) - picked).mean()


def test_cross_entropy_accepts_correct_answers(capsys):
    for correct in (cross_entropy, cross_entropy_logsumexp):
        ch05.check_cross_entropy(correct)
        ch05.check_cross_entropy(correct, cases=20, seed=77)
        ch05.check_cross_entropy_gradient(correct)
    assert "✓" in capsys.readouterr().out


def test_cross_entropy_without_the_max_trick_is_caught():
    def naive(logits, targets):
        logits = logits.reshape(-1, logits.shape[-1])
        probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        return -torch.log(probs[torch.arange(logits.shape[0]), targets.reshape(-1)]).mean()

    assert "max trick" in rejection(ch05.check_cross_entropy, naive)


def test_cross_entropy_sum_instead_of_mean_is_named():
    def summed(logits, targets):
        return cross_entropy(logits, targets) * targets.numel()

    assert "sum of the" in rejection(ch05.check_cross_entropy, summed) and "mean" in rejection(
        ch05.check_cross_entropy, summed)


def test_cross_entropy_forbids_library_losses():
    shortcuts = {
        "cross_entropy": lambda lo, t: F.cross_entropy(lo.reshape(-1, lo.shape[-1]), t.reshape(-1)),
        "log_softmax": lambda lo, t: -F.log_softmax(lo, -1).gather(-1, t[..., None]).mean(),
        "Tensor.log_softmax": lambda lo, t: -lo.log_softmax(-1).gather(-1, t[..., None]).mean(),
    }
    for name, shortcut in shortcuts.items():
        assert "shortcut" in rejection(ch05.check_cross_entropy, shortcut), name


def test_cross_entropy_gradient_needs_a_graph():
    def detached(logits, targets):
        return cross_entropy(logits.detach(), targets)

    assert "does not depend on the logits" in rejection(ch05.check_cross_entropy_gradient, detached)


# ---------------------------------------------------------------- exercise 3: learning rate


def learning_rate(step, max_lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_learning_rate_accepts_a_correct_answer(capsys):
    ch05.check_learning_rate(learning_rate)
    ch05.check_learning_rate(learning_rate, cases=30, seed=123)
    assert "✓" in capsys.readouterr().out


def test_warmup_off_by_one_is_named():
    def off_by_one(step, max_lr, min_lr, warmup_steps, max_steps):
        if step < warmup_steps:
            return max_lr * step / warmup_steps
        return learning_rate(step, max_lr, min_lr, warmup_steps, max_steps)

    assert "warm-up is off by one" in rejection(ch05.check_learning_rate, off_by_one)


def test_cosine_that_never_reaches_min_lr_is_named():
    def progress_over_all_steps(step, max_lr, min_lr, warmup_steps, max_steps):
        if step < warmup_steps:
            return max_lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max_steps  # ends short of 1 at max_steps
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def decays_to_zero(step, max_lr, min_lr, warmup_steps, max_steps):
        return learning_rate(step, max_lr, 0.0, warmup_steps, max_steps)

    assert "does not reach min_lr at max_steps" in rejection(ch05.check_learning_rate, progress_over_all_steps)
    assert "decays to 0 instead of to min_lr" in rejection(ch05.check_learning_rate, decays_to_zero)


def test_schedule_must_stay_at_min_lr_after_the_end():
    def keeps_oscillating(step, max_lr, min_lr, warmup_steps, max_steps):
        if step < warmup_steps:
            return max_lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / (max_steps - warmup_steps)
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    assert "stay at min_lr" in rejection(ch05.check_learning_rate, keeps_oscillating)


# ---------------------------------------------------------------- exercise 4: top-k


def top_k_filter(logits, k):
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, MINUS_INF)


def test_top_k_accepts_a_correct_answer(capsys):
    ch05.check_top_k_filter(top_k_filter)
    ch05.check_top_k_filter(top_k_filter, cases=30, seed=55)
    assert "✓" in capsys.readouterr().out


def test_top_k_strict_comparison_is_named():
    def strict(logits, k):
        kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits <= kth_largest, MINUS_INF)

    assert ">=, not >" in rejection(ch05.check_top_k_filter, strict)


def test_top_k_keeping_k_plus_one_is_named():
    def k_plus_one(logits, k):
        return top_k_filter(logits, min(k + 1, logits.shape[-1]))

    assert "k + 1 largest" in rejection(ch05.check_top_k_filter, k_plus_one)


def test_top_k_dropping_ties_is_named():
    def exactly_k(logits, k):
        top = torch.topk(logits, k, dim=-1)
        return torch.full_like(logits, MINUS_INF).scatter(-1, top.indices, top.values)

    assert "tied with the k-th" in rejection(ch05.check_top_k_filter, exactly_k)


def test_top_k_forbids_the_course_function():
    assert "shortcut" in rejection(ch05.check_top_k_filter, lambda lo, k: generate.top_k_filter(lo, k))


# ---------------------------------------------------------------- exercise 5: top-p


def top_p_filter(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= p)
    return logits.masked_fill(drop, MINUS_INF)


def top_p_filter_shifted(logits, p):
    """The same rule with the running total shifted right by one instead of subtracted."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    keep_sorted = mass_before < p
    keep = torch.empty_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, logits, torch.full_like(logits, MINUS_INF))


def test_top_p_accepts_correct_answers(capsys):
    for correct in (top_p_filter, top_p_filter_shifted):
        ch05.check_top_p_filter(correct)
        ch05.check_top_p_filter(correct, cases=30, seed=66)
        ch05.check_top_p_edges(correct)
    assert "✓" in capsys.readouterr().out


def test_top_p_dropping_the_crossing_token_is_named():
    def excludes_crossing(logits, p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = torch.zeros_like(cumulative, dtype=torch.bool).scatter(-1, order, cumulative > p)
        return logits.masked_fill(drop, MINUS_INF)

    message = rejection(ch05.check_top_p_filter, excludes_crossing)
    assert "takes the running total past p" in message or "most likely token must always be kept" in message


def test_top_p_mask_left_in_sorted_order_is_named():
    def unsorted_mask(logits, p):
        sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        return logits.masked_fill(torch.cumsum(probs, -1) - probs >= p, MINUS_INF)

    assert "not the right ones" in rejection(ch05.check_top_p_filter, unsorted_mask)


def test_top_p_forbids_the_course_function():
    assert "shortcut" in rejection(ch05.check_top_p_filter, lambda lo, p: generate.top_p_filter(lo, p))


# ---------------------------------------------------------------- every check, unattempted


def test_dropping_to_a_finite_number_is_named():
    def large_negative_k(logits, k):
        return top_k_filter(logits, k).clamp(min=-1e9)

    def large_negative_p(logits, p):
        return top_p_filter(logits, p).clamp(min=-1e9)

    assert "use -inf" in rejection(ch05.check_top_k_filter, large_negative_k)
    assert "use -inf" in rejection(ch05.check_top_p_filter, large_negative_p)
