"""Chapter 08: the efficient-attention reference code is exact where it claims to be, and the checks accept
correct answers written several ways and name the usual mistakes in one sentence."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, rejection

from utils import efficient_attention as ea
from utils.attention import causal_mask, scaled_dot_product_attention
from utils.checks import ch08

# ---------------------------------------------------------------- the reference code


def qkv(*shape, d=16, d_v=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, d, generator=generator, dtype=dtype) * 2,
            torch.randn(*shape, d, generator=generator, dtype=dtype),
            torch.randn(*shape, d_v, generator=generator, dtype=dtype))


@pytest.mark.parametrize("length, block_size", [(1, 4), (50, 7), (128, 32), (200, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_attention_equals_exact_attention(length, block_size, causal):
    q, k, v = qkv(2, 3, length)
    exact = ea.naive_attention(q, k, v, causal=causal)
    tiled = ea.tiled_attention(q, k, v, causal=causal, block_size=block_size)
    assert (tiled - exact).abs().max() < 1e-5


@pytest.mark.parametrize("window", [1, 5, 33, 500])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_attention_with_a_window_equals_the_masked_reference(window, causal):
    q, k, v = qkv(1, 2, 130)
    mask = ea.sliding_window_mask(130, window, causal=causal)
    tiled = ea.tiled_attention(q, k, v, causal=causal, block_size=16, window=window)
    assert (tiled - scaled_dot_product_attention(q, k, v, mask)).abs().max() < 1e-5


def test_tiled_attention_skips_hidden_tiles():
    assert ea.tiles_computed(1024, 128) == (64, 64)
    assert ea.tiles_computed(1024, 128, causal=True) == (36, 64)       # the 8 diagonal tiles and the 28 below
    assert ea.tiles_computed(1024, 128, causal=True, window=128) == (15, 64)  # diagonal and the one before


def test_online_softmax_over_blocks_is_the_softmax():
    scores = torch.randn(3, 5, 40) * 4
    values = torch.randn(3, 40, 6)
    state = (torch.full((3, 5, 1), -math.inf), torch.zeros(3, 5, 1), torch.zeros(3, 5, 6))
    for start in range(0, 40, 7):
        state = ea.online_softmax_update(*state, scores[..., start:start + 7], values[:, start:start + 7])
    row_max, row_sum, out = state
    assert torch.allclose(row_max, scores.amax(-1, keepdim=True))
    assert torch.allclose(out / row_sum, torch.softmax(scores, -1) @ values, atol=1e-6)


def test_online_softmax_keeps_an_all_masked_row_finite():
    state = (torch.full((1, 1), -math.inf), torch.zeros(1, 1), torch.zeros(1, 2))
    state = ea.online_softmax_update(*state, torch.full((1, 3), -math.inf), torch.ones(3, 2))
    assert all(torch.isfinite(s).all() or s.item() == -math.inf for s in state[:2]) and torch.equal(state[2], torch.zeros(1, 2))


def test_linear_attention_forms_agree():
    q, k, v = qkv(2, 2, 37, d=8, d_v=5)
    cumulative = ea.linear_attention(q, k, v, causal=True)
    recurrent, (state, normaliser) = ea.linear_attention_recurrent(q, k, v)
    chunked = ea.chunked_linear_attention(q, k, v, chunk_size=10)
    assert (cumulative - recurrent).abs().max() < 1e-5 and (cumulative - chunked).abs().max() < 1e-5
    assert state.shape == (2, 2, 8, 5) and normaliser.shape == (2, 2, 8)
    # The brute-force definition: normalised, causally masked φ(q)·φ(k) weights.
    weights = (ea.elu_feature_map(q) @ ea.elu_feature_map(k).transpose(-2, -1)).tril()
    assert (cumulative - (weights / weights.sum(-1, keepdim=True)) @ v).abs().max() < 1e-5
    # A recurrent state carries a sequence on: two halves give the whole.
    first, carried = ea.linear_attention_recurrent(q[..., :20, :], k[..., :20, :], v[..., :20, :])
    second, _ = ea.linear_attention_recurrent(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], state=carried)
    assert (torch.cat([first, second], -2) - recurrent).abs().max() < 1e-5


def test_performer_features_approach_softmax_attention():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 256, 16, generator=generator) * 0.5
    exact = torch.softmax(q @ k.T / 4, dim=-1)
    distances = []
    for n_features in (16, 4096):
        features = ea.performer_feature_map(16, n_features, torch.Generator().manual_seed(1))
        weights = ea.linear_attention_weights(q, k, features)
        distances.append(0.5 * (weights - exact).abs().sum(-1).mean().item())
    assert distances[1] < distances[0] / 4 and distances[1] < 0.05
    v = torch.randn(256, 8, generator=generator)
    assert torch.allclose(ea.linear_attention(q, k, v, feature_map=features), weights @ v, atol=1e-5)


def test_masks_and_density():
    window = ea.sliding_window_mask(6, 3)
    assert window.sum(-1).tolist() == [1, 2, 3, 3, 3, 3] and not window.triu(1).any()
    assert ea.sliding_window_mask(6, 2, causal=False).sum(-1).tolist() == [2, 3, 3, 3, 3, 2]
    glob = ea.global_token_mask(5, 1)
    assert glob[0].all() and glob[:, 0].all() and not glob[1:, 1:].any()
    assert torch.equal(ea.global_token_mask(5, [0]), glob)
    layout = torch.tensor([[True, False], [True, True]])
    expanded = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]).bool()
    assert torch.equal(ea.block_sparse_mask(layout, 2), expanded)
    assert ea.mask_density(causal_mask(4)) == 10 / 16
    layout = ea.block_layout(8, local_blocks=1, global_blocks=1, random_blocks=0)
    assert torch.equal(layout, layout.tril()) and layout[:, 0].all() and layout.diagonal().all()


def test_peak_memory_sees_a_quadratic_matrix():
    if ea.peak_memory_method("cpu") is None:
        pytest.skip("peak memory is measured on Linux and CUDA only")
    q, k, v = qkv(1, 1, 1024, d=32, d_v=32)
    ea.naive_attention(q, k, v)
    naive = ea.peak_memory(lambda: ea.naive_attention(q, k, v))
    tiled = ea.peak_memory(lambda: ea.tiled_attention(q, k, v, block_size=256))
    assert naive >= 1024 * 1024 * 4  # at least one float32 score matrix
    assert tiled * 4 < naive


def test_attention_flops():
    assert ea.attention_flops(1, 1, 10, 8) == 3200
    assert ea.attention_flops(2, 3, 10, 8, causal=True) == 3200 * 3


def test_triton_module_imports_without_triton():
    from utils import triton_attention

    ok, reason = triton_attention.available("cpu")
    assert not ok and reason.endswith(".") and "\n" not in reason
    assert "def _flash_attention_forward" in triton_attention.kernel_source()


def test_triton_kernel_matches_sdpa_in_the_interpreter():
    """Triton's interpreter runs the kernel with NumPy on CPU tensors: the kernel's logic, without a GPU.

    float32 and float16 only: the interpreter's tl.dot is wrong for bfloat16 (NumPy has no bfloat16),
    so the bfloat16 comparison runs on a GPU, in benchmarks/attention.py --triton.
    """
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("CI"):  # the test extra installs triton on Linux x86_64, so CI always runs this
            pytest.fail("triton is not installed; the test extra installs it on Linux x86_64")
        pytest.skip("triton is optional outside Linux x86_64 (pip install triton); Colab GPUs have it")
    script = (
        "import torch, torch.nn.functional as F\n"
        "from utils import triton_attention as ta\n"
        "g = torch.Generator().manual_seed(0)\n"
        "cases = [(False, 40, 16, 16, 16, torch.float32), (True, 70, 32, 32, 16, torch.float32),\n"
        "         (True, 100, 16, 64, 32, torch.float32), (True, 48, 32, 16, 16, torch.float16)]\n"
        "for causal, length, d, block_m, block_n, dtype in cases:\n"
        "    q, k, v = (torch.randn(2, 2, length, d, generator=g).to(dtype) for _ in range(3))\n"
        "    got = ta.flash_attention(q, k, v, causal=causal, block_m=block_m, block_n=block_n).float()\n"
        "    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)\n"
        "    tolerance = 1e-5 if dtype == torch.float32 else 1e-2\n"
        "    assert (got - want).abs().max() < tolerance, (causal, length, float((got - want).abs().max()))\n"
        "print('ok')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------- exercise 1: sliding window


def sliding_window_mask(length, window):
    positions = torch.arange(length)
    distance = positions[:, None] - positions[None, :]
    return (distance >= 0) & (distance < window)


def sliding_window_by_bands(length, window):
    return torch.ones(length, length, dtype=torch.bool).tril() & ~torch.ones(length, length, dtype=torch.bool).tril(-window)


def test_sliding_window_accepts_correct_answers(capsys):
    for correct in (sliding_window_mask, sliding_window_by_bands):
        ch08.check_sliding_window_mask(correct)
        ch08.check_sliding_window_mask(correct, cases=30, seed=81)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, phrase", [
    (lambda n, w: sliding_window_mask(n, w + 1), "keys, itself and the"),
    (lambda n, w: sliding_window_mask(n, w - 1), "see only"),
    (lambda n, w: (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() < w, "keys after them"),
    (lambda n, w: sliding_window_mask(n, w).T, "transposed"),
    (lambda n, w: torch.ones(n, n, dtype=torch.bool).tril(), "plain causal mask"),
])
def test_sliding_window_mistakes_are_named(wrong, phrase):
    assert phrase in rejection(ch08.check_sliding_window_mask, wrong)


def test_sliding_window_off_by_one_message():
    message = rejection(ch08.check_sliding_window_mask, lambda n, w: sliding_window_mask(n, w + 1))
    assert "query - key < window, not <=" in message


def test_sliding_window_must_be_boolean():
    assert "dtype torch.int64, expected torch.bool" in rejection(
        ch08.check_sliding_window_mask, lambda n, w: sliding_window_mask(n, w).long())


def test_sliding_window_forbids_the_course_function():
    assert "shortcut" in rejection(ch08.check_sliding_window_mask, lambda n, w: ea.sliding_window_mask(n, w))


# ---------------------------------------------------------------- exercise 2: block-sparse mask


def block_sparse_mask(layout, block_size):
    return layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def block_sparse_by_kron(layout, block_size):
    return torch.kron(layout.int(), torch.ones(block_size, block_size, dtype=torch.int)).bool()


def test_block_sparse_accepts_correct_answers(capsys):
    for correct in (block_sparse_mask, block_sparse_by_kron):
        ch08.check_block_sparse_mask(correct)
        ch08.check_block_sparse_mask(correct, cases=30, seed=82)
    assert "✓" in capsys.readouterr().out


def test_block_sparse_mistakes_are_named():
    assert "repeat_interleave, not repeat" in rejection(ch08.check_block_sparse_mask, lambda lay, b: lay.repeat(b, b))
    assert "transposed" in rejection(ch08.check_block_sparse_mask, lambda lay, b: block_sparse_mask(lay.T, b))
    assert "shortcut" in rejection(ch08.check_block_sparse_mask, lambda lay, b: ea.block_sparse_mask(lay, b))


# ---------------------------------------------------------------- exercise 3: causal linear attention


def causal_linear_attention(q, k, v):
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    states = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)
    normalisers = torch.cumsum(phi_k, dim=-2)
    numerator = torch.einsum("...td,...tde->...te", phi_q, states)
    return numerator / ((phi_q * normalisers).sum(-1, keepdim=True) + 1e-6)


def causal_linear_by_masking(q, k, v):
    weights = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).tril()
    return weights @ v / weights.sum(-1, keepdim=True)


def test_causal_linear_attention_accepts_correct_answers(capsys):
    for correct in (causal_linear_attention, causal_linear_by_masking):
        ch08.check_causal_linear_attention(correct)
        ch08.check_causal_linear_attention(correct, cases=25, seed=83)
    assert "✓" in capsys.readouterr().out


def linear_weights(q, k, diagonal=0):
    weights = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)
    return weights if diagonal is None else weights.tril(diagonal)


@pytest.mark.parametrize("wrong, phrase", [
    (lambda q, k, v: linear_weights(q, k, None) @ v / linear_weights(q, k, None).sum(-1, keepdim=True),
     "the future included"),
    (lambda q, k, v: linear_weights(q, k, -1) @ v / (linear_weights(q, k, -1).sum(-1, keepdim=True) + 1e-6),
     "left out the current token"),
    (lambda q, k, v: linear_weights(q, k) @ v, "did not divide"),
    (lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        ~causal_mask(q.shape[-2]), -math.inf), -1) @ v, "computed softmax attention"),
])
def test_causal_linear_attention_mistakes_are_named(wrong, phrase):
    assert phrase in rejection(ch08.check_causal_linear_attention, wrong)


def test_causal_linear_attention_names_a_missing_feature_map():
    def no_feature_map(q, k, v):
        weights = (q @ k.transpose(-2, -1)).tril()
        return weights @ v / (weights.sum(-1, keepdim=True) + 1e-6)

    assert "feature map" in rejection(ch08.check_causal_linear_attention, no_feature_map)


def test_causal_linear_attention_forbids_the_course_functions():
    for shortcut in (lambda q, k, v: ea.linear_attention(q, k, v, causal=True),
                     lambda q, k, v: ea.linear_attention_recurrent(q, k, v)[0],
                     lambda q, k, v: ea.chunked_linear_attention(q, k, v)):
        assert "shortcut" in rejection(ch08.check_causal_linear_attention, shortcut)


# ---------------------------------------------------------------- exercise 4: online softmax step


def online_softmax_update(row_max, row_sum, out, scores, values):
    new_max = torch.maximum(row_max, scores.max(dim=-1, keepdim=True).values)
    rescale = torch.exp(row_max - new_max)
    weights = torch.exp(scores - new_max)
    return new_max, rescale * row_sum + weights.sum(-1, keepdim=True), rescale * out + weights @ values


def test_online_softmax_update_accepts_correct_answers(capsys):
    ch08.check_online_softmax_update(online_softmax_update)
    ch08.check_online_softmax_update(online_softmax_update, cases=30, seed=84)
    assert "✓" in capsys.readouterr().out


def without_sum_rescale(row_max, row_sum, out, scores, values):
    new_max, _, new_out = online_softmax_update(row_max, row_sum, out, scores, values)
    return new_max, row_sum + torch.exp(scores - new_max).sum(-1, keepdim=True), new_out


def without_out_rescale(row_max, row_sum, out, scores, values):
    new_max, new_sum, _ = online_softmax_update(row_max, row_sum, out, scores, values)
    return new_max, new_sum, out + torch.exp(scores - new_max) @ values


def without_any_rescale(row_max, row_sum, out, scores, values):
    new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
    weights = torch.exp(scores - new_max)
    return new_max, row_sum + weights.sum(-1, keepdim=True), out + weights @ values


def block_max_only(row_max, row_sum, out, scores, values):
    block_max = scores.amax(-1, keepdim=True)
    rescale, weights = torch.exp(row_max - block_max), torch.exp(scores - block_max)
    return block_max, rescale * row_sum + weights.sum(-1, keepdim=True), rescale * out + weights @ values


def normalised_out(row_max, row_sum, out, scores, values):
    new_max, new_sum, new_out = online_softmax_update(row_max, row_sum, out, scores, values)
    return new_max, new_sum, new_out / new_sum


@pytest.mark.parametrize("wrong, phrase", [
    (without_sum_rescale, "did not rescale the running sum"),
    (without_out_rescale, "did not rescale out"),
    (without_any_rescale, "rescaled neither"),
    (block_max_only, "from the block alone"),
    (normalised_out, "keep out unnormalised"),
])
def test_online_softmax_mistakes_are_named(wrong, phrase):
    assert phrase in rejection(ch08.check_online_softmax_update, wrong)


def test_online_softmax_update_must_return_three_tensors():
    assert "triple" in rejection(ch08.check_online_softmax_update, lambda *a: online_softmax_update(*a)[2])
    assert "shortcut" in rejection(ch08.check_online_softmax_update, lambda *a: ea.online_softmax_update(*a))


# ---------------------------------------------------------------- exercise 5: tiled attention


def tiled_attention(q, k, v, block_size, causal=False, update=online_softmax_update, divide=True):
    length, scale = q.shape[-2], q.shape[-1] ** -0.5
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype)
    for q0 in range(0, length, block_size):
        qb = q[..., q0:q0 + block_size, :] * scale
        state = (torch.full((*qb.shape[:-1], 1), -math.inf, dtype=q.dtype), torch.zeros(*qb.shape[:-1], 1, dtype=q.dtype),
                 torch.zeros(*qb.shape[:-1], v.shape[-1], dtype=v.dtype))
        for k0 in range(0, (q0 + block_size) if causal else length, block_size):
            scores = qb @ k[..., k0:k0 + block_size, :].transpose(-2, -1)
            if causal:
                rows = torch.arange(q0, q0 + scores.shape[-2])[:, None]
                scores = scores.masked_fill(torch.arange(k0, k0 + scores.shape[-1])[None, :] > rows, -math.inf)
            state = update(*state, scores, v[..., k0:k0 + block_size, :])
        out[..., q0:q0 + block_size, :] = state[2] / state[1] if divide else state[2]
    return out


def tiled_over_all_queries(q, k, v, block_size, causal=False):
    """Vectorised over the queries, a loop over key blocks only: still one block of keys at a time."""
    length = q.shape[-2]
    state = (torch.full((*q.shape[:-1], 1), -math.inf, dtype=q.dtype), torch.zeros(*q.shape[:-1], 1, dtype=q.dtype),
             torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype))
    for k0 in range(0, length, block_size):
        scores = q @ k[..., k0:k0 + block_size, :].transpose(-2, -1) / math.sqrt(q.shape[-1])
        if causal:
            keys = torch.arange(k0, min(k0 + block_size, length))
            scores = scores.masked_fill(keys[None, :] > torch.arange(length)[:, None], -math.inf)
        state = ea.online_softmax_update(*state, scores, v[..., k0:k0 + block_size, :])
    return state[2] / state[1]


def test_tiled_attention_accepts_correct_answers(capsys):
    ch08.check_tiled_attention(tiled_attention)
    ch08.check_tiled_attention(tiled_over_all_queries)
    ch08.check_tiled_attention(tiled_over_all_queries, cases=12, seed=85)
    assert "✓" in capsys.readouterr().out


def test_tiled_attention_that_builds_the_whole_matrix_is_rejected():
    def whole_matrix(q, k, v, block_size, causal=False):
        mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril() if causal else None
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        return torch.softmax(scores, -1) @ v

    def one_head_at_a_time(q, k, v, block_size, causal=False):
        return torch.stack([torch.stack([whole_matrix(q[b, h], k[b, h], v[b, h], block_size, causal)
                                         for h in range(q.shape[1])]) for b in range(q.shape[0])])

    for wrong in (whole_matrix, one_head_at_a_time):
        assert "as large as the whole" in rejection(ch08.check_tiled_attention, wrong)


def test_tiled_attention_mistakes_are_named():
    def hides_diagonal(q, k, v, block_size, causal=False):
        if not causal:
            return tiled_attention(q, k, v, block_size)
        out = tiled_attention(q[..., 1:, :], k[..., :-1, :], v[..., :-1, :], block_size, causal=True)
        return torch.cat([torch.zeros_like(out[..., :1, :]), out], dim=-2)

    def ignores_causal(q, k, v, block_size, causal=False):
        return tiled_attention(q, k, v, block_size, causal=False)

    def unscaled(q, k, v, block_size, causal=False):
        return tiled_attention(q * math.sqrt(q.shape[-1]), k, v, block_size, causal)

    assert "ignored `causal`" in rejection(ch08.check_tiled_attention, ignores_causal)
    assert "did not scale" in rejection(ch08.check_tiled_attention, unscaled)
    assert "own key" in rejection(ch08.check_tiled_attention, hides_diagonal)


def test_tiled_attention_without_rescale_is_caught():
    def no_rescale(q, k, v, block_size, causal=False):
        return tiled_attention(q, k, v, block_size, causal, update=without_any_rescale)

    def no_sum_rescale(q, k, v, block_size, causal=False):
        return tiled_attention(q, k, v, block_size, causal, update=without_sum_rescale)

    def no_division(q, k, v, block_size, causal=False):
        return tiled_attention(q, k, v, block_size, causal, divide=False)

    assert "rescaled neither the running sum nor the output" in rejection(ch08.check_tiled_attention, no_rescale)
    assert "did not rescale the running sum" in rejection(ch08.check_tiled_attention, no_sum_rescale)
    assert "did not divide the output" in rejection(ch08.check_tiled_attention, no_division)


def test_tiled_attention_forbids_library_attention():
    shortcuts = (lambda q, k, v, b, c=False: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                 lambda q, k, v, b, c=False: ea.tiled_attention(q, k, v, causal=c, block_size=b))
    for shortcut in shortcuts:
        assert "shortcut" in rejection(ch08.check_tiled_attention, shortcut)


# ---------------------------------------------------------------- every check, unattempted

