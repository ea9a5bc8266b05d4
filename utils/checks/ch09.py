"""Checks for chapter 09, quantization.

Each ``check_*`` compares the learner's function with the reference in :mod:`utils.quant` on seeded
random inputs; ``seed`` and ``cases`` let the hidden tests use inputs the visible ones never showed.
The references are bound here, when the module is imported, before any learner code runs.

Integer codes are compared exactly, with one allowance: an element whose exact ratio ``x / scale``
lies within 1e-4 of a rounding boundary (but not on it) may round either way, because a correct
answer that computes ``x * qmax / absmax`` instead of ``x / scale`` can land on the other side. Some
test inputs put many values exactly halfway between two codes, where ``torch.round`` (halves to
even) and the other rounding modes disagree, so a wrong rounding mode is always caught and named.
The mistakes named in one sentence: a wrong rounding mode (floor, trunc, ceil, halves up, halves
away from zero), a scale over the wrong axis, per tensor or without ``keepdim``, ``2^(b-1)`` as
``qmax``, a range not stretched to include 0, a zero point with the wrong sign, unrounded or out
of range (so that values clip), groups along the wrong dimension, nibbles swapped or offset,
a missing sign extension, the level above instead of the nearest, and a gradient that is not
passed straight through.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from ..quant import NF4_LEVELS as _NF4_LEVELS
from ..quant import absmax_quantize as _absmax_quantize
from ..quant import fake_quantize as _fake_quantize
from ..quant import groupwise_quantize as _groupwise_quantize
from ..quant import nf4_quantize as _nf4_quantize
from ..quant import pack_int4 as _pack_int4
from ..quant import unpack_int4 as _unpack_int4
from ..quant import zero_point_quantize as _zero_point_quantize
from .core import Case, CheckFailed, call_learner, describe, difference
from .core import function_name as _name

_ROUND_HINT = ("use torch.round, which rounds to the nearest integer with halves going to the even neighbour "
               "(this test input has values exactly halfway between two codes)")
_ROUNDING_MISTAKES = (
    ("rounds down (floor)", torch.floor),
    ("rounds towards zero (trunc, or int())", torch.trunc),
    ("rounds up (ceil)", torch.ceil),
    ("rounds halves up (floor(x + 0.5))", lambda r: torch.floor(r + 0.5)),
    ("rounds halves away from zero", lambda r: torch.sign(r) * torch.floor(r.abs() + 0.5)),
)


def _run(fn: Callable, args: tuple, name: str, label: str, reference: Callable):
    """The learner's result on a private copy of ``args``; exceptions and shortcuts become one sentence."""
    return call_learner(fn, copy.deepcopy(args), name, label, reference=reference)


