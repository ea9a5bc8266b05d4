"""Quantization of the course GPT (chapter 09): integers for weights and activations.

Chapter 09 builds this module piece by piece; chapter 10 (QLoRA) imports it. Everything works on
``nn.Linear`` weights, shape ``(out_features, in_features)``, and follows these conventions:

* **Rounding** is ``torch.round``: to the nearest integer, halves to the even neighbour (2.5 → 2,
  3.5 → 4), as IEEE arithmetic, NumPy and the integer kernels do. ``floor`` or ``trunc`` would bias
  every weight the same way; rounding halves up would bias the ties.
* **Symmetric (absmax)** ``b``-bit codes use ``-qmax..qmax`` with ``qmax = 2^(b-1) - 1``: int8 is
  -127..127 and int4 is -7..7. The most negative code (-128, -8) is left unused so that ``-w``
  quantizes to ``-q`` and zero is exact. ``scale = absmax / qmax``, ``q = round(w / scale)``.
* **Asymmetric (zero-point)** ``b``-bit codes use ``0..2^b - 1`` (``uint8``). The range
  ``[min, max]`` is first stretched to include 0, so that 0 is exactly representable and the zero
  point ``round(-min / scale)`` always lies in ``0..2^b - 1``: nothing clips.
  ``q = clamp(round(x / scale) + zero_point, 0, 2^b - 1)``.
* **Granularity**: per tensor (one scale), per channel (one scale per *output* row: the maximum
  runs over the input dimension, ``dim=-1``), or group-wise (one scale per ``group_size``
  consecutive inputs of a row, so groups run along the input dimension, as in GPTQ, AWQ and
  bitsandbytes). A row or group of zeros gets scale 1 instead of 0.
* **Packing**: two 4-bit codes per byte, element ``2i`` in the low nibble and ``2i + 1`` in the high
  nibble, as two's-complement nibbles (``q & 0xF``); 2-bit codes four per byte, the same way.
* **Storage**: :class:`QuantizedLinear` keeps packed codes and ``float16`` scales as buffers, so
  :func:`storage_bytes` (every tensor of the state dict, shared ones once) is the real size.
  :func:`quantize_model` quantizes every ``nn.Linear`` except the output head, which is tied to the
  token embedding: that matrix (77 × 128, about 1 % of the course model) stays ``float32``, as do
  the norms' gains.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SCALE_DTYPE = torch.float16  # how QuantizedLinear stores its scales (GPTQ and AWQ do the same)
SCHEMES = ("int8", "int4", "int2", "nf4", "ternary")


# ---------------------------------------------------------------- absmax (symmetric)


def qmax_symmetric(bits: int) -> int:
    """The largest code of a symmetric ``bits``-bit integer: 127 for 8 bits, 7 for 4 (chapter 09)."""
    return 2 ** (bits - 1) - 1


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Scale 1 where a row or group is all zeros (every code is 0 then, whatever the scale)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def absmax_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization: ``scale = max|x| / qmax``, ``q = round(x / scale)`` in ``-qmax..qmax`` (chapter 09, exercise 1).

    ``dim`` is the axis the maximum runs over: ``-1`` on a Linear weight ``(out, in)`` gives one
    scale per output channel, shape ``(out, 1)``; ``None`` gives one scale for the whole tensor
    (a 0-dimensional tensor). Returns ``(q as int8, scale in x's dtype)``.
    """
    qmax = qmax_symmetric(bits)
    absmax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = _safe(absmax / qmax)
    q = torch.round(x / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q · scale``: back to floats, on the grid of representable values (chapter 09)."""
    return q.to(scale.dtype) * scale


# ---------------------------------------------------------------- zero-point (asymmetric)


def zero_point_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization onto ``0..2^bits - 1`` with a zero point (chapter 09, exercise 2).

    The range is stretched to include 0 (``lo = min(x.min(), 0)``, ``hi = max(x.max(), 0)``), then
    ``scale = (hi - lo) / (2^bits - 1)`` and ``zero_point = round(-lo / scale)``, which lies in
    ``0..2^bits - 1`` by construction, and ``q = clamp(round(x / scale) + zero_point, 0, 2^bits - 1)``.
    ``dim=None`` gives one scale and zero point for the whole tensor (0-dimensional); an axis
    gives one per slice, reduced over that axis with ``keepdim``. Returns ``(q as uint8, scale in
    x's dtype, zero_point as int64)``.
    """
    levels = 2**bits - 1
    if dim is None:
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    else:
        lo, hi = x.amin(dim=dim, keepdim=True).clamp(max=0), x.amax(dim=dim, keepdim=True).clamp(min=0)
    scale = _safe((hi - lo) / levels)
    zero_point = torch.round(-lo / scale).clamp(0, levels).to(torch.int64)
    q = (torch.round(x / scale) + zero_point).clamp(0, levels).to(torch.uint8)
    return q, scale, zero_point


def zero_point_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - zero_point) · scale`` (chapter 09)."""
    return (q.to(torch.int64) - zero_point).to(scale.dtype) * scale


# ---------------------------------------------------------------- groups along the input dimension


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(out, in)`` → ``(out, in / group_size, group_size)``; ``None`` is one group per row (per channel)."""
    out_features, in_features = weight.shape
    group_size = in_features if group_size is None else group_size
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}.")
    return weight.reshape(out_features, in_features // group_size, group_size)


def groupwise_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization with one scale per ``group_size`` consecutive inputs of each row (chapter 09, exercise 3).

    ``weight`` is ``(out, in)`` with ``in`` a multiple of ``group_size``. Returns ``(q, scale)``:
    ``q`` int8 of shape ``(out, in)`` in ``-qmax..qmax``, ``scale`` of shape ``(out, in / group_size)``.
    A smaller group follows the local range of the weights more closely, at the cost of more scales.
    """
    q, scale = absmax_quantize(_grouped(weight, group_size), bits, dim=-1)
    return q.reshape(weight.shape), scale.squeeze(-1)


def groupwise_dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = 64) -> torch.Tensor:
    """Inverse of :func:`groupwise_quantize` (``group_size=None``: per channel) (chapter 09)."""
    groups = _grouped(q, group_size if group_size is not None else q.shape[-1])
    return (groups.to(scale.dtype) * scale.reshape(*groups.shape[:2], 1)).reshape(q.shape)


def relative_error(original: torch.Tensor, approximation: torch.Tensor) -> float:
    """``‖original - approximation‖ / ‖original‖``, the error measure of chapter 09's plots."""
    return float((original - approximation).norm() / original.norm())


# ---------------------------------------------------------------- packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte: element ``2i`` in the low nibble, ``2i + 1`` in the high one (chapter 09, exercise 4).

    ``q`` holds integers in ``-8..7`` (any integer dtype) with an even last dimension; the result is
    ``uint8`` with half the last dimension. Negative codes are stored as two's-complement nibbles
    (``q & 0xF``: -1 → 0b1111).
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}.")
    nibbles = q.to(torch.int16) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 (..., n)`` → ``int8 (..., 2n)`` in ``-8..7`` (chapter 09, exercise 4)."""
    as_int = packed.to(torch.int16)
    nibbles = torch.stack([as_int & 0xF, as_int >> 4], dim=-1).flatten(-2)
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)  # sign-extend the nibble


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """Four signed 2-bit codes (``-2..1``) per byte, element ``4i + j`` in bits ``2j..2j+1`` (chapter 09)."""
    if q.shape[-1] % 4:
        raise ValueError(f"pack_int2 needs a last dimension divisible by 4, got {tuple(q.shape)}.")
    crumbs = q.to(torch.int16) & 0x3
    return (crumbs[..., 0::4] | crumbs[..., 1::4] << 2 | crumbs[..., 2::4] << 4 | crumbs[..., 3::4] << 6).to(torch.uint8)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int2`: ``uint8 (..., n)`` → ``int8 (..., 4n)`` in ``-2..1`` (chapter 09)."""
    as_int = packed.to(torch.int16)
    crumbs = torch.stack([(as_int >> shift) & 0x3 for shift in (0, 2, 4, 6)], dim=-1).flatten(-2)
    return torch.where(crumbs > 1, crumbs - 4, crumbs).to(torch.int8)


