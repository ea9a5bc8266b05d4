"""Chapter 03: the checks pass right answers, name each typical mistake in one sentence, and refuse shortcuts."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_of, rejection
from torch import nn

from utils import attention, checks, positions

# ---------------------------------------------------------------- exercise 1: heads, right and wrong

split_right = copy_of(attention.split_heads)
merge_right = copy_of(attention.merge_heads)


def split_with_view(x, n_head):
    """The tempting one-liner: right shape, tokens mixed into heads."""
    batch, length, d_model = x.shape
    return x.view(batch, n_head, length, d_model // n_head)


def split_strided(x, n_head):
    """Head h gets channels h, h + n_head, h + 2 n_head, ...: right shape, wrong channels."""
    batch, length, d_model = x.shape
    return x.view(batch, length, d_model // n_head, n_head).permute(0, 3, 1, 2)


def merge_without_transpose(x):
    batch, n_head, length, d_head = x.shape
    return x.reshape(batch, length, n_head * d_head)


def merge_wrong_axes(x):
    """Transposes the last two axes instead of the head and time axes."""
    batch, n_head, length, d_head = x.shape
    return x.transpose(2, 3).reshape(batch, length, n_head * d_head)


def merge_channels_interleaved(x):
    batch, n_head, length, d_head = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, length, n_head * d_head)


def merge_with_view(x):
    """view after a transpose: PyTorch refuses the non-contiguous tensor."""
    batch, n_head, length, d_head = x.shape
    return x.transpose(1, 2).view(batch, length, n_head * d_head)


# ---------------------------------------------------------------- exercise 2: multi-head attention


def mha_with(scale="d_head", causal_mask="follow", transpose_weights=True, split=split_right, merge=merge_right,
             softmax_dim=-1, project_out=True):
    """A learner's multi-head attention, right by default; each argument reproduces one typical mistake."""

    def multi_head_attention(x, w_query, w_key, w_value, w_out, n_head, causal=True):
        project = (lambda w: x @ w.T) if transpose_weights else (lambda w: x @ w)
        q, k, v = (split(project(w), n_head) for w in (w_query, w_key, w_value))
        divisor = {"d_head": math.sqrt(q.shape[-1]), "none": 1.0, "d_model": math.sqrt(x.shape[-1])}[scale]
        scores = q @ k.transpose(-2, -1) / divisor
        if (causal and causal_mask == "follow") or causal_mask == "always":
            length = x.shape[1]
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        out = merge(torch.softmax(scores, dim=softmax_dim) @ v)
        return out @ w_out.T if project_out else out

    return multi_head_attention


def mha_einsum(x, w_query, w_key, w_value, w_out, n_head, causal=True):
    """A right answer written another way: one einsum per step, heads as an explicit axis."""
    batch, length, d_model = x.shape
    d_head = d_model // n_head
    q, k, v = (torch.einsum("btc,oc->bto", x, w).reshape(batch, length, n_head, d_head) for w in (w_query, w_key, w_value))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d_head ** 0.5
    if causal:
        scores = scores + torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, d_model)
    return torch.einsum("btc,oc->bto", out, w_out)


def mha_with_torch_kernel(x, w_query, w_key, w_value, w_out, n_head, causal=True):
    q, k, v = (attention.split_heads(x @ w.T, n_head) for w in (w_query, w_key, w_value))
    return attention.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal)) @ w_out.T


def mha_with_course_attention(x, w_query, w_key, w_value, w_out, n_head, causal=True):
    q, k, v = (attention.split_heads(x @ w.T, n_head) for w in (w_query, w_key, w_value))
    mask = attention.causal_mask(x.shape[1]) if causal else None
    return attention.merge_heads(attention.scaled_dot_product_attention(q, k, v, mask)) @ w_out.T


def mha_with_course_module(fused):
    def multi_head_attention(x, w_query, w_key, w_value, w_out, n_head, causal=True):
        module = attention.MultiHeadAttention(x.shape[-1], n_head, causal=causal, fused=fused).to(x.dtype)
        with torch.no_grad():
            for layer, weight in zip((module.query, module.key, module.value, module.out),
                                     (w_query, w_key, w_value, w_out)):
                layer.weight.copy_(weight)
            return module(x)

    return multi_head_attention


def mha_with_torch_module(x, w_query, w_key, w_value, w_out, n_head, causal=True):
    d_model, length = x.shape[-1], x.shape[1]
    module = nn.MultiheadAttention(d_model, n_head, bias=False, batch_first=True).to(x.dtype)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.cat((w_query, w_key, w_value)))
        module.out_proj.weight.copy_(w_out)
    mask = torch.ones(length, length, dtype=torch.bool).triu(1) if causal else None
    return module(x, x, x, attn_mask=mask)[0]


# ---------------------------------------------------------------- exercises 3-5: positions


