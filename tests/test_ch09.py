"""Chapter 09's checks accept correct answers, written several ways, and name the usual mistakes in one sentence."""

import pytest
import torch
from conftest import rejection

from utils import quant
from utils.checks import ch09

# ---------------------------------------------------------------- exercise 1: absmax per channel


def absmax_quantize(weight, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=-1, keepdim=True) / qmax
    return torch.round(weight / scale).clamp(-qmax, qmax).to(torch.int8), scale


def absmax_quantize_by_multiplying(weight, bits):
    """The same maths in another order: x * qmax / absmax may round a hair differently near a boundary."""
    qmax = 2 ** (bits - 1) - 1
    absmax = weight.abs().max(dim=1, keepdim=True).values
    return torch.round(weight * qmax / absmax).to(torch.int8), absmax / qmax


def with_rounding(rounding):
    def wrong(weight, bits):
        qmax = 2 ** (bits - 1) - 1
        scale = weight.abs().amax(dim=-1, keepdim=True) / qmax
        return rounding(weight / scale).clamp(-qmax, qmax).to(torch.int8), scale
    return wrong


def test_absmax_accepts_correct_answers(capsys):
    for correct in (absmax_quantize, absmax_quantize_by_multiplying):
        ch09.check_absmax_quantize(correct)
        ch09.check_absmax_quantize(correct, cases=30, seed=91)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("rounding, phrase", [
    (torch.floor, "rounds down (floor)"),
    (torch.trunc, "rounds towards zero"),
    (lambda r: torch.floor(r + 0.5), "rounds halves up"),
    (lambda r: torch.sign(r) * torch.floor(r.abs() + 0.5), "rounds halves away from zero"),
])
def test_absmax_names_a_wrong_rounding_mode(rounding, phrase):
    message = rejection(lambda fn: ch09.check_absmax_quantize(fn, cases=6), with_rounding(rounding))
    assert phrase in message and "torch.round" in message


def test_absmax_names_a_scale_on_the_wrong_axis():
    def over_columns(weight, bits):
        qmax = 2 ** (bits - 1) - 1
        scale = weight.abs().amax(dim=0, keepdim=True) / qmax
        return torch.round(weight / scale).clamp(-qmax, qmax).to(torch.int8), scale

    assert "wrong axis" in rejection(ch09.check_absmax_quantize, over_columns)


def test_absmax_names_per_tensor_missing_keepdim_and_qmax():
    def per_tensor(weight, bits):
        qmax = 2 ** (bits - 1) - 1
        scale = weight.abs().max() / qmax
        return torch.round(weight / scale).to(torch.int8), scale

    def no_keepdim(weight, bits):
        q, scale = absmax_quantize(weight, bits)
        return q, scale.squeeze(-1)

    def qmax_of_128(weight, bits):
        qmax = 2 ** (bits - 1)
        scale = weight.abs().amax(dim=-1, keepdim=True) / qmax
        return torch.round(weight / scale).clamp(-qmax, qmax - 1).to(torch.int8), scale

    assert "whole tensor" in rejection(ch09.check_absmax_quantize, per_tensor)
    assert "keepdim" in rejection(ch09.check_absmax_quantize, no_keepdim)
    assert "2^(bits-1)" in rejection(ch09.check_absmax_quantize, qmax_of_128)


def test_absmax_wants_int8_codes():
    def float_codes(weight, bits):
        q, scale = absmax_quantize(weight, bits)
        return q.float(), scale

    assert "int8" in rejection(ch09.check_absmax_quantize, float_codes)


def test_absmax_forbids_the_course_function():
    assert "shortcut" in rejection(ch09.check_absmax_quantize, lambda w, b: quant.absmax_quantize(w, b))


# ---------------------------------------------------------------- exercise 2: zero point


def zero_point_quantize(x, bits):
    levels = 2**bits - 1
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (hi - lo) / levels
    zero_point = torch.round(-lo / scale).to(torch.int64)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels).to(torch.uint8)
    return q, scale, zero_point