# ---------------------------------------------------------------- NF4


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels of QLoRA (Dettmers et al., 2023), in ``[-1, 1]``, increasing (chapter 09).

    If weights are normal, a block scaled by its absmax is too, so the best levels for it are
    *quantiles* of the normal distribution: equally many weights fall between each pair of
    neighbours. The ends are trimmed (the quantile of 1 is infinite): 8 positive levels are the
    normal quantiles of ``linspace(offset, 0.5, 9)[:-1]`` and 7 negative ones those of
    ``linspace(offset, 0.5, 8)[:-1]``, with ``offset = (1 - 1/30 + 1 - 1/32) / 2 = 0.9677``; both
    halves are scaled to reach ±1, and 0 is added so that it is exact. The result equals
    bitsandbytes' NF4 table to float32 precision.
    """
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)])
    levels = levels / levels.abs().max()
    return levels.sort().values.to(torch.float32)


NF4_LEVELS = nf4_levels()


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level closest to each element of ``x`` (``int64``, the shape of ``x``); ties go to the lower level.

    ``levels`` must be sorted. The nearest level is found by a binary search among the midpoints
    between neighbouring levels, the same answer as ``(x[..., None] - levels).abs().argmin(-1)``
    without the 16-times-larger tensor of distances.
    """
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, midpoints)