def _parts(got, count: int, name: str, label: str, what: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != count:
        raise CheckFailed(f"`{name}` returned {describe(got)} {label}; return the tuple {what}.")
    return tuple(got)


def _ambiguous(ratio: torch.Tensor) -> torch.Tensor:
    """Elements within 1e-4 of a rounding boundary but not exactly on it: a correct answer may round them either way."""
    distance = (ratio - torch.floor(ratio) - 0.5).abs()
    return (distance < 1e-4) & (distance > 0)


def _same_codes(got: torch.Tensor, expected: torch.Tensor, ratio: torch.Tensor) -> bool:
    differ = got.to(torch.int64) != expected.to(torch.int64)
    allowed = _ambiguous(ratio) & ((got.to(torch.int64) - expected.to(torch.int64)).abs() <= 1)
    return not bool((differ & ~allowed).any())


def _mostly_equal(got: torch.Tensor, candidate: torch.Tensor) -> bool:
    """``got`` is ``candidate`` but for a few elements at float-rounding boundaries."""
    if got.shape != candidate.shape:
        return False
    return float((got.to(torch.float64) != candidate.to(torch.float64)).double().mean()) < 0.01


def _check_codes(name: str, got, expected: torch.Tensor, ratio: torch.Tensor, label: str, low: int, high: int,
                 what: str = "codes q", offset: torch.Tensor | int = 0, more: Callable | None = None) -> None:
    """Compare integer codes; name a rounding mode or a clipped range when that is what differs."""
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise CheckFailed(f"`{name}` returned {what} with {difference(got, expected)} {label}.")
    if got.dtype != expected.dtype:
        kind = "floats" if got.is_floating_point() else str(got.dtype).replace("torch.", "")
        raise CheckFailed(f"`{name}` returned {what} as {kind} {label}; store them as "
                          f"{str(expected.dtype).replace('torch.', '')} (.to({expected.dtype})) after rounding.")
    if _same_codes(got, expected, ratio):
        return
    ratio32 = ratio.to(torch.float32)
    for phrase, rounding in _ROUNDING_MISTAKES:
        candidate = (rounding(ratio32) + offset).clamp(low, high)
        if _mostly_equal(got, candidate):
            raise CheckFailed(f"`{name}` {phrase} {label}; {_ROUND_HINT}.")
    if more is not None:
        more(got)
    got_long = got.to(torch.int64)
    if bool(((got_long < low) | (got_long > high)).any()):
        raise CheckFailed(f"`{name}` returned {what} outside {low}..{high} {label}; the codes must stay in that range.")
    raise CheckFailed(f"`{name}` returned {what} with {difference(got, expected)} {label}.")


def _values_match(got, candidate: torch.Tensor) -> bool:
    """Same values as ``candidate`` in any layout (used to recognise a scale reduced over another axis)."""
    if not isinstance(got, torch.Tensor) or not got.is_floating_point() or got.numel() != candidate.numel():
        return False
    a = got.detach().double().flatten().sort().values
    b = candidate.detach().double().flatten().sort().values
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-12))


# ---------------------------------------------------------------- test inputs