def zero_point_quantize_rounding_after_adding(x, bits):
    levels = 2**bits - 1
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = torch.tensor((hi - lo) / levels, dtype=x.dtype)
    zero_point = torch.tensor(round(-lo / scale.item()))
    q = torch.round(x / scale + zero_point).clamp(0, levels).to(torch.uint8)
    return q, scale, zero_point


def test_zero_point_accepts_correct_answers(capsys):
    for correct in (zero_point_quantize, zero_point_quantize_rounding_after_adding):
        ch09.check_zero_point_quantize(correct)
        ch09.check_zero_point_quantize(correct, cases=30, seed=92)
    assert "✓" in capsys.readouterr().out


def test_zero_point_names_a_range_that_leaves_out_zero():
    def unstretched(x, bits):
        levels = 2**bits - 1
        scale = (x.max() - x.min()) / levels
        zero_point = torch.round(-x.min() / scale).clamp(0, levels).to(torch.int64)
        return torch.clamp(torch.round(x / scale) + zero_point, 0, levels).to(torch.uint8), scale, zero_point

    assert "include 0" in rejection(ch09.check_zero_point_quantize, unstretched)


def test_zero_point_names_a_zero_point_that_clips():
    def wrong_sign(x, bits):
        _, scale, _ = zero_point_quantize(x, bits)
        levels = 2**bits - 1
        zero_point = torch.round(x.min().clamp(max=0) / scale).clamp(0, levels).to(torch.int64)
        return torch.clamp(torch.round(x / scale) + zero_point, 0, levels).to(torch.uint8), scale, zero_point

    def unclamped_wrong_sign(x, bits):
        q, scale, _ = zero_point_quantize(x, bits)
        zero_point = torch.round(x.min().clamp(max=0) / scale).to(torch.int64)
        return q, scale, zero_point

    def unrounded(x, bits):
        q, scale, _ = zero_point_quantize(x, bits)
        return q, scale, -x.min().clamp(max=0) / scale

    assert "clip" in rejection(ch09.check_zero_point_quantize, wrong_sign)
    assert "clip" in rejection(ch09.check_zero_point_quantize, unclamped_wrong_sign)
    assert "round it" in rejection(ch09.check_zero_point_quantize, unrounded)


def test_zero_point_names_the_wrong_number_of_steps_and_rounding():
    def over_256(x, bits):
        levels = 2**bits
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        scale = (hi - lo) / levels
        zero_point = torch.round(-lo / scale).to(torch.int64)
        return torch.clamp(torch.round(x / scale) + zero_point, 0, levels - 1).to(torch.uint8), scale, zero_point

    def floored(x, bits):
        _, scale, zero_point = zero_point_quantize(x, bits)
        q = torch.clamp(torch.floor(x / scale) + zero_point, 0, 2**bits - 1).to(torch.uint8)
        return q, scale, zero_point

    assert "2^bits" in rejection(ch09.check_zero_point_quantize, over_256)
    assert "rounds down (floor)" in rejection(ch09.check_zero_point_quantize, floored)


# ---------------------------------------------------------------- exercise 3: group-wise


def groupwise_quantize(weight, bits, group_size):
    qmax = 2 ** (bits - 1) - 1
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    q = torch.round(groups / scale).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(out_features, in_features), scale.squeeze(-1)


def groupwise_quantize_by_splitting(weight, bits, group_size):
    qmax = 2 ** (bits - 1) - 1
    codes, scales = [], []
    for chunk in weight.split(group_size, dim=1):
        scale = chunk.abs().amax(dim=1, keepdim=True) / qmax
        codes.append(torch.round(chunk / scale).to(torch.int8))
        scales.append(scale)
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1)


def test_groupwise_accepts_correct_answers(capsys):
    for correct in (groupwise_quantize, groupwise_quantize_by_splitting):
        ch09.check_groupwise_quantize(correct)
        ch09.check_groupwise_quantize(correct, cases=30, seed=93)
    assert "✓" in capsys.readouterr().out


