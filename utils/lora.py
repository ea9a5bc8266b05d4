"""Parameter-efficient fine-tuning of the course GPT (chapter 10): LoRA, DoRA, QLoRA and BitFit.

A fine-tuned weight is the pretrained weight plus a change, ``W + ΔW``. LoRA bets that the change
a new task needs has low rank and trains it as a product of two thin matrices:

    y = x Wᵀ + (alpha / r) · x Aᵀ Bᵀ          A: (r, in_features), B: (out_features, r)

Conventions, the same as the ``peft`` library's (a test checks the outputs agree within 1e-5):

* **Initialisation**: ``A`` uniform in ±1/sqrt(in_features) (``nn.Linear``'s default), ``B`` zeros.
  So ``ΔW = B A = 0`` and the adapted model starts as *exactly* the base model; ``A`` must not be
  zero as well, or the gradients of both would be zero forever.
* **Scale** ``alpha / r``: with it, changing the rank does not change how big the update's effect is
  at the start, so one learning rate works across ranks.
* **Merge**: ``W ← W + (alpha / r) B A`` folds the adapter into the weight for inference at no extra
  cost; unmerge subtracts it again.
* **DoRA** splits each output row of the adapted weight into a length (``magnitude``, trained, starting
  at the row norms of ``W``) and a direction (``W + s B A`` over its row norms). As in the DoRA paper and
  ``peft``, the row norms are treated as constants in the backward pass, which saves memory.
* **QLoRA** is LoRA whose frozen base is a :class:`utils.quant.QuantizedLinear` (NF4): the adapter is
  float, the base is 4 bits. Such a layer cannot be merged without rounding again.
* **BitFit** trains only biases. The course GPT has none, so :func:`add_bitfit` adds zero biases:
  the model starts unchanged here too.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantizedLinear, replace_module, unique_bytes

ATTENTION = ("query", "key", "value", "out")
MLP = ("gate", "up", "down")
ALL_PROJECTIONS = ATTENTION + MLP
QUERY_VALUE = ("query", "value")  # the LoRA paper's choice, and peft's default for GPT-style models


# ---------------------------------------------------------------- the maths, as functions


def lora_scale(alpha: float, rank: int) -> float:
    """The factor ``alpha / r`` that multiplies every LoRA update (chapter 10)."""
    return alpha / rank


def init_lora(in_features: int, out_features: int, rank: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` for a new adapter: A ``(rank, in)`` uniform in ±1/sqrt(in), B ``(out, rank)`` zeros (chapter 10)."""
    bound = 1.0 / math.sqrt(in_features)  # what nn.init.kaiming_uniform_(a=sqrt(5)) gives, as in nn.Linear and peft
    a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    b = torch.zeros(out_features, rank)
    return a, b


def lora_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · x Aᵀ Bᵀ`` without ever forming ``B A``: two thin products, ``r·(in + out)`` per token."""
    return (x @ a.t()) @ b.t() * scale


def lora_forward(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 alpha: float, rank: int) -> torch.Tensor:
    """A LoRA linear layer without bias: ``x Wᵀ + (alpha / r) · x Aᵀ Bᵀ`` (chapter 10)."""
    return F.linear(x, weight) + lora_update(x, a, b, lora_scale(alpha, rank))


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """The merged weight ``W + (alpha / r) · B A``, one matrix that computes what base plus adapter did (chapter 10)."""
    return weight + lora_scale(alpha, rank) * (b @ a)


def dora_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor,
                alpha: float, rank: int) -> torch.Tensor:
    """DoRA's weight: each row of ``W + (alpha / r) B A`` rescaled to length ``magnitude[row]`` (chapter 10)."""
    adapted = merge_lora(weight, a, b, alpha, rank)
    norms = adapted.norm(dim=1, keepdim=True).detach()  # constant in backward, as the paper and peft do
    return magnitude.unsqueeze(1) * adapted / norms