def _weight(case: Case, out_features: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """A weight whose rows and columns have very different ranges, so that every axis gives other scales."""
    rows = torch.exp(case.randn(out_features, 1, dtype=dtype))
    columns = torch.exp(0.5 * case.randn(1, in_features, dtype=dtype))
    return case.randn(out_features, in_features, dtype=dtype) * rows * columns * 0.05


def _halfway_rows(case: Case, shape: tuple[int, ...], qmax: int) -> torch.Tensor:
    """Rows (the last axis) whose ratio w / scale is exact quarters (many halves among them), with one ±qmax per row.

    Each row is multiplied by its own power of two, so the scale of a row is exactly that power and
    ``w / scale`` is computed without rounding error: halves stay halves, where torch.round and
    "halves up" disagree, and quarters tell ceil from rounding halves up.
    """
    steps = case.randint(-4 * qmax + 1, 4 * qmax, shape).double() / 4  # -qmax+0.25 .. qmax-0.25 in quarters
    rows = steps.reshape(-1, shape[-1])
    peak = torch.randint(shape[-1], (rows.shape[0],), generator=case.gen)
    sign = torch.where(torch.rand(rows.shape[0], generator=case.gen) < 0.5, -1.0, 1.0).double()
    rows[torch.arange(rows.shape[0]), peak] = sign * qmax
    powers = 2.0 ** case.randint(-8, 2, (rows.shape[0], 1)).double()
    return (rows * powers).reshape(shape).to(torch.float32)


# ---------------------------------------------------------------- exercise 1: absmax per channel


def _absmax_inputs(case: Case) -> tuple[torch.Tensor, int]:
    bits = case.rng.choice([8, 4, 8, 4, 3])
    out_features, in_features = case.rng.randint(2, 24), case.rng.randint(2, 48)
    if out_features == in_features:
        in_features += 1
    regime = case.index % 3
    if regime == 1:
        return _halfway_rows(case, (out_features, in_features), 2 ** (bits - 1) - 1), bits
    weight = _weight(case, out_features, in_features, torch.float64 if regime == 2 else torch.float32)
    return weight, bits


def _check_absmax_scale(name: str, scale, expected: torch.Tensor, weight: torch.Tensor, bits: int, label: str) -> None:
    found = difference(scale, expected, atol=0, rtol=1e-5)
    if found is None:
        return
    qmax = 2 ** (bits - 1) - 1
    magnitude = weight.abs()
    if _values_match(scale, magnitude.amax(dim=0) / qmax) and not _values_match(scale, expected):
        raise CheckFailed(f"`{name}` computed the scale on the wrong axis {label}: it gave one scale per input column "
                          f"(the max over dim 0); per-channel quantization gives each output channel, a row of the "
                          f"weight, its own scale: the max over the input dimension, dim=-1.")
    if _values_match(scale, expected) and isinstance(scale, torch.Tensor):
        raise CheckFailed(f"`{name}` returned a scale of shape {tuple(scale.shape)} {label}, expected "
                          f"{tuple(expected.shape)}: keep the reduced dimension (keepdim=True), so that the "
                          f"scale broadcasts against the weight.")
    if _values_match(scale, (magnitude.amax() / qmax).reshape(1)):
        raise CheckFailed(f"`{name}` returned one scale for the whole tensor {label}; per-channel quantization "
                          f"gives every row (output channel) its own scale, shape (out_features, 1).")
    for wrong_qmax, why in ((qmax + 1, f"2^(bits-1) = {qmax + 1}"), (2**bits - 1, f"2^bits - 1 = {2**bits - 1}")):
        if _values_match(scale, expected * qmax / wrong_qmax):
            raise CheckFailed(f"`{name}` divided the absmax by {why} {label}; symmetric {bits}-bit codes run "
                              f"from -{qmax} to {qmax}, so scale = absmax / {qmax}.")
    raise CheckFailed(f"`{name}` returned a scale with {found} {label}.")


def check_absmax_quantize(absmax_quantize: Callable, cases: int = 6, seed: int = 1) -> None:
    """Exercise 1: ``absmax_quantize(weight, bits)`` → ``(q int8, scale (out, 1))``, one scale per output row."""
    name = _name(absmax_quantize, "absmax_quantize")
    for index in range(cases):
        weight, bits = _absmax_inputs(Case(index, seed * 10_007 + index))
        label = f"on test input #{index + 1} (weight {describe(weight)}, bits={bits})"
        got = _run(absmax_quantize, (weight, bits), name, label, _absmax_quantize)
        q, scale = _parts(got, 2, name, label, "(q, scale)")
        expected_q, expected_scale = _absmax_quantize(weight, bits)
        _check_absmax_scale(name, scale, expected_scale, weight, bits, label)
        qmax = 2 ** (bits - 1) - 1
        _check_codes(name, q, expected_q, weight.double() / expected_scale.double(), label, -qmax, qmax)
    print(f"✓ {name}: all {cases} test inputs match the reference, exact halves included.")


# ---------------------------------------------------------------- exercise 2: zero point


def _zero_point_inputs(case: Case) -> tuple[torch.Tensor, int, str]:
    shape = [case.rng.randint(1, 12) for _ in range(case.rng.randint(1, 3))]
    bits = case.rng.choice([8, 8, 4])
    regime = case.index % 3
    if regime == 0:
        x, kind = torch.nn.functional.silu(3 * case.randn(*shape)), "skewed, as after SiLU"
    elif regime == 1:
        x, kind = torch.rand(*shape, generator=case.gen) * 3 + 0.5, "all positive"
    else:
        x, kind = -(torch.rand(*shape, generator=case.gen) * 2 + 0.25), "all negative"
    return x, bits, kind


def _check_zero_point_scale(name: str, scale, expected: torch.Tensor, x: torch.Tensor, bits: int, label: str) -> None:
    found = difference(scale, expected, atol=0, rtol=1e-5)
    if found is None:
        return
    levels = 2**bits - 1
    lo, hi = float(x.min()), float(x.max())
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.is_floating_point():
        value = float(scale.detach().reshape(()))
        if math.isclose(value, (hi - lo) / levels, rel_tol=1e-5) and (lo > 0 or hi < 0):
            raise CheckFailed(f"`{name}` did not stretch the range to include 0 {label}: with lo = x.min() and "
                              f"hi = x.max() here 0 is outside [lo, hi], the zero point falls outside 0..{levels} "
                              f"and values clip; use lo = min(x.min(), 0) and hi = max(x.max(), 0).")
        if math.isclose(value, float(expected) * levels / (levels + 1), rel_tol=1e-5):
            raise CheckFailed(f"`{name}` divided the range by 2^bits = {levels + 1} {label}; {bits} bits give "
                              f"codes 0..{levels}, so {levels} steps: scale = (hi - lo) / {levels}.")
        if scale.shape != expected.shape and math.isclose(value, float(expected), rel_tol=1e-5):
            raise CheckFailed(f"`{name}` returned a scale of shape {tuple(scale.shape)} {label}; return one number "
                              f"for the whole tensor, a 0-dimensional tensor (as x.max() gives).")
    raise CheckFailed(f"`{name}` returned a scale with {found} {label}.")


def _check_zero_point_value(name: str, zero_point, expected: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                            bits: int, label: str) -> None:
    levels = 2**bits - 1
    if not isinstance(zero_point, torch.Tensor) or zero_point.numel() != 1:
        raise CheckFailed(f"`{name}` returned a zero point that is {describe(zero_point)} {label}; return a "
                          f"0-dimensional int64 tensor.")
    value = float(zero_point.detach().reshape(()))
    if zero_point.is_floating_point():
        if value != round(value):
            raise CheckFailed(f"`{name}` returned a zero point of {value:.4g} {label}, not a whole number: the zero "
                              f"point is the code of 0.0, so round it, zero_point = round(-lo / scale).")
        raise CheckFailed(f"`{name}` returned the zero point as {zero_point.dtype} {label}; make it an integer "
                          f"tensor, .to(torch.int64).")
    lo = min(float(x.min()), 0.0)
    if value < 0 or value > levels:
        raise CheckFailed(f"`{name}` returned a zero point of {value:.0f} {label}, outside the codes 0..{levels}, "
                          f"so values clip: stretch the range to include 0 and use zero_point = round(-lo / scale).")
    wrong_sign = min(max(round(lo / float(scale)), 0), levels)
    if value != float(expected) and value == wrong_sign:
        raise CheckFailed(f"`{name}` returned a zero point of {value:.0f} {label}, the code of -lo instead of lo: "
                          f"values near lo then clip at code 0; zero_point = round(-lo / scale), so that lo maps "
                          f"to code 0 and hi to {levels}.")
    found = difference(zero_point, expected)
    if found:
        raise CheckFailed(f"`{name}` returned a zero point with {found} {label}.")


def check_zero_point_quantize(zero_point_quantize: Callable, cases: int = 6, seed: int = 2) -> None:
    """Exercise 2: ``zero_point_quantize(x, bits)`` → ``(q uint8, scale, zero_point int64)``, one of each per tensor."""
    name = _name(zero_point_quantize, "zero_point_quantize")
    for index in range(cases):
        x, bits, kind = _zero_point_inputs(Case(index, seed * 10_007 + index))
        label = f"on test input #{index + 1} (x {describe(x)}, {kind}, bits={bits})"
        got = _run(zero_point_quantize, (x, bits), name, label, _zero_point_quantize)
        q, scale, zero_point = _parts(got, 3, name, label, "(q, scale, zero_point)")
        expected_q, expected_scale, expected_zero_point = _zero_point_quantize(x, bits)
        _check_zero_point_scale(name, scale, expected_scale, x, bits, label)
        _check_zero_point_value(name, zero_point, expected_zero_point, x, expected_scale, bits, label)
        levels = 2**bits - 1

        def clipped(q, expected_q=expected_q, levels=levels, label=label):
            ends = (q.to(torch.int64) == 0) | (q.to(torch.int64) == levels)
            if int(ends.sum()) > int(((expected_q == 0) | (expected_q == levels)).sum()) + 1:
                raise CheckFailed(f"`{name}` clipped values at code 0 or {levels} that fit in the range {label}: "
                                  f"q = clamp(round(x / scale) + zero_point, 0, {levels}), with the zero point "
                                  f"added after rounding.")

        _check_codes(name, q, expected_q, x.double() / expected_scale.double(), label, 0, levels,
                     offset=expected_zero_point, more=clipped)
    print(f"✓ {name}: all {cases} test inputs match the reference (skewed, all-positive and all-negative tensors).")


# ---------------------------------------------------------------- exercise 3: group-wise


def _groupwise_inputs(case: Case) -> tuple[torch.Tensor, int, int]:
    bits = case.rng.choice([4, 4, 8, 3])
    group_size = case.rng.choice([4, 8, 16, 32])
    out_features, groups = case.rng.randint(2, 12), case.rng.randint(2, 5)
    if case.index % 3 == 0:  # as many outputs as a few groups: grouping along the wrong dimension runs, and shows
        out_features = group_size * case.rng.randint(1, 2)
    shape = (out_features, groups * group_size)
    if case.index % 3 == 1:
        halfway = _halfway_rows(case, (out_features * groups, group_size), 2 ** (bits - 1) - 1)
        return halfway.reshape(shape), bits, group_size
    return _weight(case, *shape), bits, group_size


def check_groupwise_quantize(groupwise_quantize: Callable, cases: int = 6, seed: int = 3) -> None:
    """Exercise 3: ``groupwise_quantize(weight, bits, group_size)`` → ``(q (out, in) int8, scale (out, in/group_size))``."""
    name = _name(groupwise_quantize, "groupwise_quantize")
    for index in range(cases):
        weight, bits, group_size = _groupwise_inputs(Case(index, seed * 10_007 + index))
        out_features, in_features = weight.shape
        label = f"on test input #{index + 1} (weight {describe(weight)}, bits={bits}, group_size={group_size})"
        got = _run(groupwise_quantize, (weight, bits, group_size), name, label, _groupwise_quantize)
        q, scale = _parts(got, 2, name, label, "(q, scale)")
        expected_q, expected_scale = _groupwise_quantize(weight, bits, group_size)
        qmax = 2 ** (bits - 1) - 1
        if difference(scale, expected_scale, atol=0, rtol=1e-5):
            magnitude = weight.abs()
            if _values_match(scale, magnitude.amax(dim=-1) / qmax):
                raise CheckFailed(f"`{name}` gave each row one scale {label}; group-wise means one scale per "
                                  f"group of {group_size} consecutive inputs: {in_features // group_size} per row.")
            if _values_match(scale, magnitude.reshape(out_features, group_size, -1).amax(dim=1) / qmax):
                raise CheckFailed(f"`{name}` built groups of strided inputs {label}; a group is {group_size} "
                                  f"consecutive inputs of a row: weight.reshape(out, in // group_size, group_size).")
            if out_features % group_size == 0 and _values_match(
                    scale, magnitude.T.reshape(in_features, -1, group_size).amax(dim=-1) / qmax):
                raise CheckFailed(f"`{name}` grouped along the output dimension {label}; groups run along the "
                                  f"input dimension, inside each row (the axis that the matmul sums over).")
            if _values_match(scale, expected_scale):
                raise CheckFailed(f"`{name}` returned a scale of shape {tuple(scale.shape)} {label}, expected "
                                  f"{tuple(expected_scale.shape)}: one row per output channel, one column per group.")
            _check_absmax_scale(name, scale, expected_scale, weight, bits, label)
        if isinstance(q, torch.Tensor) and q.shape != expected_q.shape and q.numel() == expected_q.numel():
            raise CheckFailed(f"`{name}` returned q of shape {tuple(q.shape)} {label}; reshape it back to the "
                              f"weight's shape {tuple(expected_q.shape)}.")
        ratio = weight.double() / expected_scale.double().repeat_interleave(group_size, dim=1)
        _check_codes(name, q, expected_q, ratio, label, -qmax, qmax)
    print(f"✓ {name}: all {cases} test inputs match the reference, exact halves included.")


# ---------------------------------------------------------------- exercise 4: packing two codes per byte


def _codes4(case: Case) -> torch.Tensor:
    shape = [case.rng.randint(1, 5) for _ in range(case.rng.randint(0, 2))] + [2 * case.rng.randint(1, 12)]
    return case.randint(-8, 8, shape).to(case.rng.choice([torch.int8, torch.int8, torch.int64]))


def _check_pack(name: str, pack_int4: Callable, q: torch.Tensor, label: str) -> None:
    got = _run(pack_int4, (q,), name, label, _pack_int4)
    expected = _pack_int4(q)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise CheckFailed(f"`{name}` returned {difference(got, expected)} {label}; two codes share one byte, so "
                          f"the last dimension halves.")
    if got.dtype != torch.uint8:
        raise CheckFailed(f"`{name}` returned {str(got.dtype).replace('torch.', '')} {label}; bytes are uint8 "
                          f"(.to(torch.uint8)).")
    if torch.equal(got, expected):
        return
    nibbles = q.to(torch.int16) & 0xF
    swapped = (nibbles[..., 1::2] | nibbles[..., 0::2] << 4).to(torch.uint8)
    offset = q.to(torch.int16) + 8
    offset_binary = (offset[..., 0::2] | offset[..., 1::2] << 4).to(torch.uint8)
    half = q.shape[-1] // 2
    halves = (nibbles[..., :half] | nibbles[..., half:] << 4).to(torch.uint8)
    if torch.equal(got, swapped):
        raise CheckFailed(f"`{name}` swapped the nibbles {label}: element 2i goes in the low nibble "
                          f"(bits 0-3) and element 2i+1 in the high nibble (bits 4-7).")
    if torch.equal(got, offset_binary):
        raise CheckFailed(f"`{name}` stored q + 8 {label}; the convention here is the two's-complement nibble, "
                          f"q & 0xF (so -1 is 0b1111 and 7 is 0b0111).")
    if half > 1 and torch.equal(got, halves):
        raise CheckFailed(f"`{name}` paired element i with element i + n/2 {label}; neighbours share a byte: "
                          f"elements 2i and 2i+1.")
    raise CheckFailed(f"`{name}` returned {difference(got, expected)} {label}.")


def _check_unpack(name: str, unpack_int4: Callable, packed: torch.Tensor, label: str) -> None:
    got = _run(unpack_int4, (packed,), name, label, _unpack_int4)
    expected = _unpack_int4(packed)
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype \
            and not torch.equal(got, expected):
        if torch.equal(got.to(torch.int16), expected.to(torch.int16) & 0xF):
            raise CheckFailed(f"`{name}` did not sign-extend {label}: nibbles 8..15 stand for -8..-1 in two's "
                              f"complement, so subtract 16 from them.")
        if torch.equal(got, expected.reshape(*expected.shape[:-1], -1, 2).flip(-1).flatten(-2)):
            raise CheckFailed(f"`{name}` swapped the nibbles {label}: the low nibble is element 2i, the high "
                              f"nibble element 2i+1.")
    found = difference(got, expected)
    if found:
        raise CheckFailed(f"`{name}` returned {found} {label}.")


def check_pack_int4(pack_int4: Callable, unpack_int4: Callable, cases: int = 6, seed: int = 4) -> None:
    """Exercise 4: ``pack_int4(q)`` → uint8 with two codes per byte; ``unpack_int4`` undoes it, sign included."""
    pack_name, unpack_name = _name(pack_int4, "pack_int4"), _name(unpack_int4, "unpack_int4")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        q = _codes4(case)
        _check_pack(pack_name, pack_int4, q, f"on test input #{index + 1} (q {describe(q)} with codes in -8..7)")
        packed = case.randint(0, 256, q.shape[:-1] + (q.shape[-1] // 2,)).to(torch.uint8)
        _check_unpack(unpack_name, unpack_int4, packed, f"on test input #{index + 1} (packed {describe(packed)})")
    every_byte = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    _check_unpack(unpack_name, unpack_int4, every_byte, "on all 256 byte values")
    round_trip = torch.arange(-8, 8, dtype=torch.int8).repeat(3)
    label = "on the round trip of every code -8..7"
    packed = _run(pack_int4, (round_trip,), pack_name, label, _pack_int4)
    back = _run(unpack_int4, (packed,), unpack_name, label, _unpack_int4)
    found = difference(back, round_trip)
    if found:
        raise CheckFailed(f"unpack_int4(pack_int4(q)) gave {found} {label}.")
    print(f"✓ {pack_name} and {unpack_name}: all {cases} test inputs, every byte value and the round trip match.")


# ---------------------------------------------------------------- exercise 5: NF4


def _nf4_inputs(case: Case) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    group_size = case.rng.choice([8, 16, 32, 64])
    weight = _weight(case, case.rng.randint(2, 10), group_size * case.rng.randint(1, 4))
    regime = case.index % 3
    if regime == 0:
        return weight, group_size, None
    if regime == 1:
        return weight, group_size, _NF4_LEVELS.clone()
    other = torch.cat([torch.tensor([-1.0, 0.0, 1.0]), torch.rand(case.rng.randint(2, 9), generator=case.gen) * 2 - 1])
    return weight, group_size, other.sort().values


def _near_midpoint(normalized: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Elements within 1e-5 of a midpoint between two neighbouring levels (either is a correct answer)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return ((normalized.unsqueeze(-1) - midpoints).abs() < 1e-5).any(-1)


def check_nf4_quantize(nf4_quantize: Callable, cases: int = 6, seed: int = 5) -> None:
    """Exercise 5: ``nf4_quantize(weight, group_size, levels)`` → ``(codes uint8, absmax (out, in/group_size))``."""
    name = _name(nf4_quantize, "nf4_quantize")
    for index in range(cases):
        weight, group_size, levels = _nf4_inputs(Case(index, seed * 10_007 + index))
        which = "levels=None (NF4)" if levels is None else f"{len(levels)} levels"
        label = f"on test input #{index + 1} (weight {describe(weight)}, group_size={group_size}, {which})"
        got = _run(nf4_quantize, (weight, group_size, levels), name, label, _nf4_quantize)
        codes, absmax = _parts(got, 2, name, label, "(codes, absmax)")
        expected_codes, expected_absmax = _nf4_quantize(weight, group_size, levels)
        table = _NF4_LEVELS if levels is None else levels
        if difference(absmax, expected_absmax, atol=0, rtol=1e-6):
            if _values_match(absmax, weight.abs().amax(dim=-1)):
                raise CheckFailed(f"`{name}` scaled each row by its own absmax {label}; NF4 scales each group of "
                                  f"{group_size} consecutive inputs by the group's absmax.")
            raise CheckFailed(f"`{name}` returned absmax with {difference(absmax, expected_absmax, atol=0, rtol=1e-6)} "
                              f"{label}.")
        if not isinstance(codes, torch.Tensor) or codes.shape != expected_codes.shape:
            raise CheckFailed(f"`{name}` returned codes with {difference(codes, expected_codes)} {label}.")
        if codes.dtype != torch.uint8:
            raise CheckFailed(f"`{name}` returned codes as {str(codes.dtype).replace('torch.', '')} {label}; the "
                              f"16 level indices fit in uint8 (.to(torch.uint8)).")
        normalized = weight / expected_absmax.repeat_interleave(group_size, dim=1)
        differ = (codes.long() != expected_codes.long()) & ~_near_midpoint(normalized, table)
        if not bool(differ.any()):
            continue
        above = torch.searchsorted(table, normalized.contiguous()).clamp(max=len(table) - 1)
        if _mostly_equal(codes, above):
            raise CheckFailed(f"`{name}` took the first level at or above each value (searchsorted) {label}; "
                              f"take the nearest level: the index of the smallest |w / absmax - level|.")
        if _mostly_equal(codes, (weight.unsqueeze(-1) - table).abs().argmin(-1)):
            raise CheckFailed(f"`{name}` compared the raw weights with the levels {label}; the levels live in "
                              f"[-1, 1], so compare weight / absmax of its group.")
        raise CheckFailed(f"`{name}` returned codes with {difference(codes, expected_codes)} {label}.")
    print(f"✓ {name}: all {cases} test inputs pick the reference's levels, NF4 and other level sets.")


# ---------------------------------------------------------------- exercise 6: straight-through fake quantization


def _fake_quant_inputs(case: Case) -> tuple[torch.Tensor, int]:
    bits = case.rng.choice([4, 8, 3, 2])
    return _weight(case, case.rng.randint(2, 12), case.rng.randint(2, 40)), bits


def check_fake_quantize(fake_quantize: Callable, cases: int = 6, seed: int = 6) -> None:
    """Exercise 6: ``fake_quantize(x, bits)``: the per-row absmax grid in the forward pass, the identity's gradient."""
    name = _name(fake_quantize, "fake_quantize")
    for index in range(cases):
        case = Case(index, seed * 10_007 + index)
        x, bits = _fake_quant_inputs(case)
        label = f"on test input #{index + 1} (x {describe(x)}, bits={bits})"
        mine = x.clone().requires_grad_(True)
        got = call_learner(fake_quantize, (mine, bits), name, label, reference=_fake_quantize)
        expected = _fake_quantize(x, bits)
        q, scale = _absmax_quantize(x, bits)
        if not isinstance(got, torch.Tensor) or got.shape != x.shape or got.dtype != x.dtype:
            raise CheckFailed(f"`{name}` returned {difference(got, expected)} {label}.")
        if difference(got, expected, atol=1e-6, rtol=1e-5):
            values = got.detach().double()
            if torch.equal(values, q.double()):
                raise CheckFailed(f"`{name}` returned the integer codes {label}; fake quantization returns them "
                                  f"dequantized, q * scale, in x's dtype.")
            if torch.allclose(values, x.double(), atol=1e-7, rtol=1e-6):
                raise CheckFailed(f"`{name}` returned x unchanged {label}; the forward value must be the quantized "
                                  f"one, round(x / scale) * scale with scale = max|row| / (2^(bits-1) - 1).")
            ratio = x.double() / scale.double()
            steps = values / scale.double()
            if not torch.allclose(steps, torch.round(steps), atol=1e-3) or not _same_codes(torch.round(steps), q, ratio):
                raise CheckFailed(f"`{name}` returned {difference(got, expected, atol=1e-6, rtol=1e-5)} {label}.")
        if got.grad_fn is None:
            raise CheckFailed(f"`{name}` returned a tensor that does not depend on x {label} (detached, or built "
                              f"outside autograd), so no gradient reaches the weights; return x + (x_q - x).detach().")
        upstream = case.randn(*x.shape)
        got.backward(upstream)
        if mine.grad is None or difference(mine.grad, upstream, atol=1e-6, rtol=1e-5):
            zero = mine.grad is None or float(mine.grad.abs().max()) < 1e-3 * float(upstream.abs().max())
            what = "is zero, since round has no gradient" if zero else "is not the incoming gradient"
            raise CheckFailed(f"The gradient of `{name}` with respect to x {what} {label}; the straight-through "
                              f"estimator passes it through unchanged: return x + (x_q - x).detach().")
    print(f"✓ {name}: all {cases} test inputs give the reference's values and a straight-through gradient.")