def test_groupwise_names_the_usual_mistakes():
    def per_row(weight, bits, group_size):
        q, scale = absmax_quantize(weight, bits)
        return q, scale

    def strided(weight, bits, group_size):
        qmax = 2 ** (bits - 1) - 1
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, group_size, in_features // group_size)
        scale = groups.abs().amax(dim=1, keepdim=True) / qmax
        return torch.round(groups / scale).to(torch.int8).reshape(weight.shape), scale.squeeze(1)

    def floored(weight, bits, group_size):
        qmax = 2 ** (bits - 1) - 1
        _, scale = groupwise_quantize(weight, bits, group_size)
        ratio = weight / scale.repeat_interleave(group_size, dim=1)
        return torch.floor(ratio).clamp(-qmax, qmax).to(torch.int8), scale

    def unreshaped(weight, bits, group_size):
        q, scale = groupwise_quantize(weight, bits, group_size)
        return q.reshape(weight.shape[0], -1, group_size), scale

    assert "one scale per group" in rejection(ch09.check_groupwise_quantize, per_row)
    assert "strided" in rejection(ch09.check_groupwise_quantize, strided)
    assert "rounds down (floor)" in rejection(ch09.check_groupwise_quantize, floored)
    assert "reshape it back" in rejection(ch09.check_groupwise_quantize, unreshaped)


def test_groupwise_names_groups_along_the_output_dimension():
    def along_outputs(weight, bits, group_size):
        qmax = 2 ** (bits - 1) - 1
        transposed = weight.T.reshape(weight.shape[1], -1, group_size)
        scale = transposed.abs().amax(dim=-1, keepdim=True) / qmax
        return torch.round(transposed / scale).to(torch.int8).reshape(weight.shape[1], -1).T, scale.squeeze(-1)

    assert "output dimension" in rejection(ch09.check_groupwise_quantize, along_outputs)


# ---------------------------------------------------------------- exercise 4: packing


def pack_int4(q):
    q = q.to(torch.uint8) & 0xF
    return q[..., ::2] | (q[..., 1::2] << 4)


def unpack_int4(packed):
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(both >= 8, both - 16, both)


def test_packing_accepts_a_correct_answer(capsys):
    ch09.check_pack_int4(pack_int4, unpack_int4)
    ch09.check_pack_int4(pack_int4, unpack_int4, cases=30, seed=94)
    assert "✓" in capsys.readouterr().out


def test_packing_names_the_usual_mistakes():
    def swapped(q):
        q = q.to(torch.uint8) & 0xF
        return q[..., 1::2] | (q[..., ::2] << 4)

    def offset(q):
        q = (q + 8).to(torch.uint8)
        return q[..., ::2] | (q[..., 1::2] << 4)

    def unsigned_unpack(packed):
        return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)

    assert "swapped the nibbles" in rejection(lambda fn: ch09.check_pack_int4(fn, unpack_int4), swapped)
    assert "q & 0xF" in rejection(lambda fn: ch09.check_pack_int4(fn, unpack_int4), offset)
    assert "sign-extend" in rejection(lambda fn: ch09.check_pack_int4(pack_int4, fn), unsigned_unpack)


def test_quant_pack_round_trips_and_halves_the_bytes():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(quant.unpack_int4(packed), q)
    ternary = torch.randint(-1, 2, (3, 16), dtype=torch.int8)
    assert torch.equal(quant.unpack_int2(quant.pack_int2(ternary)), ternary)
    assert quant.pack_int2(ternary).shape == (3, 4)


# ---------------------------------------------------------------- exercise 5: NF4


def nf4_quantize(weight, group_size, levels=None):
    levels = quant.NF4_LEVELS if levels is None else levels
    groups = weight.reshape(weight.shape[0], -1, group_size)
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    distance = (groups.unsqueeze(-1) / absmax.unsqueeze(-1) - levels).abs()
    return distance.argmin(dim=-1).to(torch.uint8).reshape(weight.shape), absmax.squeeze(-1)