# ---------------------------------------------------------------- the layers


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The float weight a base layer computes with (a quantized base dequantizes)."""
    return base.dequantized_weight() if isinstance(base, QuantizedLinear) else base.weight


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (or :class:`QuantizedLinear`: QLoRA) plus a trainable low-rank update (chapter 10)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA needs a rank of at least 1, got {rank}.")
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, lora_scale(alpha, rank)
        a, b = init_lora(self.in_features, self.out_features, rank, generator)
        reference = _base_weight(base)  # the adapter lives on the base's device, in its dtype
        self.lora_A = nn.Parameter(a.to(reference.device, reference.dtype))
        self.lora_B = nn.Parameter(b.to(reference.device, reference.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = (alpha / r) · B A``, shape ``(out, in)``."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + lora_update(self.dropout(x), self.lora_A, self.lora_B, self.scale)

    def _mergeable_weight(self) -> torch.Tensor:
        if isinstance(self.base, QuantizedLinear):
            raise TypeError("A LoRA over a quantized base (QLoRA) cannot be merged without rounding the sum "
                            "to 4 bits again; keep the adapter separate, or merge into a float copy of the base.")
        return self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: inference then costs what the base model costs."""
        if not self.merged:
            self._mergeable_weight().add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (to keep training, or to swap adapters)."""
        if self.merged:
            self._mergeable_weight().sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}" + (", merged" if self.merged else "")


class DoRALinear(LoRALinear):
    """LoRA's direction update plus a trained length for each output row (DoRA, Liu et al. 2024; chapter 10)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(base, rank, alpha, dropout, generator)
        self.magnitude = nn.Parameter(_base_weight(base).detach().norm(dim=1).clone())
        self._merge_norms: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        base_weight = _base_weight(self.base)
        # x · dora_weight(...)ᵀ, written as magnitude / ‖W + ΔW‖ times (x Wᵀ + update), as peft does, so that
        # dropout reaches only the update path. The row norms are constants in backward, as in dora_weight.
        norms = merge_lora(base_weight, self.lora_A, self.lora_B, self.alpha, self.rank).norm(dim=1).detach()
        update = lora_update(self.dropout(x), self.lora_A, self.lora_B, self.scale)
        out = self.magnitude / norms * (F.linear(x, base_weight) + update)
        bias = getattr(self.base, "bias", None)
        return out + bias if bias is not None else out

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self._mergeable_weight()
            self._merge_norms = merge_lora(weight, self.lora_A, self.lora_B, self.alpha, self.rank).norm(dim=1)
            weight.copy_(dora_weight(weight, self.lora_A, self.lora_B, self.magnitude, self.alpha, self.rank))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self._mergeable_weight()
            # merged row = magnitude · (W + ΔW) / norm, so W = merged · norm / magnitude − ΔW
            weight.copy_(weight * (self._merge_norms / self.magnitude).unsqueeze(1) - self.delta_weight())
            self._merge_norms, self.merged = None, False


# ---------------------------------------------------------------- putting adapters into a model


def freeze(model: nn.Module) -> nn.Module:
    """Stop every parameter of ``model`` from training."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _targets(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module]]:
    targets = tuple(targets)
    found = [(name, module) for name, module in model.named_modules()
             if name.rpartition(".")[2] in targets and isinstance(module, (nn.Linear, QuantizedLinear))]
    if not found:
        raise ValueError(f"No linear layer of the model is called any of {targets}.")
    return found


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Iterable[str] = ALL_PROJECTIONS,
             dora: bool = False, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Freeze ``model`` and wrap each linear layer named in ``targets`` in a LoRA (or DoRA) layer, in place.

    ``targets`` are last name parts: ``query``, ``key``, ``value``, ``out`` (attention) and ``gate``,
    ``up``, ``down`` (the SwiGLU MLP). The output head is never a target: it is the token embedding.
    """
    freeze(model)
    generator = torch.Generator().manual_seed(seed)
    layer = DoRALinear if dora else LoRALinear
    for name, module in _targets(model, targets):
        replace_module(model, name, layer(module, rank, alpha, dropout, generator))
    return model


def adapters(model: nn.Module) -> list[LoRALinear]:
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def merge_adapters(model: nn.Module) -> nn.Module:
    for module in adapters(model):
        module.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for module in adapters(model):
        module.unmerge()
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with every adapter folded in: ``nn.Linear`` layers only, nothing extra to run."""
    model = copy.deepcopy(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        module.merge()
        replace_module(model, name, module.base)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trained tensors: what you save and share for one fine-tune (the base is shared by all)."""
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name in names}


def add_bitfit(model: nn.Module, targets: Iterable[str] = ALL_PROJECTIONS) -> nn.Module:
    """Freeze ``model`` and train only biases of the ``targets`` layers, added as zeros (BitFit; chapter 10)."""
    freeze(model)
    for _, module in _targets(model, targets):
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, device=_base_weight(module).device))
        module.bias.requires_grad_(True)
    return model


# ---------------------------------------------------------------- what it costs


@dataclass
class ParameterCount:
    trainable: int
    total: int  # every weight the model computes with, a quantized base's weights counted as weights

    @property
    def fraction(self) -> float:
        return self.trainable / self.total


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters (shared tensors once), as ``peft``'s ``print_trainable_parameters`` counts."""
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    total = sum(p.numel() for p in unique)
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return ParameterCount(trainable, total)


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of everything in the state dict that does not train: the base model's memory (shared tensors once)."""
    trainable = {name for name, parameter in model.named_parameters(remove_duplicate=False) if parameter.requires_grad}
    return unique_bytes(tensor for name, tensor in model.state_dict().items() if name not in trainable)


def lora_parameter_fraction(shapes: Iterable[tuple[int, int]], rank: int, total: int) -> float:
    """The share of ``total`` parameters that rank-``rank`` adapters on layers of these ``(out, in)`` shapes train."""
    return sum(rank * (out_features + in_features) for out_features, in_features in shapes) / total


# ---------------------------------------------------------------- fine-tuning


