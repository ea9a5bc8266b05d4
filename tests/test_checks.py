"""The shared check core: every kind of mistake becomes one readable sentence, never the answer."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_of

from utils import checks, tokenizers
from utils.checks.core import Forbidden, check_function, difference, expect


def ref_double(x):
    return x * 2


def tensor_input(case):
    return (case.randn(3, 4),)


def failure(fn, reference=ref_double, make=tensor_input, **kw) -> str:
    with pytest.raises(checks.CheckFailed) as info:
        check_function(fn, reference, make, name="f", **kw)
    message = str(info.value)
    assert "\n" not in message, "a check message must be one line"
    return message


def test_passes_and_counts(capsys):
    assert check_function(lambda x: x + x, ref_double, tensor_input, name="f", cases=4) == 4
    assert "all 4 test inputs" in capsys.readouterr().out


def test_wrong_shape():
    assert re.search(r"returned shape \(4, 3\), expected shape \(3, 4\) on test input #1", failure(lambda x: (2 * x).T))


def test_wrong_dtype():
    assert "dtype torch.float64, expected torch.float32" in failure(lambda x: (2 * x).double())


def test_nan_is_named_with_its_index():
    def with_nan(x):
        y = 2 * x
        y[1, 2] = float("nan")
        return y

    message = failure(with_nan)
    assert "non-finite value (nan) at index (1, 2)" in message


def test_value_mismatch_gives_first_index_and_tolerance_not_the_answer():
    def off(x):
        y = 2 * x
        y[2, 3] += 0.5
        return y

    message = failure(off, atol=1e-6, rtol=1e-5)
    assert "at index (2, 3)" in message and "atol=1e-06, rtol=1e-05" in message
    assert "1 of 12 values differ" in message
    assert "tensor(" not in message  # the expected tensor itself is never printed


def test_large_expected_answer_is_never_printed():
    message = failure(lambda x: torch.zeros(1000), reference=lambda x: torch.arange(1000.0), make=lambda c: (0,))
    assert len(message) < 300 and "998" not in message and "tensor(" not in message


def test_tolerance_accepts_float_noise():
    check_function(lambda x: 2 * x + 1e-8, ref_double, tensor_input, name="f", quiet=True)


def test_not_implemented_is_its_own_message():
    def stub(x):
        raise NotImplementedError()

    with pytest.raises(checks.ExerciseNotDone) as info:
        check_function(stub, ref_double, tensor_input, name="f")
    assert isinstance(info.value, NotImplementedError)
    assert "not implemented yet" in str(info.value)


def test_learner_exception_becomes_one_sentence_with_cause():
    def broken(x):
        return x @ torch.ones(7, 7)

    with pytest.raises(checks.CheckFailed) as info:
        check_function(broken, ref_double, tensor_input, name="f")
    assert str(info.value).startswith("`f` raised RuntimeError (")
    assert "on test input #1 (a float32 tensor of shape (3, 4))" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # kept for %debug


def test_missing_return():
    assert "None (is a `return` statement missing?)" in failure(lambda x: None)


def test_tensor_where_list_expected():
    message = failure(lambda ids: torch.tensor(ids), reference=lambda ids: list(ids), make=lambda c: ([1, 2, 3],))
    assert "where a list was expected (try .tolist())" in message


def test_dict_and_string_differences():
    assert "missing the key (1, 2)" in difference({}, {(1, 2): 3})
    assert "unexpected key 'x'" in difference({"x": 1}, {})
    assert difference("abcd", "abXd") == "'c' at position 2, expected 'X'"
    assert difference([1, [2, 3]], [1, [2, 4]]) == "3 at index [1][1], expected 4"


def test_forbidden_torch_function_and_python_function():
    rules = [Forbidden(F.embedding, "F.embedding"), Forbidden(tokenizers.merge_pair, "the reference merge_pair")]
    make = lambda c: (torch.tensor([0, 1]), torch.eye(2))  # noqa: E731
    message = failure(lambda ids, w: F.embedding(ids, w), reference=lambda ids, w: w[ids], make=make, forbidden=rules)
    assert message == "`f` used F.embedding, a shortcut this exercise asks you to do without."

    sneaky = tokenizers.merge_pair  # imported under another name still counts
    message = failure(lambda ids: sneaky(ids, (1, 2), 9), reference=lambda ids: tokenizers.merge_pair(ids, (1, 2), 9),
                      make=lambda c: ([1, 2, 3],), forbidden=rules)
    assert "used the reference merge_pair" in message


def test_catching_the_shortcut_error_does_not_hide_the_shortcut():
    def sneaky(ids, w):
        try:
            return F.embedding(ids, w)
        except Exception:
            return w[ids.tolist()]

    message = failure(sneaky, reference=lambda ids, w: w[ids], make=lambda c: (torch.tensor([0, 1]), torch.eye(2)),
                      forbidden=[Forbidden(F.embedding, "F.embedding")])
    assert "used F.embedding" in message


def test_calling_the_reference_itself_is_rejected():
    from utils.tokenizers import count_pairs as course_count_pairs

    message = failure(lambda ids: course_count_pairs(ids), reference=tokenizers.count_pairs,
                      make=lambda c: ([1, 2, 1, 2],))
    assert message == "`f` used the course's own utils.tokenizers.count_pairs, a shortcut this exercise asks you to do without."
    bpe = tokenizers.BPETokenizer({(1, 2): 256})
    message = failure(lambda text, merges: bpe.encode(text), reference=tokenizers.bpe_encode,
                      make=lambda c: ("abc", {(1, 2): 256}))
    assert "used the course's own utils.tokenizers.bpe_encode" in message


def test_inputs_are_copied_so_mutation_cannot_fool_the_reference():
    def mutate(ids):
        ids.append(99)
        return list(ids)

    assert "length 4, expected length 3" in failure(mutate, reference=list, make=lambda c: ([1, 2, 3],))


def test_expect_message():
    with pytest.raises(checks.CheckFailed, match=r"^merge_pair\(\[7, 7, 7\]\) gave a list of length 2"):
        expect([9, 9], [9, 7, 1], "merge_pair([7, 7, 7])")


def test_failed_check_renders_as_one_line_in_ipython():
    lines = checks.CheckFailed("`f` returned x.")._render_traceback_()
    assert len(lines) == 1 and "`f` returned x." in lines[0]


# ---------------------------------------------------------------- chapter 01's checks on typical mistakes


def merge_overlapping(ids, pair, new_id):
    """A classic mistake: [7, 7, 7] with pair (7, 7) becomes [99, 99], reusing the middle token."""
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
        elif i > 0 and (ids[i - 1], ids[i]) == pair:
            continue
        else:
            out.append(ids[i])
    return out


def bpe_by_frequency(text, merges):
    """A classic mistake: merge the most frequent pair instead of the earliest-learned one."""
    ids = list(text.encode("utf-8"))
    while True:
        pairs = {p: c for p, c in tokenizers.count_pairs(ids).items() if p in merges}
        if not pairs:
            return ids
        best = max(pairs, key=pairs.get)
        ids = tokenizers.merge_pair(ids, best, merges[best])


@pytest.mark.parametrize(
    "check, wrong, expected",
    [
        (lambda f: checks.ch01.check_count_pairs(f), lambda ids: {p: 1 for p in zip(ids, ids[1:])}, "returned 1 at index"),
        (lambda f: checks.ch01.check_count_pairs(f), lambda ids: dict(zip(ids, ids[1:])), "missing the key"),
        (lambda f: checks.ch01.check_merge_pair(f, cases=40), merge_overlapping, "`merge_overlapping` returned"),
        (lambda f: checks.ch01.check_bpe_encode(f, cases=40), bpe_by_frequency, "`bpe_by_frequency` returned"),
        (lambda f: checks.ch01.check_embed_one_hot(f), lambda ids, w: w[ids], "used indexing with a tensor of ids"),
        (lambda f: checks.ch01.check_embed_one_hot(f), lambda ids, w: F.one_hot(ids).float() @ w, "`<lambda>` r"),
        (lambda f: checks.ch01.check_char_tokenizer(f, copy_of(tokenizers.decode_chars)),
         lambda text, vocab: [vocab.index(c) + 1 for c in text], "`<lambda>` returned"),
    ],
)
def test_chapter01_checks_reject_typical_mistakes(check, wrong, expected):
    with pytest.raises(checks.CheckFailed) as info:
        check(wrong)
    assert expected in str(info.value)


def test_chapter01_checks_accept_correct_answers():
    checks.ch01.check_char_tokenizer(copy_of(tokenizers.encode_chars), copy_of(tokenizers.decode_chars))
    checks.ch01.check_count_pairs(copy_of(tokenizers.count_pairs))
    checks.ch01.check_merge_pair(copy_of(tokenizers.merge_pair), cases=40)
    checks.ch01.check_bpe_encode(copy_of(tokenizers.bpe_encode), cases=40)
    one_hot = lambda ids, w: F.one_hot(ids, w.shape[0]).to(w.dtype) @ w  # noqa: E731
    checks.ch01.check_embed_one_hot(one_hot)
    checks.ch01.check_embedding_gradient(one_hot)


def _every_check():
    import inspect

    for module_name in checks.CHAPTER_MODULES:
        module = getattr(checks, module_name)
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("check_") and function.__module__ == module.__name__:
                yield pytest.param(function, id=f"{module_name}.{name}")


@pytest.mark.parametrize("check", list(_every_check()))
def test_every_check_says_an_unattempted_exercise_is_not_done(check):
    """Each check of every chapter, given the student version's stub, says "not implemented yet" in one line."""
    import inspect

    def stub(*args, **kwargs):
        raise NotImplementedError()

    learner_functions = [p for p in inspect.signature(check).parameters.values() if p.default is inspect.Parameter.empty]
    with pytest.raises(checks.ExerciseNotDone) as info:
        check(*[stub] * len(learner_functions))
    assert "not implemented yet" in str(info.value) and "\n" not in str(info.value)
