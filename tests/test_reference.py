"""The reference code of Part I (attention, positions, model, generate) against PyTorch's own versions."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils import attention, generate, model, positions


def test_softmax_is_stable_and_matches_torch():
    x = torch.randn(4, 7) * 50 + 1000  # naive exp overflows here
    assert torch.isnan(attention.naive_softmax(x)).any()
    torch.testing.assert_close(attention.softmax(x), torch.softmax(x, -1))
    masked = torch.full((2, 3), float("-inf"))
    assert torch.equal(attention.softmax(masked), torch.zeros(2, 3))  # fully masked rows stay harmless


@pytest.mark.parametrize("use_mask", ["none", "causal", "padding"])
def test_scaled_dot_product_attention_matches_pytorch(use_mask):
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    mask = {"none": None, "causal": attention.causal_mask(6),
            "padding": attention.padding_mask(torch.tensor([6, 4]), 6)[:, None]}[use_mask]
    ours, weights = attention.scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 6))


def test_heads_split_and_merge_are_inverse_and_head_h_is_channel_block_h():
    x = torch.randn(2, 5, 12)
    heads = attention.split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert torch.equal(heads[:, 1], x[..., 4:8])
    assert torch.equal(attention.merge_heads(heads), x)


@pytest.mark.parametrize("rope", [False, True])
def test_fused_and_explicit_attention_paths_agree(rope):
    torch.manual_seed(0)
    layer = attention.MultiHeadAttention(32, 4, causal=True, rope=rope, max_length=16)
    x = torch.randn(2, 10, 32)
    fused = layer(x)
    explicit, weights = layer(x, return_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert torch.all(weights.triu(1) == 0), "a causal layer attended to the future"
    padding = attention.padding_mask(torch.tensor([10, 7]), 10)[:, None]
    torch.testing.assert_close(layer(x, padding), layer(x, padding, return_weights=True)[0], atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = positions.rope_frequencies(64, 16)
    q, k = torch.randn(16), torch.randn(16)
    q_rot = positions.apply_rope(q.expand(64, 16), cos, sin)
    k_rot = positions.apply_rope(k.expand(64, 16), cos, sin)
    scores = q_rot @ k_rot.T  # score[m, n] for query at m, key at n
    for offset in (0, 3, 17):
        diagonal = torch.diagonal(scores, offset=-offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(64))  # a rotation keeps lengths


def test_sinusoidal_table_layout():
    table = positions.sinusoidal_positions(50, 8)
    assert torch.allclose(table[:, 0], torch.sin(torch.arange(50.0)))
    assert torch.allclose(table[:, 1], torch.cos(torch.arange(50.0)))
    angle = torch.tensor(7 / 10_000 ** (6 / 8))  # position 7, pair 3 of 4
    assert torch.allclose(table[7, 6], torch.sin(angle)) and torch.allclose(table[7, 7], torch.cos(angle))


def test_norms_match_pytorch():
    x = torch.randn(3, 5, 16)
    layer_norm = model.LayerNorm(16, eps=1e-5)
    torch.testing.assert_close(layer_norm(x), F.layer_norm(x, (16,), eps=1e-5))
    rms = model.RMSNorm(16, eps=1e-6)
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(model.gelu(x), F.gelu(x))
    torch.testing.assert_close(model.gelu_tanh(x), F.gelu(x, approximate="tanh"))


@pytest.mark.parametrize("variant", [
    {}, {"mlp": "gelu", "norm": "layernorm", "position": "learned", "bias": True},
    {"position": "sinusoidal", "prenorm": False, "causal": False}, {"tie_weights": False, "position": "none"},
])
def test_gpt_variants_run_and_inspect_agrees_with_forward(variant):
    torch.manual_seed(0)
    config = model.GPTConfig(vocab_size=30, context_length=16, n_layer=2, n_head=2, d_model=32, **variant)
    gpt = model.GPT(config).eval()
    ids = torch.randint(0, 30, (2, 12))
    logits, loss = gpt(ids, torch.randint(0, 30, (2, 12)))
    assert logits.shape == (2, 12, 30) and abs(loss.item() - math.log(30)) < 0.3  # near uniform at init
    last = gpt.inspect(ids)["hidden_states"][-1]
    head_input = gpt.final_norm(last) if gpt.final_norm is not None else last
    torch.testing.assert_close(gpt.lm_head(head_input), logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context_length"):
        gpt(torch.zeros(1, 17, dtype=torch.long))


def test_causal_model_output_ignores_the_future():
    torch.manual_seed(0)
    gpt = model.GPT(model.GPTConfig(vocab_size=20, context_length=16, n_layer=2, n_head=2, d_model=32)).eval()
    ids = torch.randint(0, 20, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 20
    torch.testing.assert_close(gpt(ids)[0][:, :7], gpt(changed)[0][:, :7])


def test_parameter_counts_count_tied_weights_once():
    config = model.GPTConfig()
    counts = model.count_parameters(model.GPT(config))
    assert counts["total"] == sum(p.numel() for p in model.GPT(config).parameters())
    assert counts["head"] == 0 and counts["embedding"] == config.vocab_size * config.d_model
    untied = model.count_parameters(model.GPT(model.GPTConfig(tie_weights=False)))
    assert untied["total"] - counts["total"] == config.vocab_size * config.d_model
    flops = model.flops_per_token(config)
    non_embedding = counts["attention"] + counts["mlp"]
    assert flops["attention projections"] + flops["mlp"] == 2 * non_embedding


def test_sampling_filters():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(generate.top_k_filter(logits, 2)).tolist() == [[False, True, False, True]]
    # probabilities about .64 .09 .24 .03: p=0.5 keeps the top token only, p=0.7 the top two
    assert torch.isfinite(generate.top_p_filter(logits, 0.5)).sum() == 1
    assert torch.isfinite(generate.top_p_filter(logits, 0.7)).sum() == 2
    generator = torch.Generator().manual_seed(0)
    draws = {generate.sample_next(logits, top_k=1, generator=generator).item() for _ in range(20)}
    assert draws == {0}
    with pytest.raises(ValueError, match="temperature"):
        generate.apply_temperature(logits, 0)