@dataclass
class FineTuneResult:
    """What one fine-tuning run measured."""

    method: str
    trainable: int
    total: int
    new_domain_before: float
    new_domain_after: float
    old_domain_before: float
    old_domain_after: float
    optimizer_state_bytes: int
    seconds: float
    base_bytes: int = 0
    history: object = field(default=None, repr=False)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total


def finetune(model: nn.Module, method: str, train_data: torch.Tensor, val_data: torch.Tensor,
             old_val_data: torch.Tensor, config, device: torch.device | str = "cpu",
             progress: bool = True, eval_batches: int | None = None) -> FineTuneResult:
    """Train whatever in ``model`` is trainable on the new domain with chapter 05's loop; measure both domains.

    ``config`` is a :class:`utils.train.TrainConfig`. Evaluations use ``config.eval_batches`` fixed
    batches (or ``eval_batches``) of each domain's validation text, the same before and after.
    """
    from .train import evaluate, train

    batches = eval_batches or config.eval_batches
    model.to(device)
    counts = count_parameters(model)
    before_new = evaluate(model, val_data, config.batch_size, batches)
    before_old = evaluate(model, old_val_data, config.batch_size, batches)
    start = time.perf_counter()
    history = train(model, train_data, val_data, config, device=device, progress=progress)
    seconds = time.perf_counter() - start
    return FineTuneResult(
        method=method, trainable=counts.trainable, total=counts.total,
        new_domain_before=before_new, new_domain_after=evaluate(model, val_data, config.batch_size, batches),
        old_domain_before=before_old, old_domain_after=evaluate(model, old_val_data, config.batch_size, batches),
        optimizer_state_bytes=history.optimizer_state_bytes, seconds=seconds, base_bytes=frozen_bytes(model),
        history=history)


def domain_tensors(tokenizer, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 10's new domain, Python's documentation, as the course tokenizer's ids: ``(train, val)``."""
    from .data import fit_to_vocabulary, load_python_docs, train_val_split
    from .train import token_tensor

    text = fit_to_vocabulary(load_python_docs(), tokenizer.vocab)
    train_text, val_text = train_val_split(text, val_fraction)
    return token_tensor(tokenizer, train_text), token_tensor(tokenizer, val_text)


# ---------------------------------------------------------------- the chapter's comparison

METHODS = ("full", "lora", "dora", "qlora", "bitfit")
# Rates tuned on the course model and the Python-documentation domain (chapter 10): adapters start
# from zero and are small, so they take a larger step than the full weights can.
LEARNING_RATES = {"full": 3e-3, "lora": 1e-2, "dora": 1e-2, "qlora": 1e-2, "bitfit": 1e-2}


def prepare(base: nn.Module, method: str, rank: int = 8, alpha: float = 16.0,
            targets: Iterable[str] = ALL_PROJECTIONS, seed: int = 0) -> nn.Module:
    """A copy of ``base`` set up to fine-tune with ``method``: full, lora, dora, qlora (NF4 base) or bitfit.

    ``alpha`` stays 16 at every rank, as in the LoRA paper: the ``alpha / r`` scale then keeps the
    update's size comparable across ranks, so one learning rate serves them all.
    """
    from .quant import quantize_model

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    model = copy.deepcopy(base)
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if method == "bitfit":
        return add_bitfit(model, targets)
    if method == "qlora":
        model = quantize_model(model, "nf4", group_size=64, inplace=True)
    return add_lora(model, rank, alpha, targets, dora=method == "dora", seed=seed)


def finetune_config(method: str, steps: int, batch_size: int = 16, eval_batches: int = 10):
    """Chapter 05's loop, set for a short fine-tune: a short warm-up, cosine to a tenth, no weight decay."""
    from .train import TrainConfig

    rate = LEARNING_RATES[method]
    return TrainConfig(batch_size=batch_size, max_steps=steps, max_lr=rate, min_lr=rate / 10,
                       warmup_steps=max(1, steps // 10), weight_decay=0.0, eval_interval=max(1, steps // 5),
                       eval_batches=eval_batches)


def peft_copy(model: nn.Module, base: nn.Module) -> nn.Module:
    """The ``peft`` library's LoRA (or DoRA) on a copy of ``base``, holding ``model``'s adapter weights.

    ``model`` is ``base`` after :func:`add_lora`. Both should then compute the same outputs: the
    course's layers follow ``peft``'s conventions (chapter 10 and tests/test_ch10.py check it).
    """
    from peft import LoraConfig, inject_adapter_in_model

    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    if not layers:
        raise ValueError("The model has no LoRA layers; call lora.add_lora(model, ...) first.")
    first = next(iter(layers.values()))
    config = LoraConfig(r=first.rank, lora_alpha=first.alpha, lora_dropout=0.0,
                        target_modules=sorted({name.rpartition(".")[2] for name in layers}),
                        use_dora=isinstance(first, DoRALinear))
    theirs = inject_adapter_in_model(config, copy.deepcopy(base))
    with torch.no_grad():
        for name, layer in layers.items():
            target = theirs.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            if isinstance(layer, DoRALinear):
                target.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return theirs.eval()