def test_nf4_accepts_a_correct_answer(capsys):
    ch09.check_nf4_quantize(nf4_quantize)
    ch09.check_nf4_quantize(nf4_quantize, cases=30, seed=95)
    assert "✓" in capsys.readouterr().out


def test_nf4_names_the_usual_mistakes():
    def level_above(weight, group_size, levels=None):
        levels = quant.NF4_LEVELS if levels is None else levels
        _, absmax = nf4_quantize(weight, group_size, levels)
        normalized = weight / absmax.repeat_interleave(group_size, dim=1)
        return torch.searchsorted(levels, normalized).clamp(max=len(levels) - 1).to(torch.uint8), absmax

    def per_row(weight, group_size, levels=None):
        codes, _ = nf4_quantize(weight, weight.shape[1], levels)
        return codes, weight.abs().amax(dim=-1)

    assert "nearest level" in rejection(ch09.check_nf4_quantize, level_above)
    assert "its own absmax" in rejection(ch09.check_nf4_quantize, per_row)


def test_nf4_levels_are_bitsandbytes_table():
    published = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
    torch.testing.assert_close(quant.nf4_levels(), published, atol=2e-7, rtol=0)


# ---------------------------------------------------------------- exercise 6: straight-through estimator


def fake_quantize(x, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax(dim=-1, keepdim=True) / qmax
    quantized = torch.round(x.detach() / scale).clamp(-qmax, qmax) * scale
    return x + (quantized - x).detach()


def test_fake_quantize_accepts_a_correct_answer(capsys):
    ch09.check_fake_quantize(fake_quantize)
    ch09.check_fake_quantize(fake_quantize, cases=30, seed=96)
    assert "✓" in capsys.readouterr().out


def test_fake_quantize_names_the_usual_mistakes():
    def no_straight_through(x, bits):
        qmax = 2 ** (bits - 1) - 1
        scale = x.detach().abs().amax(dim=-1, keepdim=True) / qmax
        return torch.round(x / scale).clamp(-qmax, qmax) * scale

    def detached(x, bits):
        return fake_quantize(x, bits).detach()

    def codes(x, bits):
        qmax = 2 ** (bits - 1) - 1
        return torch.round(x / (x.abs().amax(-1, keepdim=True) / qmax)) + 0 * x

    assert "zero, since round has no gradient" in rejection(ch09.check_fake_quantize, no_straight_through)
    assert "does not depend on x" in rejection(ch09.check_fake_quantize, detached)
    assert "integer codes" in rejection(ch09.check_fake_quantize, codes)
    assert "unchanged" in rejection(ch09.check_fake_quantize, lambda x, bits: x * 1.0)


# ---------------------------------------------------------------- every check, unattempted


# ---------------------------------------------------------------- utils.quant


def test_conventions_round_half_to_even_and_symmetric_range():
    weight = torch.tensor([[7.0, 2.5, 3.5, -2.5, -0.5, 0.5]])
    q, scale = quant.absmax_quantize(weight, bits=4)
    assert scale.item() == 1.0 and q.tolist() == [[7, 2, 4, -2, 0, 0]]
    q, _ = quant.absmax_quantize(torch.tensor([[-1.0, 0.3]]), bits=8)
    assert q.min().item() == -127


def test_zero_point_keeps_zero_exact_and_the_zero_point_in_range():
    for x in (torch.rand(50) + 1.0, -torch.rand(50) - 1.0, torch.randn(50)):
        q, scale, zero_point = quant.zero_point_quantize(x, 8)
        assert 0 <= zero_point.item() <= 255 and q.dtype == torch.uint8
        assert quant.zero_point_dequantize(torch.tensor(zero_point.item(), dtype=torch.uint8), scale, zero_point) == 0
        assert (quant.zero_point_dequantize(q, scale, zero_point) - x).abs().max() <= scale / 2 + 1e-6


def test_groupwise_error_shrinks_with_the_group():
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.exp(torch.randn(1, 256))
    errors = [quant.relative_error(weight, quant.groupwise_dequantize(*quant.groupwise_quantize(weight, 4, g), g))
              for g in (256, 64, 16)]
    assert errors[0] > errors[1] > errors[2]


def test_quantized_linear_matches_its_reference_and_measures_its_bytes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    x = torch.randn(3, 128)
    for scheme, group_size, bits in [("int8", None, 8), ("int4", 32, 4), ("nf4", 64, 4), ("ternary", None, 2)]:
        layer = quant.QuantizedLinear.from_linear(linear, scheme, group_size)
        if scheme == "int4":
            q, scale = quant.groupwise_quantize(linear.weight.detach(), 4, 32)
            reference = quant.groupwise_dequantize(q, scale.half().float(), 32)
            torch.testing.assert_close(layer.dequantized_weight(), reference)
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T + linear.bias.detach())
        groups = 1 if group_size is None else 128 // group_size
        scales = 2 if scheme == "ternary" else 48 * groups * 2
        assert layer.storage_bytes() == 48 * 128 * bits // 8 + scales + 48 * 4, scheme