def nf4_quantize(weight: torch.Tensor, group_size: int = 64, levels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4: scale each group by its absmax to ``[-1, 1]``, store the index of the nearest NF4 level (chapter 09, exercise 5).

    Returns ``(codes, absmax)``: ``codes`` uint8 of shape ``(out, in)`` with values ``0..15`` (indices
    into ``levels``, :data:`NF4_LEVELS` by default) and ``absmax`` of shape ``(out, in / group_size)``.
    """
    levels = NF4_LEVELS if levels is None else levels
    groups = _grouped(weight, group_size)
    absmax = _safe(groups.abs().amax(dim=-1, keepdim=True))
    codes = nearest_level(groups / absmax, levels.to(weight.device, weight.dtype)).to(torch.uint8)
    return codes.reshape(weight.shape), absmax.squeeze(-1)


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, group_size: int = 64,
                   levels: torch.Tensor | None = None) -> torch.Tensor:
    """``levels[codes] · absmax`` of each group (chapter 09)."""
    levels = (NF4_LEVELS if levels is None else levels).to(absmax.device, absmax.dtype)
    groups = _grouped(levels[codes.long()], group_size)
    return (groups * absmax.reshape(*groups.shape[:2], 1)).reshape(codes.shape)


# ---------------------------------------------------------------- ternary (BitNet b1.58)


def ternary_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's absmean quantization: ``scale = mean|w|``, ``q = clamp(round(w / scale), -1, 1)`` (chapter 09).

    Three levels, ``log2(3) = 1.58`` bits of information per weight. The scale is the mean
    magnitude, not the maximum: with an absmax scale almost every weight would round to 0.
    Returns ``(q as int8 in {-1, 0, 1}, scale as a 0-dimensional tensor)``.
    """
    scale = _safe(weight.abs().mean())
    return torch.round(weight / scale).clamp(-1, 1).to(torch.int8), scale


# ---------------------------------------------------------------- quantization-aware training


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (quantized - x).detach()


def fake_quantize(x: torch.Tensor, bits: int = 4, group_size: int | None = None) -> torch.Tensor:
    """Quantize and dequantize in one go, with a straight-through gradient (chapter 09, exercise 6).

    Absmax, one scale per row (``group_size=None``) or per group of the last dimension. The forward
    value lies on the quantization grid; ``round`` has zero gradient almost everywhere, so the
    backward pass pretends the whole operation was the identity: ``x + (x_q - x).detach()``.
    """
    if group_size is None:
        q, scale = absmax_quantize(x.detach(), bits, dim=-1)
        quantized = absmax_dequantize(q, scale)
    else:
        quantized = groupwise_dequantize(*groupwise_quantize(x.detach(), bits, group_size), group_size)
    return _straight_through(x, quantized)


def fake_ternary(weight: torch.Tensor) -> torch.Tensor:
    """Ternary weights (absmean, per tensor) in the forward pass, straight-through gradient (chapter 09)."""
    q, scale = ternary_quantize(weight.detach())
    return _straight_through(weight, q.to(weight.dtype) * scale)


def fake_nf4(weight: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """NF4 in the forward pass, straight-through gradient (chapter 09)."""
    return _straight_through(weight, nf4_dequantize(*nf4_quantize(weight.detach(), group_size), group_size))


def fake_quantize_weight(weight: torch.Tensor, scheme: str, group_size: int | None = None) -> torch.Tensor:
    """The weight that :class:`QuantizedLinear` with this ``scheme`` would hold, with a straight-through gradient."""
    if scheme == "ternary":
        return fake_ternary(weight)
    if scheme == "nf4":
        return fake_nf4(weight, group_size or 64)
    return fake_quantize(weight, _bits(scheme), group_size)


class FakeQuantLinear(nn.Linear):
    """A Linear that trains in float but computes with its quantized weight (chapter 09).

    The float weight is the one the optimiser updates (the "latent" weight); every forward pass
    uses its quantized version, so the loss sees exactly what the quantized model will compute.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scheme: str = "int4",
                 group_size: int | None = None):
        super().__init__(in_features, out_features, bias=bias)
        _check_scheme(scheme)
        self.scheme, self.group_size = scheme, group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "int4", group_size: int | None = None) -> FakeQuantLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size)
        module.to(linear.weight.device)
        module.load_state_dict(linear.state_dict())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize_weight(self.weight, self.scheme, self.group_size), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}, group_size={self.group_size}"


def prepare_qat(model: nn.Module, scheme: str = "int4", group_size: int | None = None,
                skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """A copy of ``model`` with every Linear (except ``skip``) replaced by a :class:`FakeQuantLinear` (chapter 09)."""
    model = copy.deepcopy(model)
    for name, linear in _linears(model, skip):
        replace_module(model, name, FakeQuantLinear.from_linear(linear, scheme, group_size))
    return model


# ---------------------------------------------------------------- the quantized Linear


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}.")


def _bits(scheme: str) -> int:
    return {"int8": 8, "int4": 4, "int2": 2, "nf4": 4, "ternary": 2}[scheme]


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored as packed integer codes plus scales (chapter 09; chapter 10 builds QLoRA on it).

    Schemes: ``int8`` and ``int4`` (absmax, one scale per output channel when ``group_size`` is None,
    else per group along the input dimension), ``int2`` (absmax with codes -1..1), ``nf4`` (QLoRA's
    NormalFloat levels, per group) and ``ternary`` (BitNet b1.58: absmean, one scale per tensor).
    The codes and scales are buffers, not parameters: they move with ``.to()`` and are saved in the
    state dict, but no optimiser touches them. ``forward`` dequantizes the weight and calls
    ``F.linear``: the arithmetic is float, the memory is integer (weight-only quantization).

    Optionally the *input activations* are quantized too (``activation``): ``"static"`` uses a
    per-tensor uint8 scale and zero point fixed by :func:`calibrate_activations`; ``"dynamic"``
    computes a per-token int8 absmax scale on the fly; ``"decomposed"`` does the same but keeps the
    input channels with any value above ``outlier_threshold`` in float (LLM.int8()'s decomposition).
    Activation quantization is simulated: values are rounded to the int8 grid, the product is float.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str = "int8", group_size: int | None = None,
                 bias: bool = False):
        super().__init__()
        _check_scheme(scheme)
        if scheme == "ternary":
            group_size = None
        elif scheme == "nf4" and group_size is None:
            group_size = 64
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size, self.bits = scheme, group_size, _bits(scheme)
        groups = 1 if group_size is None else in_features // group_size
        packed_width = {8: in_features, 4: in_features // 2, 2: in_features // 4}[self.bits]
        code_dtype = torch.int8 if self.bits == 8 else torch.uint8
        self.register_buffer("codes", torch.zeros(out_features, packed_width, dtype=code_dtype))
        scale_shape = () if scheme == "ternary" else (out_features, groups)
        self.register_buffer("scale", torch.ones(scale_shape, dtype=SCALE_DTYPE))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.activation: str | None = None
        self.outlier_threshold = 6.0
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "int8", group_size: int | None = None) -> QuantizedLinear:
        """Quantize a trained ``nn.Linear`` (round to nearest: post-training quantization)."""
        module = cls(linear.in_features, linear.out_features, scheme, group_size, bias=linear.bias is not None)
        weight = linear.weight.detach().float()
        if scheme == "ternary":
            q, scale = ternary_quantize(weight)
        elif scheme == "nf4":
            q, scale = nf4_quantize(weight, module.group_size)
        else:
            q, scale = groupwise_quantize(weight, module.bits, module.group_size or weight.shape[1])
        packer = {8: lambda codes: codes, 4: pack_int4, 2: pack_int2}[module.bits]
        module.codes.copy_(packer(q.to(torch.int8)))
        module.scale.copy_(scale.to(SCALE_DTYPE).reshape(module.scale.shape))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module.to(linear.weight.device)

    def integer_codes(self) -> torch.Tensor:
        """The unpacked codes, ``(out, in)``: integers for int schemes and ternary, level indices for NF4."""
        unpacker = {8: lambda codes: codes, 4: unpack_int4, 2: unpack_int2}[self.bits]
        codes = unpacker(self.codes)
        return (codes.to(torch.int16) & 0xF).to(torch.uint8) if self.scheme == "nf4" else codes  # indices 0..15

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``(out, in)`` this module computes with."""
        codes, scale = self.integer_codes(), self.scale.float()
        if self.scheme == "ternary":
            return codes.float() * scale
        if self.scheme == "nf4":
            return nf4_dequantize(codes, scale, self.group_size)
        return groupwise_dequantize(codes, scale, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activation(x, self.activation, self.input_scale, self.input_zero_point, self.outlier_threshold)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def storage_bytes(self) -> int:
        """Bytes of the codes and scales (and bias): what this layer costs in memory and on disk."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.bias) if t is not None)

    def extra_repr(self) -> str:
        groups = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        if self.scheme == "ternary":
            groups = "per tensor"
        extra = f", activation={self.activation}" if self.activation else ""
        return f"{self.in_features} → {self.out_features}, {self.scheme}, {groups}{extra}"


# ---------------------------------------------------------------- activations


def quantize_activation(x: torch.Tensor, mode: str | None, scale: torch.Tensor | None = None,
                        zero_point: torch.Tensor | None = None, outlier_threshold: float = 6.0) -> torch.Tensor:
    """``x`` rounded to an 8-bit grid and back, the way an int8 matmul would see it (chapter 09).

    ``None``: unchanged. ``"static"``: per-tensor uint8 with the given calibrated ``scale`` and
    ``zero_point`` (values outside the calibrated range clip). ``"dynamic"``: per-token (per row)
    int8 absmax, computed from ``x`` itself. ``"decomposed"``: like dynamic, but the input channels
    where any value reaches ``outlier_threshold`` pass through unquantized (LLM.int8()).
    """
    if mode is None:
        return x
    if mode == "static":
        q = (torch.round(x / scale) + zero_point).clamp(0, 255)
        return (q - zero_point) * scale
    if mode == "dynamic":
        return absmax_dequantize(*absmax_quantize(x, 8, dim=-1))
    if mode == "decomposed":
        outliers = (x.abs() >= outlier_threshold).flatten(0, -2).any(dim=0)
        regular = x.masked_fill(outliers, 0.0)
        return torch.where(outliers, x, absmax_dequantize(*absmax_quantize(regular, 8, dim=-1)))
    raise ValueError(f"activation mode must be None, 'static', 'dynamic' or 'decomposed', got {mode!r}.")


@torch.no_grad()
def linear_inputs(model: nn.Module, ids: torch.Tensor, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The input of every Linear for a batch ``ids``, flattened to ``(tokens, in_features)`` (chapter 09)."""
    captured, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)) and name not in set(skip):
            handles.append(module.register_forward_pre_hook(
                lambda _module, args, name=name: captured.__setitem__(name, args[0].detach().flatten(0, -2).float())))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def outlier_channels(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Indices of the input channels (columns of ``x``, shape ``(tokens, features)``) with any ``|value| >= threshold``."""
    return (x.abs() >= threshold).any(dim=0).nonzero().flatten()


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, x_granularity: str = "token") -> torch.Tensor:
    """``x @ weight.T`` through int8: x per token (or per tensor), weight per output channel (chapter 09).

    The integer product is accumulated exactly (float32 holds every sum of 127·127 products below
    2^24, true up to 1040 inputs), then rescaled by the two scales: an outer product of a column of
    token scales and a row of channel scales, which is why the scales must run along these axes.
    """
    qx, sx = absmax_quantize(x, 8, dim=None if x_granularity == "tensor" else -1)
    qw, sw = absmax_quantize(weight, 8, dim=-1)
    return (qx.float() @ qw.float().T) * sx * sw.T


def int8_matmul_decomposed(x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8(): outlier input channels in float, every other one through :func:`int8_matmul` (chapter 09).

    Returns ``(x @ weight.T approximated, the outlier channel indices)``. The outlier part is a thin
    float matmul (a handful of columns of x, the same columns of the weight); the rest is int8.
    """
    outliers = outlier_channels(x, threshold)
    regular = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    regular[outliers] = False
    result = int8_matmul(x[:, regular], weight[:, regular])
    if len(outliers):
        result = result + x[:, outliers] @ weight[:, outliers].T
    return result, outliers


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Static activation quantization: observe each QuantizedLinear's input range on ``batches``, fix its uint8 scale (chapter 09).

    Runs the model (in place) on every batch of ids with the activations unquantized, records the
    smallest and largest input of each QuantizedLinear, then sets its per-tensor scale and zero point
    (:func:`zero_point_quantize`'s rule) and switches it to ``activation="static"``.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    ranges: dict[int, list[float]] = {id(m): [0.0, 0.0] for m in layers}

    def observe(module, args):
        seen = ranges[id(module)]
        seen[0], seen[1] = min(seen[0], float(args[0].min())), max(seen[1], float(args[0].max()))

    for module in layers:
        module.activation = None
    handles = [m.register_forward_pre_hook(observe) for m in layers]
    try:
        for ids in batches:
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    for module in layers:
        _, scale, zero_point = zero_point_quantize(torch.tensor(ranges[id(module)]), 8)
        module.input_scale.copy_(scale)
        module.input_zero_point.copy_(zero_point)
        module.activation = "static"
    return model


def set_activation_mode(model: nn.Module, mode: str | None, outlier_threshold: float = 6.0) -> nn.Module:
    """Set how every QuantizedLinear of ``model`` treats its input (see :func:`quantize_activation`)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.activation, module.outlier_threshold = mode, outlier_threshold
    return model


# ---------------------------------------------------------------- whole models


def _linears(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    skip = set(skip)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in skip]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted, as named_modules gives it) was (chapters 09-10)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int | None = None, inplace: bool = False,
                   skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Post-training quantization: every ``nn.Linear`` except ``skip`` becomes a :class:`QuantizedLinear` (chapter 09).

    Returns a quantized copy (or ``model`` itself with ``inplace=True``). The course GPT's
    ``lm_head`` is skipped by default: it is the token embedding (weight tying), which stays float32.
    A :class:`FakeQuantLinear` trained with quantization-aware training converts to exactly the
    weights it trained with.
    """
    _check_scheme(scheme)
    model = model if inplace else copy.deepcopy(model)
    for name, linear in _linears(model, skip):
        if isinstance(linear, FakeQuantLinear) and (scheme, group_size) != (linear.scheme, linear.group_size):
            raise ValueError(f"{name} trained for {linear.scheme} (group_size={linear.group_size}), "
                             f"not {scheme} (group_size={group_size}).")
        replace_module(model, name, QuantizedLinear.from_linear(linear, scheme, group_size))
    return model


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, counting a tensor that two names share (tied weights) once."""
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict, a tensor shared by two names (tied weights) once (chapter 09)."""
    return unique_bytes(model.state_dict().values())


def bits_per_weight(bits: int, group_size: int | None, in_features: int, scale_bits: int = 16) -> float:
    """Bits per weight of a code width ``bits`` plus a ``scale_bits`` scale shared by each group (chapter 09)."""
    return bits + scale_bits / (group_size or in_features)


def model_size_ratio(quantized: nn.Module, original: nn.Module) -> float:
    """``storage_bytes(quantized) / storage_bytes(original)``."""
    return storage_bytes(quantized) / storage_bytes(original)

