"""Chapter 02: the checks pass the reference answers and name each typical mistake; the explorer draws."""

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from conftest import copy_of, rejection

from utils import attention, checks, viz

matplotlib.use("Agg")


# ---------------------------------------------------------------- answers, right and wrong

stable_softmax = copy_of(attention.softmax)


def attention_with(scale=lambda d: 1 / math.sqrt(d), fill=float("-inf"), softmax=stable_softmax, softmax_dim=-1,
                   invert_mask=False):
    """A learner's attention, right by default; each argument reproduces one typical mistake."""

    def scaled_dot_product_attention(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1) * scale(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(mask if invert_mask else ~mask, fill)
        return softmax(scores, dim=softmax_dim) @ v

    return scaled_dot_product_attention


def naive_softmax(x, dim=-1):
    exps = torch.exp(x)
    return exps / exps.sum(dim=dim, keepdim=True)


def global_max_softmax(x, dim=-1):
    """The max trick with one maximum for the whole tensor: rows far below it underflow to 0/0."""
    exps = torch.exp(x - x.max())
    return exps / exps.sum(dim=dim, keepdim=True)


def last_dim_softmax(x, dim=-1):
    """Ignores `dim` and always normalizes the last dimension."""
    return stable_softmax(x, -1)


def no_masked_rows_softmax(x, dim=-1):
    """The max trick, but a row of all -inf becomes NaN."""
    exps = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return exps / exps.sum(dim=dim, keepdim=True)


def test_reference_answers_pass(capsys):
    checks.ch02.check_softmax(stable_softmax, cases=30, seed=11)
    checks.ch02.check_attention(attention_with(), cases=30, seed=12)
    checks.ch02.check_causal_mask(copy_of(attention.causal_mask), cases=20)
    checks.ch02.check_padding_mask(copy_of(attention.padding_mask), cases=20)
    printed = capsys.readouterr().out
    assert printed.count("✓") == 4


def test_attention_is_compared_with_pytorch_and_matches_the_course_reference():
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = attention.causal_mask(5)
    course = attention.scaled_dot_product_attention(q, k, v, mask)
    assert torch.allclose(course, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)


@pytest.mark.parametrize("answer, expected", [
    (naive_softmax, "the max trick"),
    (global_max_softmax, "subtract each row's maximum"),
    (last_dim_softmax, "do not sum to 1 along dim="),
    (no_masked_rows_softmax, "returned NaN for a row whose logits are all -inf"),
    (lambda x, dim=-1: stable_softmax(x, dim).float(), "dtype torch.float32, expected torch.float64"),
    (lambda x, dim=-1: stable_softmax(x, dim).flatten(), "expected shape"),
    (lambda x, dim=-1: torch.softmax(x, dim), "used torch.softmax, a shortcut"),
    (lambda x, dim=-1: F.softmax(x, dim=dim), "used torch.nn.functional.softmax, a shortcut"),
    (lambda x, dim=-1: x.softmax(dim), "used Tensor.softmax, a shortcut"),
    (lambda x, dim=-1: x.log_softmax(dim).exp(), "used Tensor.log_softmax, a shortcut"),
    (lambda x, dim=-1: attention.softmax(x, dim), "used the course's own utils.attention.softmax, a shortcut"),
])
def test_softmax_check_names_the_mistake(answer, expected):
    assert expected in rejection(checks.ch02.check_softmax, answer)


def test_softmax_without_max_trick_is_named_as_overflow():
    message = rejection(checks.ch02.check_softmax, naive_softmax)
    assert "returned NaN or inf" in message and "overflows" in message and "logits near ±1000" in message


def fused(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("answer, expected", [
    (attention_with(scale=lambda d: 1.0), "did not scale the scores"),
    (attention_with(scale=lambda d: 1 / d), "divided the scores by d"),
    (attention_with(invert_mask=True), "treated True in the mask as 'hidden'"),
    (attention_with(softmax_dim=-2), "normalized the weights over the queries"),
    (attention_with(softmax=naive_softmax), "returned NaN for a query whose keys are all masked"),
    (attention_with(softmax=lambda x, dim: torch.softmax(x, dim)), "returned NaN for a query whose keys are all masked"),
    (attention_with(fill=-1e9), "fill hidden scores with float('-inf')"),
    (lambda q, k, v, mask=None: attention_with()(q, k, v, mask).float(), "dtype torch.float32, expected torch.float64"),
    (lambda q, k, v, mask=None: attention_with()(q, k, v, mask).transpose(-2, -1), "shape"),
    (lambda q, k, v, mask=None: (attention_with()(q, k, v, mask), None), "a tuple of 2 items where a torch.Tensor was expected"),
    (attention.scaled_dot_product_attention, "the course's own utils.attention.scaled_dot_product_attention"),
])
def test_attention_check_names_the_mistake(answer, expected):
    assert expected in rejection(checks.ch02.check_attention, answer)


def test_calling_pytorch_attention_is_called_a_shortcut_in_plain_words():
    message = rejection(checks.ch02.check_attention, fused)
    assert message == ("`fused` used torch.nn.functional.scaled_dot_product_attention, "
                       "a shortcut this exercise asks you to do without.")


@pytest.mark.parametrize("answer, expected", [
    (lambda length: torch.ones(length, length, dtype=torch.bool).tril(diagonal=-1), "False at index (0, 0), expected True"),
    (lambda length: torch.ones(length, length, dtype=torch.bool).triu(), "on test input #2"),
    (lambda length: torch.ones(length, length).tril(), "dtype torch.float32, expected torch.bool"),
    (lambda length: torch.ones(length, length, dtype=torch.bool).tril()[None], "shape (1, 1, 1), expected shape (1, 1)"),
    (lambda length: attention.causal_mask(length), "the course's own utils.attention.causal_mask"),
])
def test_causal_mask_check_names_the_mistake(answer, expected):
    assert expected in rejection(checks.ch02.check_causal_mask, answer)


def padding_off_by_one(lengths, length):
    return (torch.arange(length)[None, :] <= lengths[:, None])[:, None, :]


@pytest.mark.parametrize("answer, expected", [
    (padding_off_by_one, "returned True at index"),
    (lambda lengths, length: torch.arange(length)[None, :] < lengths[:, None], "expected shape"),
    (lambda lengths, length: (torch.arange(length)[None, :] < lengths[:, None])[:, None, :].long(),
     "dtype torch.int64, expected torch.bool"),
    (lambda lengths, length: attention.padding_mask(lengths, length), "the course's own utils.attention.padding_mask"),
])
def test_padding_mask_check_names_the_mistake(answer, expected):
    assert expected in rejection(checks.ch02.check_padding_mask, answer)


# ---------------------------------------------------------------- the attention explorer


def sentence(length=6, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = [f" w{i}" for i in range(length)]
    return tokens, torch.randn(length, d, generator=generator), torch.randn(length, d, generator=generator)


def test_explorer_is_a_widget_that_draws_bars_without_a_browser():
    import ipywidgets

    tokens, q, k = sentence()
    explorer = viz.attention_explorer(tokens, q, k)
    assert isinstance(explorer, ipywidgets.VBox)
    fig = explorer.update(query=2, temperature=1.0, view="bars")
    bars = fig.axes[0].patches
    assert len(bars) == len(tokens)
    expected = attention.scaled_dot_product_attention(q, k, k, return_weights=True)[1]
    assert torch.allclose(explorer.weights, expected, atol=1e-6)
    assert math.isclose(sum(bar.get_height() for bar in bars), 1.0, rel_tol=1e-5)
    assert "query 2" in fig.axes[0].get_title()


def test_explorer_causal_mask_temperature_and_heatmap():
    tokens, q, k = sentence()
    explorer = viz.attention_explorer(tokens, q, k)
    explorer.update(causal=True)
    assert not explorer.weights.triu(diagonal=1).any()
    assert torch.allclose(explorer.weights.sum(-1), torch.ones(len(tokens)))

    explorer.update(causal=False, temperature=1.0)
    warm = explorer.weights.max(dim=-1).values
    explorer.update(temperature=0.1)
    cold = explorer.weights.max(dim=-1).values
    assert (cold >= warm - 1e-6).all() and (cold > warm).any()  # a low temperature sharpens every row

    fig = explorer.update(view="heatmap")
    assert fig.axes[0].images[0].get_array().shape == (len(tokens), len(tokens))


def test_explorer_cuts_long_inputs_with_a_notice():
    import ipywidgets

    tokens, q, k = sentence(length=100)
    explorer = viz.attention_explorer(tokens, q, k, max_tokens=64)
    assert explorer.weights.shape == (64, 64)
    assert explorer.children[0].value == "Showing the first 64 of 100 tokens."
    short = viz.attention_explorer(*sentence(length=5))
    assert not any(isinstance(child, ipywidgets.Label) for child in short.children)  # no notice when nothing is cut


def test_explorer_rejects_mismatched_inputs():
    tokens, q, k = sentence()
    with pytest.raises(ValueError, match="shape \\(T, d\\)"):
        viz.attention_explorer(tokens[:-1], q, k)
    with pytest.raises(ValueError):
        viz.attention_explorer(tokens, q[None], k[None])