def sinusoids_with(sin_first=True, layout="interleaved", exponent=lambda i, d: 2 * i / d, first=0, dtype=torch.float32):
    """A learner's sinusoidal table, right by default; each argument reproduces one typical mistake."""

    def sinusoidal_positions(length, d_model, base=10_000.0):
        position = torch.arange(first, first + length, dtype=torch.float32)[:, None]
        pair = torch.arange(d_model // 2, dtype=torch.float32)
        angles = position / base ** exponent(pair, d_model)
        a, b = (angles.sin(), angles.cos()) if sin_first else (angles.cos(), angles.sin())
        if layout == "halves":
            return torch.cat((a, b), dim=-1).to(dtype)
        return torch.stack((a, b), dim=-1).reshape(length, d_model).to(dtype)

    return sinusoidal_positions


def sinusoids_per_column(length, d_model, base=10_000.0):
    """Each column j divides by base^(j / d_model): the cosine of a pair runs at another frequency than its sine."""
    table = torch.arange(length, dtype=torch.float32)[:, None] / base ** (torch.arange(d_model) / d_model)
    table[:, 0::2], table[:, 1::2] = table[:, 0::2].sin(), table[:, 1::2].cos()
    return table


def sinusoids_exp_log(length, d_model, base=10_000.0):
    """A right answer in the form many tutorials use: exp(-log(base) · 2i / d)."""
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(base) / d_model))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequency
    table = torch.empty(length, d_model, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()
    return table.float()


def rope_tables_with(exponent=lambda i, d: 2 * i / d, swap=False, doubled=False):
    def rope_frequencies(length, d_head, base=10_000.0):
        angles = torch.arange(length, dtype=torch.float32)[:, None] / base ** exponent(torch.arange(d_head // 2), d_head)
        if doubled:
            angles = torch.cat((angles, angles), dim=-1)
        return (angles.sin(), angles.cos()) if swap else (angles.cos(), angles.sin())

    return rope_frequencies


def rope_rotate_half(x, cos, sin):
    """A right answer as Hugging Face writes it: x·cos + rotate_half(x)·sin with the tables doubled."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((sin, sin), dim=-1).to(x.dtype)
    return x * cos + rotated_half * sin


def rope_interleaved(x, cos, sin):
    """RoFormer's and GPT-J's layout: pairs (2i, 2i + 1). A fine RoPE, but not this course's layout."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rope_sign_error(x, cos, sin):
    """The minus sign on the other term: a rotation by -θ."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos), dim=-1)


def rope_not_a_rotation(x, cos, sin):
    """Both signs positive: not a rotation, so lengths change and scores depend on absolute positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rope_squared_angle(x, cos, sin):
    """A rotation (lengths kept) by the square of the angle: scores then depend on absolute positions."""
    angle = torch.atan2(sin, cos) ** 2
    return rope_rotate_half(x, angle.cos(), angle.sin())


# ---------------------------------------------------------------- the tests


def test_right_answers_pass(capsys):
    checks.ch03.check_heads(split_right, merge_right, cases=20)
    checks.ch03.check_multi_head_attention(mha_with(), cases=20)
    checks.ch03.check_multi_head_attention(mha_einsum, cases=20)
    checks.ch03.check_sinusoidal_positions(copy_of(positions.sinusoidal_positions), cases=20)
    checks.ch03.check_sinusoidal_positions(sinusoids_with(), cases=20)
    checks.ch03.check_sinusoidal_positions(sinusoids_exp_log, cases=20)
    checks.ch03.check_rope_frequencies(copy_of(positions.rope_frequencies), cases=20)
    checks.ch03.check_rope_frequencies(rope_tables_with(), cases=20)
    checks.ch03.check_apply_rope(copy_of(positions.apply_rope), cases=20)
    checks.ch03.check_apply_rope(rope_rotate_half, cases=20)
    checks.ch03.check_rope_relative_position(rope_rotate_half, cases=40, d_head=64, max_position=256)
    printed = capsys.readouterr().out
    assert printed.count("✓") == 11
    assert "largest difference" in printed and "depends only on their distance" in printed


@pytest.mark.parametrize(
    "check, wrong, expected",
    [
        # exercise 1: right shapes, wrong contents
        (lambda f: checks.ch03.check_heads(f, merge_right), split_with_view, "gave what x.view(B, n_head, T, d_head) gives"),
        (lambda f: checks.ch03.check_heads(f, merge_right), split_strided, "gave head h every n_head-th channel"),
        (lambda f: checks.ch03.check_heads(split_right, f), merge_without_transpose, "reshaped without moving the head axis"),
        (lambda f: checks.ch03.check_heads(split_right, f), merge_wrong_axes, "`merge_wrong_axes` returned"),
        (lambda f: checks.ch03.check_heads(split_right, f), merge_channels_interleaved, "interleaved the heads' channels"),
        (lambda f: checks.ch03.check_heads(split_right, f), merge_with_view, "raised RuntimeError (view size"),
        # exercise 2
        (checks.ch03.check_multi_head_attention, mha_with(causal_mask="never"), "attend to later tokens although causal=True"),
        (checks.ch03.check_multi_head_attention, mha_with(causal_mask="always"), "causal mask although causal=False"),
        (checks.ch03.check_multi_head_attention, mha_with(scale="none"), "did not scale the scores"),
        (checks.ch03.check_multi_head_attention, mha_with(scale="d_model"), "divided the scores by sqrt(d_model)"),
        (checks.ch03.check_multi_head_attention, mha_with(transpose_weights=False), "weight matrices untransposed"),
        (checks.ch03.check_multi_head_attention, mha_with(split=split_with_view), "split the heads as view(B, n_head, T"),
        (checks.ch03.check_multi_head_attention, mha_with(merge=merge_without_transpose), "merged the heads without moving"),
        (checks.ch03.check_multi_head_attention, mha_with(merge=merge_wrong_axes), "`multi_head_attention` returned"),
        (checks.ch03.check_multi_head_attention, mha_with(softmax_dim=-2), "over the queries (dim -2)"),
        (checks.ch03.check_multi_head_attention, mha_with(project_out=False), "did not apply the output projection"),
        (checks.ch03.check_multi_head_attention, mha_with(scale="none", causal_mask="never"), "`multi_head_attention` returned"),
        # exercise 3
        (checks.ch03.check_sinusoidal_positions, sinusoids_with(sin_first=False), "cos in the even columns and sin in the odd"),
        (checks.ch03.check_sinusoidal_positions, sinusoids_with(layout="halves"), "all the sines first"),
        (checks.ch03.check_sinusoidal_positions, sinusoids_with(exponent=lambda i, d: i / d), "exponent i / d_model"),
        (checks.ch03.check_sinusoidal_positions, sinusoids_per_column, "gave each column its own frequency"),
        (checks.ch03.check_sinusoidal_positions, sinusoids_with(exponent=lambda i, d: -2 * i / d), "`sinusoidal_positions` returned"),
        (checks.ch03.check_sinusoidal_positions, sinusoids_with(first=1), "numbered the positions from 1"),
        (checks.ch03.check_sinusoidal_positions, sinusoids_with(dtype=torch.float64), "dtype torch.float64, expected torch.float32"),
        # exercise 4
        (checks.ch03.check_rope_frequencies, rope_tables_with(swap=True), "returned (sin, cos)"),
        (checks.ch03.check_rope_frequencies, rope_tables_with(exponent=lambda i, d: i / d), "exponent i / d_head"),
        (checks.ch03.check_rope_frequencies, rope_tables_with(doubled=True), "each angle twice"),
        # exercise 5
        (checks.ch03.check_apply_rope, rope_interleaved, "rotated the interleaved pairs (2i, 2i + 1)"),
        (checks.ch03.check_apply_rope, rope_sign_error, "rotated by -θ instead of θ"),
        (checks.ch03.check_apply_rope, rope_not_a_rotation, "changed the length of a vector"),
        (checks.ch03.check_rope_relative_position, rope_squared_angle, "makes the score depend on m - n only"),
    ],
)
def test_typical_mistakes_are_named(check, wrong, expected):
    assert expected in rejection(check, wrong)


@pytest.mark.parametrize(
    "check, shortcut, expected",
    [
        (checks.ch03.check_multi_head_attention, mha_with_torch_kernel, "torch.nn.functional.scaled_dot_product_attention"),
        (checks.ch03.check_multi_head_attention, mha_with_course_attention,
         "the course's own utils.attention.scaled_dot_product_attention"),
        (checks.ch03.check_multi_head_attention, mha_with_course_module(fused=False),
         "the course's own utils.attention.MultiHeadAttention"),
        # The module's default fused path is refused too, named by the module the learner called.
        (checks.ch03.check_multi_head_attention, mha_with_course_module(fused=True),
         "the course's own utils.attention.MultiHeadAttention"),  # the outer shortcut, not the kernel inside it
        (checks.ch03.check_multi_head_attention, mha_with_torch_module, "multi_head_attention_forward"),
        (lambda f: checks.ch03.check_heads(f, merge_right), lambda x, n: attention.split_heads(x, n),
         "the course's own utils.attention.split_heads"),
        (checks.ch03.check_sinusoidal_positions, lambda *args: positions.sinusoidal_positions(*args),
         "the course's own utils.positions.sinusoidal_positions"),
        (checks.ch03.check_apply_rope, lambda x, cos, sin: positions.apply_rope(x, cos, sin),
         "the course's own utils.positions.apply_rope"),
    ],
)
def test_shortcuts_are_refused_in_plain_words(check, shortcut, expected):
    message = rejection(check, shortcut)
    assert expected in message and message.endswith("a shortcut this exercise asks you to do without.")


def test_checks_leave_the_learners_random_state_alone():
    before = torch.random.get_rng_state()
    checks.ch03.check_multi_head_attention(mha_with(), cases=3)
    assert torch.equal(before, torch.random.get_rng_state())
