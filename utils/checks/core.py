"""The one assertion core every chapter's checks share.

A check runs the learner's function and the course's reference on several seeded random inputs
and stops at the first difference with a single sentence: what was expected, what came, and on
which input. It never prints the whole expected answer, only the first differing element.

In a notebook a failed check shows just that sentence (``CheckFailed._render_traceback_``), not
a traceback through torch; the learner's own exception stays attached as ``__cause__``
(``%debug`` still reaches it).
"""

from __future__ import annotations

import copy
import math
import numbers
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.overrides import TorchFunctionMode


class CheckFailed(AssertionError):
    """A check found a problem; the message is one sentence meant for the learner."""

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return [f"\x1b[31m✗ {type(self).__name__}: {self}\x1b[0m"]


class ExerciseNotDone(CheckFailed, NotImplementedError):
    """The exercise still raises ``NotImplementedError``: nothing has been written yet."""


# ---------------------------------------------------------------- random inputs


@dataclass
class Case:
    """Seeded randomness for one test input: ``case.rng`` (Python) and ``case.gen`` (torch)."""

    index: int
    seed: int
    rng: random.Random = field(init=False)
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=dtype)

    def randint(self, low: int, high: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.gen)


# ---------------------------------------------------------------- describing values briefly


def describe(value: Any) -> str:
    """A short description of a value that never spells out its contents."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, str):
        return f"a {len(value)}-character string"
    if isinstance(value, dict):
        return f"a dict of {len(value)} entries"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _short(value: Any) -> str:
    """One element, printed compactly."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _qualified(fn: Callable) -> str:
    module = getattr(fn, "__module__", "") or ""
    return f"{module}.{getattr(fn, '__name__', 'function')}".lstrip(".")


def _index(path: tuple) -> str:
    return "".join(f"[{p!r}]" for p in path)


# ---------------------------------------------------------------- comparing values


def difference(got: Any, expected: Any, atol: float = 1e-6, rtol: float = 1e-5, path: tuple = ()) -> str | None:
    """Return a phrase describing the first difference between ``got`` and ``expected``, or None.

    Handles tensors (type, shape, dtype, NaN/inf, values within ``atol + rtol * |expected|``),
    strings, numbers, and lists, tuples and dicts of those, recursively.
    """
    where = f" at index {_index(path)}" if path else ""
    if got is None and expected is not None:
        return f"None{where} (is a `return` statement missing?)"

    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{describe(got)}{where} where a torch.Tensor was expected"
        if tuple(got.shape) != tuple(expected.shape):
            return f"shape {tuple(got.shape)}{where}, expected shape {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"dtype {got.dtype}{where}, expected {expected.dtype}"
        got_c, exp_c = got.detach().cpu(), expected.detach().cpu()
        if got_c.is_floating_point() or got_c.is_complex():
            bad = ~torch.isfinite(got_c) & torch.isfinite(exp_c)
            if bad.any():
                first = tuple(int(i) for i in bad.nonzero()[0])
                return f"a non-finite value ({_short(got_c[first])}) at index {path + first}, where the expected value is finite"
            close = torch.isclose(got_c, exp_c, atol=atol, rtol=rtol, equal_nan=True)
        else:
            close = got_c == exp_c
        if not bool(close.all()):
            first = tuple(int(i) for i in (~close).nonzero()[0])
            tolerance = f" (tolerance atol={atol:g}, rtol={rtol:g})" if got_c.is_floating_point() else ""
            return (f"{_short(got_c[first])} at index {path + first}, expected {_short(exp_c[first])}"
                    f"{tolerance}; {int((~close).sum())} of {close.numel()} values differ")
        return None

    if isinstance(expected, str):
        if not isinstance(got, str):
            return f"{describe(got)}{where} where a string was expected"
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                return f"{a!r} at position {i}{where}, expected {b!r}"
        if len(got) != len(expected):
            return f"a string of length {len(got)}{where}, expected length {len(expected)}"
        return None

    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{describe(got)}{where} where a dict was expected"
        missing = [k for k in expected if k not in got]
        if missing:
            return f"a dict missing the key {_short(missing[0])}{where} ({len(missing)} keys missing)"
        extra = [k for k in got if k not in expected]
        if extra:
            return f"a dict with an unexpected key {_short(extra[0])}{where} ({len(extra)} extra keys)"
        for key in expected:
            found = difference(got[key], expected[key], atol, rtol, path + (key,))
            if found:
                return found
        return None

    if isinstance(expected, (list, tuple)):
        if isinstance(got, torch.Tensor):
            return f"{describe(got)}{where} where a {type(expected).__name__} was expected (try .tolist())"
        if not isinstance(got, (list, tuple)):
            return f"{describe(got)}{where} where a {type(expected).__name__} was expected"
        if len(got) != len(expected):
            return f"a {type(got).__name__} of length {len(got)}{where}, expected length {len(expected)}"
        for i, (a, b) in enumerate(zip(got, expected)):
            found = difference(a, b, atol, rtol, path + (i,))
            if found:
                return found
        return None

    if isinstance(expected, int):  # bool included
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, numbers.Integral):
            return f"{describe(got)}{where} where {'a bool' if isinstance(expected, bool) else 'an int'} was expected"
        return None if got == expected else f"{_short(got)}{where}, expected {_short(expected)}"

    if isinstance(expected, float):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, numbers.Real):
            return f"{describe(got)}{where} where a number was expected"
        if math.isnan(got) and not math.isnan(expected):
            return f"NaN{where}, expected a finite number"
        if abs(got - expected) > atol + rtol * abs(expected):
            return f"{_short(got)}{where}, expected {_short(expected)} (tolerance atol={atol:g}, rtol={rtol:g})"
        return None

    return None if got == expected else f"{describe(got)}{where}, which differs from the expected {describe(expected)}"


