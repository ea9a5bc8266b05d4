"""Checks for chapter 04, the transformer block and the GPT model.

Each ``check_*`` compares the learner's function with the reference in :mod:`utils.model` on
seeded random inputs; ``seed`` and ``cases`` let the hidden tests use inputs the visible ones never
showed. When an answer differs, the check also tries the classic mistakes of that exercise (an
unbiased variance, ``eps`` outside the square root, a missing residual, tied weights counted
twice, ...) and, when one of them reproduces the learner's output, names it in the sentence.
The references are bound here, when the module is imported, before any learner code runs.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model import (
    GPT,
    Block,
    GPTConfig,
    LayerNorm,
    RMSNorm,
    SwiGLU,
    count_parameters,
    gelu,
    make_mlp,
)
from ..model import layer_norm as _layer_norm
from ..model import rms_norm as _rms_norm
from ..model import swiglu as _swiglu
from .core import (
    Case,
    CheckFailed,
    Forbidden,
    call_learner,
    check_function,
    describe,
    difference,
    expect,
)

_FLOAT32_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}  # different but correct orders of float32 sums differ by ~1e-6


def _compare(*args, atol: float = 1e-5, rtol: float = 1e-4, **kwargs) -> None:
    """:func:`core.check_function` with float32 tolerances; a wrong answer equal to a known mistake is named."""
    check_function(*args, atol=atol, rtol=rtol, **kwargs)


# ---------------------------------------------------------------- exercise 1: LayerNorm

_LAYER_NORM_SHORTCUTS = (
    Forbidden(LayerNorm.forward, "the course's LayerNorm module"),
    Forbidden(nn.LayerNorm.forward, "torch.nn.LayerNorm"),
    Forbidden(F.layer_norm, "torch.nn.functional.layer_norm"),
    Forbidden(torch.layer_norm, "torch.layer_norm"),
    Forbidden(torch.native_layer_norm, "torch.native_layer_norm"),
)


def _normed_input(case: Case) -> tuple[torch.Tensor, float, torch.dtype]:
    """x of shape (..., d) in one of three regimes, so that every classic mistake shows.

    Regime 0 sits far from zero (a forgotten mean shows), regime 1 has a tiny spread (where ``eps``
    goes matters: 1e-5 against a variance of 1e-4), regime 2 has a large ``eps`` in float64.
    """
    regime = case.index % 3
    d = case.rng.choice([4, 7, 16, 64, 384]) if regime != 1 else case.rng.choice([8, 32, 128])
    leading = [case.rng.randint(1, 4) for _ in range(case.rng.randint(0, 2))]
    dtype = torch.float64 if regime == 2 else torch.float32
    scale, offset, eps = [(5.0, 3.0, 1e-5), (0.01, 0.0, 1e-5), (1.0, -1.0, 0.5)][regime]
    x = case.randn(*leading, d, dtype=dtype) * scale + offset
    return x, eps, dtype


def _layer_norm_inputs(case: Case) -> tuple:
    x, eps, dtype = _normed_input(case)
    d = x.shape[-1]
    return x, 1.0 + 0.5 * case.randn(d, dtype=dtype), 0.5 * case.randn(d, dtype=dtype), eps


def _ln_unbiased(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + eps) * weight + bias


def _ln_eps_outside(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).pow(2).mean(-1, keepdim=True).sqrt()
    return (x - mean) / (std + eps) * weight + bias


def _ln_no_eps(x, weight, bias, eps):
    return _layer_norm(x, weight, bias, 0.0)


def _ln_no_mean(x, weight, bias, eps):
    return _rms_norm(x, weight, eps) + bias


def _ln_no_bias(x, weight, bias, eps):
    return _layer_norm(x, weight, None, eps)


_LAYER_NORM_MISTAKES = (
    (("divides by the unbiased standard deviation (d - 1, torch.var's default); LayerNorm uses the biased one, "
      "the mean of the squared deviations: pass unbiased=False or correction=0"), _ln_unbiased),
    ("adds eps outside the square root; it belongs inside, sqrt(variance + eps)", _ln_eps_outside),
    ("leaves out eps; it belongs inside the square root, sqrt(variance + eps)", _ln_no_eps),
    ("does not subtract the mean, which is RMSNorm (exercise 2), not LayerNorm", _ln_no_mean),
    ("does not add `bias` after scaling by `weight`", _ln_no_bias),
)


def check_layer_norm(layer_norm: Callable, cases: int = 6, seed: int = 41) -> None:
    """Exercise 1: ``layer_norm(x, weight, bias, eps)`` normalises the last axis, then scales and shifts."""
    _compare(layer_norm, _layer_norm, _layer_norm_inputs, name=getattr(layer_norm, "__name__", "layer_norm"),
             cases=cases, seed=seed, forbidden=_LAYER_NORM_SHORTCUTS, mistakes=_LAYER_NORM_MISTAKES)


def check_layer_norm_edge_cases(layer_norm: Callable) -> None:
    """Exercise 1, hidden: constant rows, one feature, a gradient, and torch's own layer norm."""
    name = getattr(layer_norm, "__name__", "layer_norm")

    def run(*args, what):
        return call_learner(layer_norm, args, name, what, _LAYER_NORM_SHORTCUTS, reference=_layer_norm)

    weight, bias = torch.linspace(0.5, 2.0, 6), torch.linspace(-1.0, 1.0, 6)
    constant = torch.full((3, 6), 3.0)  # exactly representable, so the mean is exact
    expect(run(constant, weight, bias, 1e-5, what="on rows whose values are all equal"), bias.expand(3, 6),
           f"`{name}` on rows whose values are all equal (the output must be `bias`)")
    one = torch.tensor([[3.0], [-2.0]])
    expect(run(one, torch.ones(1), torch.zeros(1), 1e-5, what="with one feature"), torch.zeros(2, 1),
           f"`{name}` with a single feature per row")
    x = Case(0, 4242).randn(2, 5, 48) * 3 + 1
    w, b = torch.rand(48) + 0.5, torch.randn(48)
    expect(run(x, w, b, 1e-5, what="against torch"), F.layer_norm(x, (48,), w, b, 1e-5),
           f"`{name}` compared with torch.nn.functional.layer_norm", **_FLOAT32_TOLERANCE)
    mine = x.clone().requires_grad_(True)
    out = run(mine, w, b, 1e-5, what="on the gradient test")
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailed(f"`{name}` returned a tensor that does not depend on `x`, so no gradient flows back.")
    out.pow(2).sum().backward()
    theirs = x.clone().requires_grad_(True)
    F.layer_norm(theirs, (48,), w, b, 1e-5).pow(2).sum().backward()
    expect(mine.grad, theirs.grad, f"The gradient of `{name}` with respect to `x`", atol=1e-4, rtol=1e-3)
    print(f"✓ {name}: constant rows, a single feature, torch's layer_norm and the gradient all agree.")