def test_quantize_model_keeps_the_tied_head_and_shrinks_the_model():
    from utils.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context_length=16, n_layer=1, n_head=2, d_model=64)).eval()
    quantized = quant.quantize_model(model, "int4", 32)
    assert isinstance(quantized.blocks[0].mlp.up, quant.QuantizedLinear)
    assert isinstance(quantized.lm_head, torch.nn.Linear) and quantized.lm_head.weight is quantized.token_embedding.weight
    assert isinstance(model.blocks[0].mlp.up, torch.nn.Linear), "the original must be left alone"
    assert quant.storage_bytes(quantized) < 0.3 * quant.storage_bytes(model)
    ids = torch.randint(20, (2, 16))
    assert (quantized(ids)[0] - model(ids)[0]).abs().max() < 0.1


def test_qat_trains_through_the_quantizer_and_converts_exactly():
    from utils.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context_length=16, n_layer=1, n_head=2, d_model=64))
    for scheme, group_size in [("int4", 32), ("ternary", None)]:
        qat = quant.prepare_qat(model, scheme, group_size)
        ids = torch.randint(20, (2, 16))
        _, loss = qat(ids, ids)
        loss.backward()
        assert qat.blocks[0].mlp.up.weight.grad.abs().sum() > 0, "the straight-through gradient reaches the weight"
        converted = quant.quantize_model(qat, scheme, group_size)
        with torch.no_grad():
            assert (converted(ids)[0] - qat(ids)[0]).abs().max() < 2e-3  # float16 scales: the only difference


def test_ternary_uses_the_mean_magnitude():
    weight = torch.tensor([[0.1, -0.2, 0.05, 1.0]])
    q, scale = quant.ternary_quantize(weight)
    assert scale.item() == pytest.approx(0.3375) and q.tolist() == [[0, -1, 0, 1]]


def test_int8_decomposition_beats_per_tensor_on_outliers():
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    x[:, 7] *= 40  # one outlier channel, as LLM.int8() found in large models
    weight = torch.randn(32, 128) * 0.05
    exact = x @ weight.T
    per_tensor = quant.int8_matmul(x, weight, "tensor")
    decomposed, outliers = quant.int8_matmul_decomposed(x, weight, threshold=6.0)
    assert outliers.tolist() == [7]
    assert quant.relative_error(exact, decomposed) < quant.relative_error(exact, per_tensor) / 5


def test_static_activation_quantization_calibrates_every_layer():
    from utils.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context_length=16, n_layer=1, n_head=2, d_model=64)).eval()
    quantized = quant.quantize_model(model, "int8")
    with torch.no_grad():
        quant.calibrate_activations(quantized, [torch.randint(20, (4, 16))])
        layers = [m for m in quantized.modules() if isinstance(m, quant.QuantizedLinear)]
        assert all(m.activation == "static" and 0 <= m.input_zero_point <= 255 for m in layers)
        ids = torch.randint(20, (2, 16))
        assert (quantized(ids)[0] - model(ids)[0]).abs().max() < 0.1