# ---------------------------------------------------------------- forbidden shortcuts


@dataclass(frozen=True)
class Forbidden:
    """A shortcut the exercise may not call: ``func``, optionally only when ``when(args)`` is true."""

    func: Callable
    name: str
    when: Callable[[tuple], bool] | None = None


class _ShortcutUsed(Exception):
    def __init__(self, rule: Forbidden):
        super().__init__(rule.name)
        self.rule = rule


class _Tripwire(TorchFunctionMode):
    """Sees every torch function the learner's code calls; raises on a forbidden one."""

    def __init__(self, rules: Sequence[Forbidden], guard: "_forbid"):
        super().__init__()
        self.rules = [r for r in rules if not hasattr(r.func, "__code__")]
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for rule in self.rules:
            if func is rule.func and (rule.when is None or rule.when(args)):
                self.guard.used = self.guard.used or rule  # recorded even if the learner's code catches the error
                raise _ShortcutUsed(rule)
        return func(*args, **(kwargs or {}))


class _forbid:
    """Context manager: torch functions via a TorchFunctionMode, Python functions via a profile hook."""

    def __init__(self, rules: Sequence[Forbidden]):
        self.rules = list(rules)
        # Keyed by identity: code objects compare equal by content, and only the course's own
        # function object is the shortcut, not a learner's function that happens to look like it.
        self.codes = {id(r.func.__code__): r for r in self.rules if hasattr(r.func, "__code__")}
        self.used: Forbidden | None = None

    def _profile(self, frame, event, arg):
        if event == "call" and id(frame.f_code) in self.codes and self.used is None:
            self.used = self.codes[id(frame.f_code)]

    def __enter__(self):
        self.mode = _Tripwire(self.rules, self).__enter__()
        if self.codes:
            self.previous_profile = sys.getprofile()
            sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        if self.codes:
            sys.setprofile(self.previous_profile)
        self.mode.__exit__(*exc)
        return False


# ---------------------------------------------------------------- the check


def call_learner(fn: Callable, args: tuple, name: str, label: str, forbidden: Sequence[Forbidden] = (),
                 reference: Callable | None = None) -> Any:
    """Call the learner's ``fn(*args)``; turn any exception or forbidden call into one CheckFailed sentence.

    Calling ``reference``, the course's own version of the exercise, counts as a forbidden shortcut.
    """
    if reference is not None:
        forbidden = (*forbidden, Forbidden(reference, f"the course's own {_qualified(reference)}"))
    guard = _forbid(forbidden)
    try:
        with guard:
            result = fn(*args)
    except _ShortcutUsed as used:
        raise CheckFailed(f"`{name}` used {used.rule.name}, a shortcut this exercise asks you to do without.") from None
    except NotImplementedError as error:
        raise ExerciseNotDone(
            f"`{name}` is not implemented yet: replace `raise NotImplementedError()` in its cell with your code."
        ) from error
    except CheckFailed:
        raise
    except Exception as error:  # noqa: BLE001 - reported to the learner in one sentence
        message = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        raise CheckFailed(f"`{name}` raised {type(error).__name__} ({message}) {label}.") from error
    if guard.used is not None:
        raise CheckFailed(f"`{name}` used {guard.used.name}, a shortcut this exercise asks you to do without.")
    return result


def expect(got: Any, expected: Any, what: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Assert ``got`` equals ``expected``; on failure one sentence starting with ``what``."""
    found = difference(got, expected, atol=atol, rtol=rtol)
    if found:
        raise CheckFailed(f"{what} gave {found}.")


def check_function(
    fn: Callable,
    reference: Callable,
    make_inputs: Callable[[Case], tuple],
    *,
    name: str | None = None,
    cases: int = 5,
    seed: int = 0,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    forbidden: Iterable[Forbidden] = (),
    quiet: bool = False,
) -> int:
    """Compare ``fn`` with ``reference`` on ``cases`` seeded inputs from ``make_inputs(case)``.

    Raises :class:`CheckFailed` with one sentence at the first difference, or when ``fn`` calls
    ``reference`` or anything in ``forbidden``; prints a short success line and returns the
    number of inputs checked otherwise. Inputs are deep-copied for each call, so a function that
    modifies its arguments cannot change what the reference sees.
    """
    if not callable(fn):
        raise CheckFailed(f"Expected a function to check, got {describe(fn)}.")
    name = name or getattr(fn, "__name__", "your function")
    forbidden = tuple(forbidden)
    for index in range(cases):
        case = Case(index=index, seed=seed * 10_007 + index)
        args = make_inputs(case)
        expected = reference(*copy.deepcopy(args))
        label = f"on test input #{index + 1} ({', '.join(describe(a) for a in args)})"
        got = call_learner(fn, copy.deepcopy(args), name, label, forbidden, reference=reference)
        found = difference(got, expected, atol=atol, rtol=rtol)
        if found:
            raise CheckFailed(f"`{name}` returned {found} {label}.")
    if not quiet:
        print(f"✓ {name}: all {cases} test inputs match the reference.")
    return cases
