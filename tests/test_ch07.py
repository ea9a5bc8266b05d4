"""Chapter 07: the KV cache and grouped-query attention in utils.kv_cache, and the checks of the exercises.

The reference must be exact where it claims to be (cached and uncached greedy generation give the
same tokens, the prefill gives the full forward pass's logits, a GQA conversion with as many kv
heads as heads changes nothing); the checks accept correct answers written several ways and name
each known mistake in one sentence.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_of, rejection

from utils import kv_cache
from utils.attention import causal_mask, scaled_dot_product_attention
from utils.checks import ch07
from utils.model import GPT, GPTConfig
from utils.train import course_model


@pytest.fixture(scope="module")
def model():
    return course_model(verbose=False)[0]


@pytest.fixture(scope="module")
def text_ids():
    from utils.train import corpus_tensors

    return corpus_tensors()[1][:200][None]


# ---------------------------------------------------------------- the cached forward pass


def test_prefill_and_chunks_give_the_full_forward_logits(model, text_ids):
    ids = text_ids[:, :64]
    with torch.no_grad():
        full = model(ids)[0]
    cache = kv_cache.KVCache(len(model.blocks))
    pieces = [kv_cache.forward_with_cache(model, ids[:, a:b], cache) for a, b in ((0, 40), (40, 41), (41, 64))]
    assert cache.length == 64
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)


def test_decode_without_the_rope_offset_would_differ(model, text_ids):
    """The offset matters: rotating the new token as position 0 gives other logits (so the test above tests it)."""
    ids = text_ids[:, :20]
    cache = kv_cache.KVCache(len(model.blocks))
    kv_cache.forward_with_cache(model, ids[:, :19], cache)
    right = kv_cache.forward_with_cache(model, ids[:, 19:], cache)
    with torch.no_grad():
        alone = model(ids[:, 19:])[0]  # the same token at position 0, no context
    assert not torch.allclose(right, alone, atol=1e-2)


def test_cached_greedy_generation_gives_the_same_tokens(model, text_ids):
    prompt = text_ids[:, :16]
    plain = kv_cache.generate(model, prompt, 60, use_cache=False)
    cached = kv_cache.generate(model, prompt, 60, use_cache=True)
    assert cached.shape == (1, 76) and torch.equal(plain, cached)
    assert torch.equal(cached[:, :16], prompt)


def test_cached_sampling_gives_the_same_tokens_for_the_same_generator(model, text_ids):
    prompt = text_ids[:, :8].repeat(2, 1)
    runs = [kv_cache.generate(model, prompt, 24, use_cache=use, temperature=1.0, top_k=20,
                              generator=torch.Generator().manual_seed(3)) for use in (False, True)]
    assert torch.equal(*runs)


def test_beyond_the_trained_window_both_sides_agree_on_an_extended_context(model, text_ids):
    longer = kv_cache.extend_context(model, 160)
    assert longer.config.context_length == 160 and model.config.context_length == 128
    assert longer.blocks[0].attn.rope_cos.shape[0] == 160 and model.blocks[0].attn.rope_cos.shape[0] == 128
    prompt = text_ids[:, :120]
    with pytest.raises(ValueError, match="extend_context"):
        kv_cache.generate(model, prompt, 30)
    assert torch.equal(kv_cache.generate(longer, prompt, 30, use_cache=False),
                       kv_cache.generate(longer, prompt, 30, use_cache=True))


def test_learned_positions_are_offset_too():
    torch.manual_seed(0)
    gpt2_like = GPT(GPTConfig(vocab_size=50, context_length=32, n_layer=2, n_head=2, d_model=32, position="learned",
                              mlp="gelu", norm="layernorm")).eval()
    ids = torch.randint(0, 50, (2, 20))
    cache = kv_cache.KVCache(2)
    pieces = [kv_cache.forward_with_cache(gpt2_like, ids[:, a:b], cache) for a, b in ((0, 12), (12, 13), (13, 20))]
    with torch.no_grad():
        assert torch.allclose(torch.cat(pieces, dim=1), gpt2_like(ids)[0], atol=1e-5)
    with pytest.raises(ValueError, match="rotary"):
        kv_cache.extend_context(gpt2_like, 64)


def test_the_cache_grows_by_the_new_positions_and_knows_its_bytes():
    cache = kv_cache.KVCache(3, max_length=6)
    for layer in range(3):
        keys, values = cache.update(layer, torch.zeros(2, 4, 5, 8), torch.ones(2, 4, 5, 8))
    assert cache.length == 5 and keys.shape == (2, 4, 5, 8)
    for layer in range(3):
        keys, values = cache.update(layer, torch.zeros(2, 4, 1, 8), torch.full((2, 4, 1, 8), 2.0))
    assert cache.length == 6 and values[:, :, -1].eq(2).all() and values[:, :, 0].eq(1).all()
    assert cache.nbytes() == kv_cache.kv_cache_bytes(3, 4, 8, 6, batch_size=2, bytes_per_element=4)
    with pytest.raises(ValueError, match="max_length"):
        cache.update(0, torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))


def test_cached_attention_fused_and_explicit_agree_and_decode_needs_no_mask():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    explicit = kv_cache.cached_attention(q, k, v)
    assert torch.allclose(explicit, kv_cache.cached_attention(q, k, v, fused=True), atol=1e-5)
    full = scaled_dot_product_attention(torch.cat([torch.randn(2, 3, 6, 8), q], 2), k, v, causal_mask(10))
    assert torch.allclose(explicit, full[:, :, 6:], atol=1e-5)
    one = q[:, :, :1]
    assert torch.allclose(kv_cache.cached_attention(one, k, v), scaled_dot_product_attention(one, k, v), atol=1e-6)


# ---------------------------------------------------------------- grouped-query attention


def test_repeat_kv_repeats_each_head_in_place():
    x = torch.arange(2.0)[None, :, None, None].expand(1, 2, 3, 4)
    assert kv_cache.repeat_kv(x, 3)[0, :, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert kv_cache.repeat_kv(x, 1) is x


def test_pool_kv_heads_averages_consecutive_heads():
    weight = torch.arange(4.0).repeat_interleave(2)[:, None].expand(8, 3)  # 4 heads of 2 rows, head h = h
    pooled = kv_cache.pool_kv_heads(weight, n_head=4, n_kv_head=2)
    assert pooled[:, 0].tolist() == [0.5, 0.5, 2.5, 2.5]
    assert kv_cache.pool_kv_heads(torch.arange(8.0), 4, 1).tolist() == [3.0, 4.0]  # a bias
    with pytest.raises(ValueError):
        kv_cache.pool_kv_heads(weight, 4, 3)


def test_grouped_query_conversion(model, text_ids):
    ids = text_ids[:, :50]
    with torch.no_grad():
        same = kv_cache.to_grouped_query(model, model.config.n_head)
        assert torch.allclose(same(ids)[0], model(ids)[0], atol=1e-5)
        mqa = kv_cache.to_grouped_query(model, 1)
        attn = mqa.blocks[0].attn
        assert attn.key.weight.shape == (attn.d_head, model.config.d_model)
        assert torch.allclose(attn.key.weight, model.blocks[0].attn.key.weight.reshape(4, attn.d_head, -1).mean(0))
        fused = mqa(ids)[0]
        _, weights = attn(mqa.blocks[0].norm1(mqa.token_embedding(ids)), return_weights=True)
        assert weights.shape == (1, 4, 50, 50)
    cache = kv_cache.KVCache(len(mqa.blocks))
    assert torch.allclose(kv_cache.forward_with_cache(mqa, ids, cache), fused, atol=1e-4)
    full_cache = kv_cache.KVCache(len(model.blocks))
    kv_cache.forward_with_cache(model, ids, full_cache)
    assert cache.nbytes() * model.config.n_head == full_cache.nbytes()
    assert kv_cache.attention_shape(mqa).kind == "MQA" and kv_cache.attention_shape(model).kind == "MHA"
    prompt = text_ids[:, :12]
    assert torch.equal(kv_cache.generate(mqa, prompt, 20, use_cache=False), kv_cache.generate(mqa, prompt, 20))


# ---------------------------------------------------------------- memory accounting


def test_published_models_cache_per_token():
    per_token = {m.name: m.cache_bytes(1) for m in kv_cache.PUBLISHED_MODELS}
    assert per_token["Llama-2-7B"] == 512 * 1024  # the well-known 0.5 MiB per token in float16
    assert per_token["Llama-3-8B"] == 128 * 1024 and per_token["Mistral-7B"] == 128 * 1024
    assert per_token["Falcon-7B"] == 8 * 1024 and per_token["GPT-2 (124M)"] == 36_864
    assert per_token["Llama-2-70B"] == 320 * 1024
    kinds = {m.name: m.kind for m in kv_cache.PUBLISHED_MODELS}
    assert kinds["Llama-2-7B"] == "MHA" and kinds["Llama-3-8B"] == "GQA" and kinds["Falcon-7B"] == "MQA"
    assert kv_cache.kv_cache_bytes(32, 32, 128, 4096) == 2 * 1024**3


# ---------------------------------------------------------------- exercise 1: update_kv_cache


def update_by_index(cache_k, cache_v, k_new, v_new):
    past, new = cache_k.shape[2], k_new.shape[2]
    keys = cache_k.new_empty(*cache_k.shape[:2], past + new, cache_k.shape[3])
    values = torch.empty_like(keys)
    keys[:, :, :past], keys[:, :, past:] = cache_k, k_new
    values[:, :, :past], values[:, :, past:] = cache_v, v_new
    return keys, values


def test_update_kv_cache_accepts_correct_answers(capsys):
    for correct in (copy_of(kv_cache.update_kv_cache), update_by_index):
        ch07.check_update_kv_cache(correct)
        ch07.check_update_kv_cache(correct, cases=10, seed=71)
        ch07.check_update_kv_cache_from_empty(correct)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, phrase", [
    (lambda ck, cv, k, v: (torch.cat([ck, k], 1), torch.cat([cv, v], 1)), "along the heads (1) axis"),
    (lambda ck, cv, k, v: (torch.cat([ck, k], -1), torch.cat([cv, v], -1)), "along the feature (3) axis"),
    (lambda ck, cv, k, v: (torch.cat([ck, k, k], 2), torch.cat([cv, v, v], 2)), "appended the new keys twice"),
    (lambda ck, cv, k, v: (ck, cv), "never appended"),
    (lambda ck, cv, k, v: (k, v), "overwritten instead of extended"),
    (lambda ck, cv, k, v: (torch.cat([ck[:, :, :-k.shape[2]], k], 2), torch.cat([cv[:, :, :-v.shape[2]], v], 2)),
     "over the last cached positions"),
    (lambda ck, cv, k, v: (torch.cat([k, ck], 2), torch.cat([v, cv], 2)), "before the cached ones"),
    (lambda ck, cv, k, v: (torch.cat([cv, v], 2), torch.cat([ck, k], 2)), "where the keys belong"),
])
def test_update_kv_cache_names_each_way_a_cache_grows_wrongly(wrong, phrase):
    assert phrase in rejection(ch07.check_update_kv_cache, wrong)


def test_update_kv_cache_along_a_wrong_axis_that_happens_to_fit_is_named():
    def stacked_on_batch(ck, cv, k, v):
        return torch.cat([ck, k.expand(-1, -1, ck.shape[2], -1)], 0), torch.cat([cv, v.expand(-1, -1, cv.shape[2], -1)], 0)

    assert "along the batch (0) axis" in rejection(ch07.check_update_kv_cache, stacked_on_batch)


def test_update_kv_cache_must_return_a_pair():
    assert "return the pair" in rejection(ch07.check_update_kv_cache, lambda ck, cv, k, v: torch.cat([ck, k], 2))


# ---------------------------------------------------------------- exercise 2: cached_attention


def cached_attention_by_hand(q, k, v):
    new, total = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    allowed = torch.arange(total)[None, :] <= torch.arange(total - new, total)[:, None]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def test_cached_attention_accepts_correct_answers(capsys):
    for correct in (copy_of(kv_cache.cached_attention), cached_attention_by_hand):
        ch07.check_cached_attention(correct)
        ch07.check_cached_attention(correct, cases=16, seed=72)
        ch07.check_cached_attention_matches_full(correct)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, phrase", [
    (lambda q, k, v: scaled_dot_product_attention(q, k, v), "see all the cached keys"),
    (lambda q, k, v: scaled_dot_product_attention(q, k, v, torch.ones(q.shape[-2], k.shape[-2]).bool().tril()),
     "top-left corner"),
    (lambda q, k, v: cached_attention_by_hand(q * math.sqrt(q.shape[-1]), k, v), "sqrt(d_head)"),
    (lambda q, k, v: cached_attention_by_hand(q, k, k), "keys instead of the values"),
])
def test_cached_attention_names_the_usual_mistakes(wrong, phrase):
    assert phrase in rejection(ch07.check_cached_attention, wrong)


def test_cached_attention_forbids_the_fused_kernel_and_the_course_function():
    fused = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    assert "shortcut" in rejection(ch07.check_cached_attention, fused)
    assert "shortcut" in rejection(ch07.check_cached_attention, lambda q, k, v: kv_cache.cached_attention(q, k, v))


# ---------------------------------------------------------------- exercise 3: kv_cache_bytes


def test_kv_cache_bytes_accepts_a_correct_answer(capsys):
    def by_parts(n_layer, n_kv_head, d_head, context_length, batch_size=1, bytes_per_element=2):
        per_token = 2 * n_kv_head * d_head * bytes_per_element
        return per_token * n_layer * context_length * batch_size

    ch07.check_kv_cache_bytes(by_parts)
    ch07.check_kv_cache_bytes(by_parts, cases=20, seed=73)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("factor, phrase", [
    (0.5, "factor 2"), (8, "bits, not bytes"),
])
def test_kv_cache_bytes_names_the_usual_mistakes(factor, phrase):
    def wrong(n_layer, n_kv_head, d_head, context_length, batch_size=1, bytes_per_element=2):
        return int(2 * n_layer * n_kv_head * d_head * context_length * batch_size * bytes_per_element * factor)

    assert phrase in rejection(ch07.check_kv_cache_bytes, wrong)


def test_kv_cache_bytes_names_missing_factors():
    def numbers(n_layer, n_kv_head, d_head, context_length, batch_size=1, bytes_per_element=2):
        return 2 * n_layer * n_kv_head * d_head * context_length * batch_size

    def no_layers(n_layer, n_kv_head, d_head, context_length, batch_size=1, bytes_per_element=2):
        return 2 * n_kv_head * d_head * context_length * batch_size * bytes_per_element

    def as_float(n_layer, n_kv_head, d_head, context_length, batch_size=1, bytes_per_element=2):
        return 2.0 * n_layer * n_kv_head * d_head * context_length * batch_size * bytes_per_element

    assert "numbers, not bytes" in rejection(ch07.check_kv_cache_bytes, numbers)
    assert "number of layers" in rejection(ch07.check_kv_cache_bytes, no_layers)
    assert "return an int" in rejection(ch07.check_kv_cache_bytes, as_float)


# ---------------------------------------------------------------- exercise 4: repeat_kv


def test_repeat_kv_accepts_correct_answers(capsys):
    for correct in (copy_of(kv_cache.repeat_kv), lambda x, n_rep: torch.repeat_interleave(x, n_rep, dim=1)):
        ch07.check_repeat_kv(correct)
        ch07.check_repeat_kv(correct, cases=16, seed=74)
    assert "✓" in capsys.readouterr().out


def test_repeat_kv_tiling_is_named():
    assert "tiles the heads" in rejection(ch07.check_repeat_kv, lambda x, n_rep: x.repeat(1, n_rep, 1, 1))


def test_repeat_kv_on_the_wrong_axis_gives_the_shape():
    message = rejection(ch07.check_repeat_kv, lambda x, n_rep: torch.repeat_interleave(x, n_rep, dim=2))
    assert "shape" in message


# ---------------------------------------------------------------- exercise 5: pool_kv_heads


def test_pool_kv_heads_accepts_correct_answers(capsys):
    def by_loop(weight, n_head, n_kv_head):
        d_head, group = weight.shape[0] // n_head, n_head // n_kv_head
        heads = weight.split(d_head)
        return torch.cat([torch.stack(heads[g * group:(g + 1) * group]).mean(0) for g in range(n_kv_head)])

    for correct in (copy_of(kv_cache.pool_kv_heads), by_loop):
        ch07.check_pool_kv_heads(correct)
        ch07.check_pool_kv_heads(correct, cases=18, seed=75)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, phrase", [
    (ch07._strided, "n_kv_head apart"),
    (ch07._summed, "sums the heads"),
    (ch07._first_of_group, "first head of each group"),
    (ch07._pooled_channels, "neighbouring rows"),
])
def test_pool_kv_heads_names_the_usual_mistakes(wrong, phrase):
    assert phrase in rejection(ch07.check_pool_kv_heads, copy_of(wrong))


def test_pool_kv_heads_forbids_the_course_function():
    assert "shortcut" in rejection(ch07.check_pool_kv_heads, lambda w, h, g: kv_cache.pool_kv_heads(w, h, g))


# ---------------------------------------------------------------- every check, unattempted

