"""Chapter 04's checks: correct answers pass, classic mistakes fail with one sentence that names them."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_of
from conftest import rejection as failure

from utils import model
from utils.checks import ch04

# ---------------------------------------------------------------- correct answers


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    variance = x.var(-1, keepdim=True, correction=0)  # a different, equally right way to the variance
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def block_forward(x, block):
    x = x + block.attn(block.norm1(x))
    return x + block.mlp(block.norm2(x))


def count_gpt_parameters(config):
    d, hidden = config.d_model, config.mlp_hidden
    norm = d * (2 if config.norm == "layernorm" and config.bias else 1)
    attention = 4 * d * d + (4 * d if config.bias else 0)
    matrices = 3 if config.mlp == "swiglu" else 2
    mlp = matrices * d * hidden + ((matrices - 1) * hidden + d if config.bias else 0)
    total = (config.vocab_size + config.type_vocab_size) * d + config.n_layer * (attention + mlp + 2 * norm) + norm
    total += config.context_length * d if config.position == "learned" else 0
    return total + (0 if config.tie_weights else config.vocab_size * d)


def test_correct_answers_pass(capsys):
    ch04.check_layer_norm(layer_norm, cases=30)
    ch04.check_layer_norm_edge_cases(layer_norm)
    ch04.check_rms_norm(rms_norm, cases=30)
    ch04.check_swiglu(swiglu, cases=30)
    ch04.check_swiglu_matches_module(swiglu)
    ch04.check_block_forward(block_forward, cases=24)
    ch04.check_block_gradients(block_forward)
    ch04.check_count_gpt_parameters(count_gpt_parameters, cases=40)
    ch04.check_count_known_models(count_gpt_parameters)
    printed = capsys.readouterr().out
    assert printed.count("✓") == 9


def test_the_references_themselves_pass_as_a_learners_copy():
    ch04.check_layer_norm(copy_of(model.layer_norm))
    ch04.check_rms_norm(copy_of(model.rms_norm))
    ch04.check_swiglu(copy_of(model.swiglu))


def test_count_matches_known_models():
    assert count_gpt_parameters(ch04.GPT2_SMALL) == 124_439_808
    assert count_gpt_parameters(replace(ch04.GPT2_SMALL, tie_weights=False)) == 124_439_808 + 50257 * 768


# ---------------------------------------------------------------- exercise 1: LayerNorm mistakes


def ln_unbiased(x, weight, bias, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) * weight + bias


def ln_eps_outside(x, weight, bias, eps=1e-5):
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight + bias


def ln_no_eps(x, weight, bias, eps=1e-5):
    centred = x - x.mean(-1, keepdim=True)
    return centred / centred.pow(2).mean(-1, keepdim=True).sqrt() * weight + bias


@pytest.mark.parametrize("wrong, expected", [
    (ln_unbiased, "unbiased standard deviation"),
    (ln_eps_outside, "adds eps outside the square root"),
    (ln_no_eps, "leaves out eps"),
    (lambda x, w, b, eps: rms_norm(x, w, eps) + b, "does not subtract the mean"),
    (lambda x, w, b, eps: layer_norm(x, w, b, eps) - b, "does not add `bias`"),
    (lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps), "used torch.nn.functional.layer_norm"),
    (lambda x, w, b, eps: torch.layer_norm(x, x.shape[-1:], w, b, eps), "used torch.layer_norm"),
    (lambda x, w, b, eps: torch.nn.LayerNorm(x.shape[-1], eps, dtype=x.dtype)(x), "torch.nn.LayerNorm"),
    (lambda x, w, b, eps: model.LayerNorm(x.shape[-1], eps)(x), "the course's LayerNorm module"),
    (lambda x, w, b, eps: model.layer_norm(x, w, b, eps), "the course's own utils.model.layer_norm"),
    (lambda x, w, b, eps: layer_norm(x, w, b, eps).float(), "dtype torch.float32, expected torch.float64"),
])
def test_layer_norm_mistakes(wrong, expected):
    assert expected in failure(ch04.check_layer_norm, wrong)


def test_layer_norm_edge_cases_catch_a_nan_on_constant_rows():
    def no_eps_at_all(x, weight, bias, eps=1e-5):
        centred = x - x.mean(-1, keepdim=True)
        return centred / centred.std(-1, keepdim=True, correction=0) * weight + bias

    assert "rows whose values are all equal" in failure(ch04.check_layer_norm_edge_cases, no_eps_at_all)


# ---------------------------------------------------------------- exercise 2: RMSNorm mistakes


def rms_subtracting_mean(x, weight, eps=1e-5):
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("wrong, expected", [
    (rms_subtracting_mean, "subtracts the mean, which makes it LayerNorm"),
    (lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w, "adds eps outside the square root"),
    (lambda x, w, eps: x / x.pow(2).mean(-1, keepdim=True).sqrt() * w, "leaves out eps"),
    (lambda x, w, eps: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w, "*sum* of squares"),
    (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), "does not multiply by `weight`"),
    (lambda x, w, eps: F.rms_norm(x, x.shape[-1:], w, eps), "used torch.nn.functional.rms_norm"),
    (lambda x, w, eps: torch.rms_norm(x, x.shape[-1:], w, eps), "used torch.rms_norm"),
    (lambda x, w, eps: model.RMSNorm(x.shape[-1], eps)(x), "the course's RMSNorm module"),
])
def test_rms_norm_mistakes(wrong, expected):
    assert expected in failure(ch04.check_rms_norm, wrong)


# ---------------------------------------------------------------- exercise 3: SwiGLU mistakes


@pytest.mark.parametrize("wrong, expected", [
    (lambda x, g, u, d: (F.silu(x @ u) * (x @ g)) @ d, "applies silu to the `up` branch instead of the `gate`"),
    (lambda x, g, u, d: (F.silu(x @ g) * F.silu(x @ u)) @ d, "applies silu to both branches"),
    (lambda x, g, u, d: F.silu((x @ g) * (x @ u)) @ d, "applies silu after the product"),
    (lambda x, g, u, d: (F.gelu(x @ g) * (x @ u)) @ d, "GEGLU"),
    (lambda x, g, u, d: (F.silu(x @ g) + (x @ u)) @ d, "adds the two branches"),
    (lambda x, g, u, d: (F.silu(x @ g) * (x @ u)) @ d.T, "raised RuntimeError"),
    (lambda x, g, u, d: (F.silu(x @ g) * (x @ u)) @ d[:, :1], "shape"),
])
def test_swiglu_mistakes(wrong, expected):
    assert expected in failure(ch04.check_swiglu, wrong)


def test_swiglu_may_not_call_the_module():
    def via_module(x, w_gate, w_up, w_down):
        module = model.SwiGLU(w_gate.shape[0], w_gate.shape[1]).to(x.dtype)
        with torch.no_grad():
            module.gate.weight.copy_(w_gate.T)
            module.up.weight.copy_(w_up.T)
            module.down.weight.copy_(w_down.T)
        return module(x)

    assert "the course's SwiGLU module" in failure(ch04.check_swiglu, via_module)


# ---------------------------------------------------------------- exercise 4: block mistakes


def missing_residual(x, block):
    x = block.attn(block.norm1(x))
    return block.mlp(block.norm2(x))


def missing_mlp_residual(x, block):
    x = x + block.attn(block.norm1(x))
    return block.mlp(block.norm2(x))


def post_norm(x, block):
    x = block.norm1(x + block.attn(x))
    return block.norm2(x + block.mlp(x))


def normed_stream(x, block):
    x = block.norm1(x)
    x = x + block.attn(x)
    x = block.norm2(x)
    return x + block.mlp(x)


def parallel(x, block):
    return x + block.attn(block.norm1(x)) + block.mlp(block.norm2(x))


def swapped_norms(x, block):
    x = x + block.attn(block.norm2(x))
    return x + block.mlp(block.norm1(x))


def no_final_addition_of_attention(x, block):  # an unnamed mistake still fails, with the generic sentence
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("wrong, expected", [
    (missing_residual, "has no residual connections"),
    (missing_mlp_residual, "no residual connection around the MLP"),
    (post_norm, "is a post-norm block"),
    (normed_stream, "normalises the residual stream itself"),
    (parallel, "feeds the same x to attention and the MLP"),
    (swapped_norms, "uses norm2 before attention"),
    (no_final_addition_of_attention, "`no_final_addition_of_attention` returned"),
    (lambda x, block: block(x), "used the block's own forward"),
])
def test_block_mistakes(wrong, expected):
    assert expected in failure(ch04.check_block_forward, wrong)


def test_block_gradient_check_sees_an_unused_module():
    def detached_mlp(x, block):
        x = x + block.attn(block.norm1(x))
        return x + block.mlp(block.norm2(x)).detach()

    assert "receives no gradient" in failure(ch04.check_block_gradients, detached_mlp)


# ---------------------------------------------------------------- exercise 5: counting mistakes


def tied_counted_twice(config):
    return count_gpt_parameters(replace(config, tie_weights=False))


@pytest.mark.parametrize("wrong, expected", [
    (tied_counted_twice, "counts the output head's matrix although tie_weights=True"),
    (lambda c: count_gpt_parameters(replace(c, tie_weights=True)), "leaves out the output head"),
    (lambda c: count_gpt_parameters(replace(c, position="learned")), "has no parameters; only 'learned' does"),
    (lambda c: count_gpt_parameters(replace(c, position="rope")), "leaves out the learned position table"),
    (lambda c: count_gpt_parameters(c) - c.d_model * (2 if c.norm == "layernorm" and c.bias else 1),
     "leaves out the one extra norm"),
    (lambda c: count_gpt_parameters(c) + 3, "more parameters than the model has"),
    (lambda c: float(count_gpt_parameters(c)), "where an int was expected"),
    (lambda c: model.count_parameters(model.GPT(c))["total"], "used building the model"),
])
def test_count_mistakes(wrong, expected):
    message = failure(ch04.check_count_gpt_parameters, wrong)
    assert expected in message
    assert "expected" not in message.replace("was expected", ""), "the check must not print the right count"


def test_count_mistake_on_biases():
    def no_biases(config):  # linear layers and LayerNorms alike
        return count_gpt_parameters(replace(config, bias=False))

    assert "leaves out the biases" in failure(ch04.check_count_gpt_parameters, no_biases)

