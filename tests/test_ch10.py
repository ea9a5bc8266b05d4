"""Chapter 10: utils.lora (LoRA, DoRA, QLoRA, BitFit, merging, the peft cross-check) and its checks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_of, rejection

from utils import lora, quant
from utils.checks import ch10
from utils.model import GPT, GPTConfig

# ---------------------------------------------------------------- a small model, trained-looking adapters

SMALL = GPTConfig(vocab_size=40, context_length=32, n_layer=2, n_head=2, d_model=64)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return GPT(SMALL).eval()


def ids(seed=0):
    return torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def trained_looking(model, seed=1):
    """Give every adapter a non-zero B (and DoRA a moved magnitude), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.adapters(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            if isinstance(layer, lora.DoRALinear):
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=generator))
    return model


# ---------------------------------------------------------------- the layers


@pytest.mark.parametrize("dora", [False, True])
def test_an_adapted_model_starts_as_the_base_model(base, dora):
    adapted = lora.add_lora(copy.deepcopy(base), rank=4, alpha=8, dora=dora)
    torch.testing.assert_close(adapted(ids())[0], base(ids())[0], atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n and "magnitude" not in n)
    assert len(lora.adapters(adapted)) == 2 * 7


def test_lora_layer_is_the_formula(base):
    layer = lora.LoRALinear(copy.deepcopy(base.blocks[0].attn.query), rank=4, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, layer.base.weight) + (12 / 4) * x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(64) and layer.lora_B.grad is None


@pytest.mark.parametrize("dora", [False, True])
def test_merge_and_unmerge_keep_the_outputs(base, dora):
    model = trained_looking(lora.add_lora(copy.deepcopy(base), rank=4, alpha=16, dora=dora))
    before = {n: layer.base.weight.detach().clone() for n, layer in model.named_modules()
              if isinstance(layer, lora.LoRALinear)}
    with torch.no_grad():
        expected = model(ids())[0]
        assert (expected - base(ids())[0]).abs().max() > 1e-2  # the adapters really change the model
        lora.merge_adapters(model)
        torch.testing.assert_close(model(ids())[0], expected, atol=1e-5, rtol=1e-5)
        plain = lora.merged_copy(lora.unmerge_adapters(model))
        assert not lora.adapters(plain) and all(p.requires_grad for p in plain.parameters())
        torch.testing.assert_close(plain(ids())[0], expected, atol=1e-5, rtol=1e-5)
    for name, layer in model.named_modules():
        if isinstance(layer, lora.LoRALinear):
            torch.testing.assert_close(layer.base.weight, before[name], atol=1e-6, rtol=0)


def test_qlora_base_is_nf4_and_small_and_trains(base):
    model = lora.prepare(base, "qlora", rank=4)
    assert isinstance(model.blocks[0].mlp.up.base, quant.QuantizedLinear)
    assert model.blocks[0].mlp.up.base.scheme == "nf4"
    assert lora.frozen_bytes(model) <= 0.2 * quant.storage_bytes(base) + SMALL.vocab_size * SMALL.d_model * 4
    _, loss = model(ids(), ids(1))
    loss.backward()
    assert model.blocks[0].mlp.up.lora_B.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="cannot be merged"):
        model.blocks[0].mlp.up.merge()


def test_bitfit_trains_only_new_zero_biases(base):
    model = lora.prepare(base, "bitfit")
    torch.testing.assert_close(model(ids())[0], base(ids())[0])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert lora.count_parameters(model).trainable == SMALL.n_layer * (5 * SMALL.d_model + 2 * SMALL.mlp_hidden)