# ---------------------------------------------------------------- exercise 2: RMSNorm

_RMS_NORM_SHORTCUTS = (
    Forbidden(RMSNorm.forward, "the course's RMSNorm module"),
    *([Forbidden(nn.RMSNorm.forward, "torch.nn.RMSNorm")] if hasattr(nn, "RMSNorm") else []),
    *([Forbidden(F.rms_norm, "torch.nn.functional.rms_norm")] if hasattr(F, "rms_norm") else []),
    *([Forbidden(torch.rms_norm, "torch.rms_norm")] if hasattr(torch, "rms_norm") else []),
)


def _rms_norm_inputs(case: Case) -> tuple:
    x, eps, dtype = _normed_input(case)
    return x, 1.0 + 0.5 * case.randn(x.shape[-1], dtype=dtype), eps


def _rms_subtracts_mean(x, weight, eps):
    return _layer_norm(x, weight, None, eps)


def _rms_eps_outside(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def _rms_no_eps(x, weight, eps):
    return _rms_norm(x, weight, 0.0)


def _rms_no_mean(x, weight, eps):  # the root *sum* of squares: the L2 norm, not the root mean square
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight


def _rms_no_weight(x, weight, eps):
    return _rms_norm(x, torch.ones_like(weight), eps)


_RMS_NORM_MISTAKES = (
    ("subtracts the mean, which makes it LayerNorm; RMSNorm divides x itself by its root mean square", _rms_subtracts_mean),
    ("adds eps outside the square root; it belongs inside, sqrt(mean(x²) + eps)", _rms_eps_outside),
    ("leaves out eps; it belongs inside the square root, sqrt(mean(x²) + eps)", _rms_no_eps),
    ("divides by the square root of the *sum* of squares; RMSNorm takes the mean over the last axis", _rms_no_mean),
    ("does not multiply by `weight`", _rms_no_weight),
)


def check_rms_norm(rms_norm: Callable, cases: int = 6, seed: int = 42) -> None:
    """Exercise 2: ``rms_norm(x, weight, eps)``: divide by the root mean square, scale; no mean, no bias."""
    _compare(rms_norm, _rms_norm, _rms_norm_inputs, name=getattr(rms_norm, "__name__", "rms_norm"),
             cases=cases, seed=seed, forbidden=_RMS_NORM_SHORTCUTS, mistakes=_RMS_NORM_MISTAKES)


# ---------------------------------------------------------------- exercise 3: SwiGLU

_SWIGLU_SHORTCUTS = (Forbidden(SwiGLU.forward, "the course's SwiGLU module"),)


def _swiglu_inputs(case: Case) -> tuple:
    d_model, d_hidden = case.rng.choice([4, 8, 16, 32]), case.rng.choice([6, 12, 24, 40])
    leading = [case.rng.randint(1, 4) for _ in range(case.rng.randint(0, 2))]
    dtype = torch.float64 if case.index % 3 == 2 else torch.float32
    x = case.randn(*leading, d_model, dtype=dtype)
    w_gate = case.randn(d_model, d_hidden, dtype=dtype) / math.sqrt(d_model)
    w_up = case.randn(d_model, d_hidden, dtype=dtype) / math.sqrt(d_model)
    w_down = case.randn(d_hidden, d_model, dtype=dtype) / math.sqrt(d_hidden)
    return x, w_gate, w_up, w_down


_SWIGLU_MISTAKES = (
    ("applies silu to the `up` branch instead of the `gate` branch: the gate is silu(x @ w_gate)",
     lambda x, g, u, d: _swiglu(x, u, g, d)),
    ("applies silu to both branches; only the gate, x @ w_gate, goes through silu",
     lambda x, g, u, d: (F.silu(x @ g) * F.silu(x @ u)) @ d),
    ("applies silu after the product; only the gate, x @ w_gate, goes through silu before multiplying",
     lambda x, g, u, d: F.silu((x @ g) * (x @ u)) @ d),
    ("uses gelu instead of silu (that variant is called GEGLU)",
     lambda x, g, u, d: (gelu(x @ g) * (x @ u)) @ d),
    ("adds the two branches; SwiGLU multiplies them element by element",
     lambda x, g, u, d: (F.silu(x @ g) + (x @ u)) @ d),
)


def check_swiglu(swiglu: Callable, cases: int = 6, seed: int = 43) -> None:
    """Exercise 3: ``swiglu(x, w_gate, w_up, w_down)`` = ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``."""
    _compare(swiglu, _swiglu, _swiglu_inputs, name=getattr(swiglu, "__name__", "swiglu"), cases=cases,
             seed=seed, forbidden=_SWIGLU_SHORTCUTS, mistakes=_SWIGLU_MISTAKES)


def check_swiglu_matches_module(swiglu: Callable, seed: int = 430) -> None:
    """Exercise 3, hidden: with an ``nn.Linear`` module's weights, transposed, it equals the course's SwiGLU."""
    name = getattr(swiglu, "__name__", "swiglu")
    torch.manual_seed(seed)
    module = SwiGLU(24, 64)
    x = Case(0, seed).randn(2, 5, 24)
    args = (x, module.gate.weight.T.detach(), module.up.weight.T.detach(), module.down.weight.T.detach())
    got = call_learner(swiglu, args, name, "with the weights of a SwiGLU module", _SWIGLU_SHORTCUTS, reference=_swiglu)
    with torch.no_grad():
        expected = module(x)
    expect(got, expected, f"`{name}` with the (transposed) weights of utils.model.SwiGLU", **_FLOAT32_TOLERANCE)
    print(f"✓ {name}: equals the SwiGLU module of utils.model given its weights.")


# ---------------------------------------------------------------- exercise 4: a pre-norm block

_BLOCK_SHORTCUTS = (Forbidden(Block.forward, "the block's own forward (block(x))"),)


def _block_reference(x: torch.Tensor, block: Block) -> torch.Tensor:
    return block(x)


def _random_block(case: Case) -> Block:
    """A small pre-norm block, every weight drawn from ``case`` so that the two norms differ."""
    n_head = case.rng.choice([1, 2, 4])
    config = GPTConfig(
        vocab_size=11, context_length=16, n_layer=1, n_head=n_head, d_model=n_head * case.rng.choice([4, 8]),
        mlp=["swiglu", "gelu"][case.index % 2], norm=["rmsnorm", "layernorm"][(case.index // 2) % 2],
        position=case.rng.choice(["rope", "none"]), bias=case.index % 3 == 1, causal=case.index % 4 != 3,
        prenorm=True)
    block = Block(config).eval()
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if parameter.dim() == 2:  # a weight matrix, scaled so that activations stay near 1
                parameter.copy_(case.randn(*parameter.shape) / math.sqrt(parameter.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.5 * case.randn(*parameter.shape))
            else:
                parameter.copy_(0.2 * case.randn(*parameter.shape))
    return block


def _block_inputs(case: Case) -> tuple:
    block = _random_block(case)
    d = block.norm1.weight.shape[0]
    return case.randn(case.rng.randint(1, 3), case.rng.randint(1, 9), d) * 1.5 + 0.5, block


def _no_residual(x, block):
    x = block.attn(block.norm1(x))
    return block.mlp(block.norm2(x))


def _no_mlp_residual(x, block):
    x = x + block.attn(block.norm1(x))
    return block.mlp(block.norm2(x))


def _no_attention_residual(x, block):
    x = block.attn(block.norm1(x))
    return x + block.mlp(block.norm2(x))


def _post_norm(x, block):
    x = block.norm1(x + block.attn(x))
    return block.norm2(x + block.mlp(x))


def _normed_stream(x, block):
    x = block.norm1(x)
    x = x + block.attn(x)
    x = block.norm2(x)
    return x + block.mlp(x)


def _parallel(x, block):
    return x + block.attn(block.norm1(x)) + block.mlp(block.norm2(x))


def _swapped_norms(x, block):
    x = x + block.attn(block.norm2(x))
    return x + block.mlp(block.norm1(x))


_BLOCK_MISTAKES = (
    ("has no residual connections: each sub-layer's output must be added to its input, x = x + attn(norm1(x))",
     _no_residual),
    ("has no residual connection around the MLP: the second step is x = x + mlp(norm2(x))", _no_mlp_residual),
    ("has no residual connection around attention: the first step is x = x + attn(norm1(x))", _no_attention_residual),
    ("is a post-norm block, norm(x + f(x)); a pre-norm block normalises only the sub-layer's input, x + f(norm(x))",
     _post_norm),
    (("normalises the residual stream itself; only the sub-layer's input is normalised, x + f(norm(x)), "
      "so the stream x passes unchanged"), _normed_stream),
    ("feeds the same x to attention and the MLP; the MLP must see the stream after attention was added",
     _parallel),
    ("uses norm2 before attention and norm1 before the MLP; each sub-layer has its own norm, norm1 first",
     _swapped_norms),
)


def check_block_forward(block_forward: Callable, cases: int = 8, seed: int = 44) -> None:
    """Exercise 4: ``block_forward(x, block)``: ``x + attn(norm1(x))``, then ``+ mlp(norm2(·))``."""
    _compare(block_forward, _block_reference, _block_inputs, name=getattr(block_forward, "__name__", "block_forward"),
             cases=cases, seed=seed, forbidden=_BLOCK_SHORTCUTS, mistakes=_BLOCK_MISTAKES)


def check_block_gradients(block_forward: Callable, seed: int = 440) -> None:
    """Exercise 4, hidden: every parameter of the block receives the gradient it gets through ``block(x)``."""
    name = getattr(block_forward, "__name__", "block_forward")
    case = Case(1, seed)
    x, block = _block_inputs(case)
    mine, reference = copy.deepcopy(block), copy.deepcopy(block)
    out = call_learner(block_forward, (x, mine), name, "on the gradient test", _BLOCK_SHORTCUTS,
                       reference=_block_reference)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailed(f"`{name}` returned a tensor that does not depend on the block's weights.")
    upstream = case.randn(*x.shape)
    (out * upstream).sum().backward()
    (reference(x) * upstream).sum().backward()
    for label, got in mine.named_parameters():
        if got.grad is None:
            raise CheckFailed(f"`{name}` never uses block.{label} (or detaches it), so it receives no gradient.")
    for (label, got), expected in zip(mine.named_parameters(), reference.parameters()):
        expect(got.grad, expected.grad, f"The gradient of block.{label} through `{name}`", atol=1e-4, rtol=1e-3)
    print(f"✓ {name}: every parameter of the block receives the same gradient as through block(x).")


# ---------------------------------------------------------------- exercise 5: counting parameters

_COUNT_SHORTCUTS = (
    Forbidden(GPT.__init__, "building the model (GPT(config))"),
    Forbidden(Block.__init__, "building a block (Block(config))"),
    Forbidden(make_mlp, "building an MLP module (make_mlp)"),
)


def _parameters_by_building(config: GPTConfig) -> int:
    """The reference: build the model on the meta device (shapes only, no memory) and count it."""
    with torch.device("meta"):
        model = GPT(config)
    return count_parameters(model)["total"]


def _random_config(case: Case) -> GPTConfig:
    n_head = case.rng.choice([1, 2, 4])
    return GPTConfig(
        vocab_size=case.rng.randint(5, 300), context_length=case.rng.randint(4, 64), n_layer=case.rng.randint(1, 4),
        n_head=n_head, d_model=n_head * case.rng.choice([2, 4, 8, 16]),
        mlp=["gelu", "swiglu"][(case.index // 2) % 2], d_hidden=case.rng.choice([None, None, case.rng.randint(3, 50)]),
        norm=case.rng.choice(["rmsnorm", "layernorm"]),
        position=["learned", "rope", "sinusoidal", "none", "learned"][case.index % 5],
        prenorm=case.rng.random() < 0.7, causal=True, bias=case.index % 4 in (1, 2),
        type_vocab_size=case.rng.choice([0, 0, 0, 2]), tie_weights=case.index % 2 == 0)


def _brief(config: GPTConfig) -> str:
    fields = ("vocab_size", "context_length", "n_layer", "d_model", "mlp", "norm", "position", "prenorm", "bias",
              "type_vocab_size", "tie_weights")
    return "GPTConfig(" + ", ".join(f"{f}={getattr(config, f)!r}" for f in fields) + f"; mlp_hidden={config.mlp_hidden})"


def _count_mistake(config: GPTConfig, delta: int) -> str | None:
    """Name the mistake when the count is off by exactly one component."""
    d, V = config.d_model, config.vocab_size
    norm = d * (2 if config.norm == "layernorm" and config.bias else 1)
    if config.bias:
        mlp_biases = config.mlp_hidden * (2 if config.mlp == "swiglu" else 1) + d
        all_biases = config.n_layer * (4 * d + mlp_biases + (2 * d if config.norm == "layernorm" else 0)) + (
            d if config.norm == "layernorm" else 0)
    else:
        all_biases = 0
    diagnoses = [
        (config.tie_weights and delta == V * d,
         ("counts the output head's matrix although tie_weights=True: a tied head shares the token embedding, "
          "so it adds no parameters")),
        (not config.tie_weights and delta == -V * d,
         "leaves out the output head: with tie_weights=False it has its own vocab_size × d_model matrix"),
        (config.position == "learned" and delta == -config.context_length * d,
         "leaves out the learned position table (context_length × d_model)"),
        (config.position != "learned" and delta == config.context_length * d,
         f"counts a position table, but position={config.position!r} has no parameters; only 'learned' does"),
        (delta == -norm,
         "leaves out the one extra norm (the final norm of a pre-norm model, or the embedding norm of a post-norm one)"),
        (delta == -config.n_layer * 2 * norm or delta == -(config.n_layer * 2 + 1) * norm,
         "leaves out the norms: two per block and one more for the whole model"),
        (all_biases and delta == -all_biases,
         "leaves out the biases, which bias=True adds to every linear layer and LayerNorm"),
        (config.type_vocab_size and delta == -config.type_vocab_size * d,
         "leaves out the segment embeddings (type_vocab_size × d_model)"),
    ]
    return next((phrase for hit, phrase in diagnoses if hit), None)


def _check_count(count_gpt_parameters: Callable, config: GPTConfig, label: str) -> None:
    name = getattr(count_gpt_parameters, "__name__", "count_gpt_parameters")
    expected = _parameters_by_building(config)
    got = call_learner(count_gpt_parameters, (copy.deepcopy(config),), name, label, _COUNT_SHORTCUTS,
                       reference=_parameters_by_building)
    found = difference(got, expected)
    if found is None:
        return
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        raise CheckFailed(f"`{name}` returned {describe(got)} {label}, where an int was expected.")
    got = int(got)
    mistake = _count_mistake(config, got - expected)
    if mistake:
        raise CheckFailed(f"`{name}` {mistake} ({label}: {_brief(config)}).")
    more_or_fewer = "more" if got > expected else "fewer"
    raise CheckFailed(f"`{name}` returned {got:,}, {more_or_fewer} parameters than the model has, {label}: "
                      f"{_brief(config)}.")


def check_count_gpt_parameters(count_gpt_parameters: Callable, cases: int = 10, seed: int = 45) -> None:
    """Exercise 5: ``count_gpt_parameters(config)`` equals the built model's count, tied weights once."""
    if not callable(count_gpt_parameters):
        raise CheckFailed(f"Expected a function to check, got {describe(count_gpt_parameters)}.")
    for index in range(cases):
        config = _random_config(Case(index, seed * 10_007 + index))
        _check_count(count_gpt_parameters, config, f"on test input #{index + 1}")
    print(f"✓ {getattr(count_gpt_parameters, '__name__', 'count_gpt_parameters')}: "
          f"all {cases} configurations match the built model's parameter count.")


GPT2_SMALL = GPTConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, d_model=768, mlp="gelu",
                       activation="gelu_tanh", norm="layernorm", position="learned", prenorm=True, bias=True)
MINILM_L6 = GPTConfig(vocab_size=30522, context_length=512, n_layer=6, n_head=12, d_model=384, mlp="gelu",
                      d_hidden=1536, norm="layernorm", norm_eps=1e-12, position="learned", prenorm=False,
                      causal=False, bias=True, type_vocab_size=2)


def check_count_known_models(count_gpt_parameters: Callable) -> None:
    """Exercise 5, hidden: the configurations of GPT-2 small and MiniLM-L6, and an untied GPT-2."""
    from dataclasses import replace

    for label, config in (("for GPT-2 small", GPT2_SMALL), ("for MiniLM-L6", MINILM_L6),
                          ("for GPT-2 small with tie_weights=False", replace(GPT2_SMALL, tie_weights=False))):
        _check_count(count_gpt_parameters, config, label)
    print(f"✓ {getattr(count_gpt_parameters, '__name__', 'count_gpt_parameters')}: "
          "GPT-2 small, MiniLM-L6 and an untied GPT-2 match the built models.")