def test_counts_optimizer_state_and_fraction(base):
    model = lora.prepare(base, "lora", rank=2, targets=lora.QUERY_VALUE)
    counts = lora.count_parameters(model)
    assert counts.trainable == 2 * 2 * 2 * (64 + 64)
    assert math.isclose(counts.fraction, counts.trainable / counts.total)
    assert math.isclose(lora.lora_parameter_fraction([(128, 128)], 8, 128 * 128), 0.125)
    assert set(lora.adapter_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_measures_what_it_trained(base):
    data = torch.randint(0, SMALL.vocab_size, (2000,), generator=torch.Generator().manual_seed(3))
    model = lora.prepare(base, "lora", rank=2)
    config = lora.finetune_config("lora", steps=6, batch_size=4, eval_batches=2)
    result = lora.finetune(model, "lora", data, data, data, config, progress=False)
    trainable = lora.count_parameters(model).trainable
    assert result.trainable == trainable
    tensors = sum(p.requires_grad for p in model.parameters())
    assert 8 * trainable <= result.optimizer_state_bytes <= 8 * trainable + 8 * tensors  # two moments + a step count
    assert result.new_domain_after != result.new_domain_before
    assert result.base_bytes == lora.frozen_bytes(model) > 0


def test_prepare_names_an_unknown_method(base):
    with pytest.raises(ValueError, match="Unknown method 'prompt'"):
        lora.prepare(base, "prompt")
    with pytest.raises(ValueError, match="No linear layer"):
        lora.add_lora(copy.deepcopy(base), targets=("c_attn",))


def test_the_new_domain_fits_the_vocabulary():
    from utils.data import fit_to_vocabulary, load_python_docs

    text = load_python_docs()
    assert len(text) > 100_000 and "def" in text
    vocabulary = sorted(set("abc defghijklmnopqrstuvwxyz'\"-.()\n"))
    fitted = fit_to_vocabulary("Don’t use __init__ = 0 “here”…", vocabulary)
    assert set(fitted) <= set(vocabulary) and len(fitted) == len("Don’t use __init__ = 0 “here”") + 3


# ---------------------------------------------------------------- the same numbers as peft


@pytest.mark.parametrize("dora", [False, True])
def test_course_lora_matches_peft(dora):
    """On the course model, the same adapter weights give peft's outputs within 1e-5 (float64 removes rounding)."""
    from utils.train import course_model

    base, _ = course_model(verbose=False)
    base = base.double()
    ours = trained_looking(lora.add_lora(copy.deepcopy(base), rank=8, alpha=16, dora=dora), seed=5)
    theirs = lora.peft_copy(ours, base)
    assert type(theirs.blocks[0].attn.query).__module__.startswith("peft.")
    tokens = torch.randint(0, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, reference = ours(tokens)[0], theirs(tokens)[0]
        assert (mine - base(tokens)[0]).abs().max() > 1e-2
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the checks


def init_lora(in_features, out_features, rank):
    bound = 1 / math.sqrt(in_features)
    return (torch.rand(rank, in_features) * 2 - 1) * bound, torch.zeros(out_features, rank)


def init_lora_kaiming(in_features, out_features, rank):
    a = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, torch.zeros(out_features, rank)


def init_lora_gaussian(in_features, out_features, rank):
    return torch.randn(rank, in_features) / rank, torch.zeros(out_features, rank)  # peft's "gaussian" option


def lora_forward(x, weight, a, b, alpha, rank):
    return x @ weight.T + (alpha / rank) * ((x @ a.T) @ b.T)


def merge_lora(weight, a, b, alpha, rank):
    return weight + alpha / rank * b @ a


def dora_weight(weight, a, b, magnitude, alpha, rank):
    adapted = weight + (alpha / rank) * (b @ a)
    return magnitude.unsqueeze(1) * adapted / adapted.norm(dim=1, keepdim=True).detach()


def test_checks_accept_correct_answers(capsys):
    for correct in (init_lora, init_lora_kaiming, init_lora_gaussian):
        ch10.check_init_lora(correct, cases=20, seed=7)
    ch10.check_lora_forward(lora_forward, cases=20, seed=7)
    ch10.check_lora_forward(lambda x, w, a, b, alpha, r: F.linear(x, w) + F.linear(F.linear(x, a), b) * alpha / r)
    ch10.check_merge_lora(merge_lora, cases=20, seed=7)
    ch10.check_dora_weight(dora_weight, cases=20, seed=7)
    ch10.check_dora_weight(copy_of(lora.dora_weight))
    assert capsys.readouterr().out.count("✓") == 8


@pytest.mark.parametrize("answer, phrase", [
    (lambda i, o, r: (torch.rand(r, i) / i**0.5, torch.randn(o, r) * 0.01), "B that is not all zeros"),
    (lambda i, o, r: (torch.zeros(r, i), torch.zeros(o, r)), "A of zeros"),
    (lambda i, o, r: (torch.zeros(o, r), torch.rand(r, i) / i**0.5), "each other's shapes"),
    (lambda i, o, r: (torch.randn(r, i), torch.zeros(o, r)), "far too large"),
    (lambda i, o, r: (torch.rand(1, i).repeat(r, 1) / i**0.5, torch.zeros(o, r)), "not independent"),
    (lambda i, o, r: (torch.rand(r, i).long(), torch.zeros(o, r)), "float tensors"),
])
def test_init_check_names_the_mistake(answer, phrase):
    assert phrase in rejection(ch10.check_init_lora, answer)


@pytest.mark.parametrize("answer, phrase", [
    (lambda x, w, a, b, alpha, r: x @ w.T + x @ a.T @ b.T, "left out the alpha / r scale"),
    (lambda x, w, a, b, alpha, r: x @ w.T + r / alpha * x @ a.T @ b.T, "r / alpha instead of alpha / r"),
    (lambda x, w, a, b, alpha, r: x @ w.T + alpha * x @ a.T @ b.T, "alpha alone"),
    (lambda x, w, a, b, alpha, r: alpha / r * x @ a.T @ b.T, "left out the frozen base"),
    (lambda x, w, a, b, alpha, r: alpha / r * (x @ w.T + x @ a.T @ b.T), "base output x Wᵀ by alpha / r as well"),
    (lambda x, w, a, b, alpha, r: x @ w.T, "returned"),
    (lambda x, w, a, b, alpha, r: torch.full((2,), float("nan")), "shape"),
])
def test_forward_check_names_the_mistake(answer, phrase):
    assert phrase in rejection(ch10.check_lora_forward, answer)


def test_forward_check_rejects_the_course_function():
    assert "shortcut" in rejection(ch10.check_lora_forward, lora.lora_forward)


def merge_in_place(weight, a, b, alpha, rank):
    weight += alpha / rank * b @ a
    return weight


@pytest.mark.parametrize("answer, phrase", [
    (lambda w, a, b, alpha, r: w + b @ a, "forgot the alpha / r scale when merging"),
    (lambda w, a, b, alpha, r: w - alpha / r * b @ a, "subtracted the update"),
    (lambda w, a, b, alpha, r: alpha / r * b @ a, "returned only the update"),
    (lambda w, a, b, alpha, r: w + r / alpha * b @ a, "r / alpha"),
    (lambda w, a, b, alpha, r: (w + alpha / r * b @ a).T, "the transpose"),
    (merge_in_place, "changed `weight` in place"),
])
def test_merge_check_names_the_mistake(answer, phrase):
    assert phrase in rejection(ch10.check_merge_lora, answer)


def _adapted(w, a, b, alpha, r):
    return w + alpha / r * b @ a


@pytest.mark.parametrize("answer, phrase", [
    (lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, alpha, r) / _adapted(w, a, b, alpha, r).norm(
        dim=0, keepdim=True), "normalised the columns"),
    (lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, alpha, r) / _adapted(w, a, b, alpha, r).norm(),
     "whole matrix"),
    (lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, alpha, r) / w.norm(dim=1, keepdim=True),
     "row norms of W"),
    (lambda w, a, b, m, alpha, r: m[:, None] * _adapted(w, a, b, r, r) / _adapted(w, a, b, r, r).norm(
        dim=1, keepdim=True), "left out the alpha / r scale"),
    (lambda w, a, b, m, alpha, r: _adapted(w, a, b, alpha, r) / _adapted(w, a, b, alpha, r).norm(dim=1, keepdim=True),
     "left out the magnitude"),
])
def test_dora_check_names_the_mistake(answer, phrase):
    assert phrase in rejection(ch10.check_dora_weight, answer)


def test_dora_layer_is_dora_weight_and_dropout_reaches_only_the_update(base):
    torch.manual_seed(3)
    layer = lora.DoRALinear(copy.deepcopy(base.blocks[0].mlp.up), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.copy_(torch.linspace(-0.2, 0.2, layer.lora_B.numel()).reshape(layer.lora_B.shape))
        layer.magnitude.mul_(1.1)
    x = torch.randn(2, 7, SMALL.d_model)
    weight = lora.dora_weight(layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude, 8, 4)
    torch.testing.assert_close(layer.eval()(x), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer.train()(x), F.linear(x, weight))  # in training the update sees dropped-out x
