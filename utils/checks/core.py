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
import traceback
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


def function_name(fn: Callable, default: str) -> str:
    """The name of the learner's function, or ``default`` when the object has none."""
    return getattr(fn, "__name__", default)


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
    _guard_entry()
    if reference is not None:
        owner = "the course's own" if _qualified(reference).startswith("utils.") else "the library function"
        forbidden = (*forbidden, Forbidden(reference, f"{owner} {_qualified(reference)}"))
    guard = _forbid(forbidden)
    try:
        with guard:
            result = fn(*args)
    except _ShortcutUsed as used:
        # The profile hook records the outermost shortcut (the course's module), the tripwire the innermost
        # (the torch function inside it): name the one the learner's code actually called.
        rule = guard.used or used.rule
        raise CheckFailed(f"`{name}` used {rule.name}, a shortcut this exercise asks you to do without.") from None
    except NotImplementedError as error:
        raise ExerciseNotDone(
            f"`{name}` is not implemented yet: replace `raise NotImplementedError()` in its cell with your code."
        ) from error
    except CheckFailed:
        raise
    except Exception as error:  # noqa: BLE001 - reported to the learner in one sentence
        if _out_of_memory(error):  # let go of what the learner's frames hold, or the next cell runs out too
            traceback.clear_frames(error.__traceback__)
        message = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        raise CheckFailed(f"`{name}` raised {type(error).__name__} ({message}) {label}.") from error
    _guard_after_learner(name)
    if guard.used is not None:
        raise CheckFailed(f"`{name}` used {guard.used.name}, a shortcut this exercise asks you to do without.")
    return result


def _out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text))


def expect(got: Any, expected: Any, what: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Assert ``got`` equals ``expected``; on failure one sentence starting with ``what``."""
    _guard_entry()
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
    mistakes: Sequence[tuple[str, Callable]] = (),
    quiet: bool = False,
) -> int:
    """Compare ``fn`` with ``reference`` on ``cases`` seeded inputs from ``make_inputs(case)``.

    Raises :class:`CheckFailed` with one sentence at the first difference, or when ``fn`` calls
    ``reference`` or anything in ``forbidden``. ``mistakes`` holds ``(phrase, wrong_function)``
    pairs: a wrong answer that equals one of them is named ("`name` <phrase> (test input #i)")
    instead of described by its first differing element. Prints a short success line and returns the
    number of inputs checked otherwise. Inputs are deep-copied for each call, so a function that
    modifies its arguments cannot change what the reference sees.
    """
    _guard_entry()
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
            _name_the_mistake(got, expected, args, mistakes, name, index, atol, rtol)
            raise CheckFailed(f"`{name}` returned {found} {label}.")
    if not quiet:
        print(f"✓ {name}: all {cases} test inputs match the reference.")
    return cases


def _name_the_mistake(got: Any, expected: Any, args: tuple, mistakes: Sequence[tuple[str, Callable]], name: str,
                      index: int, atol: float, rtol: float) -> None:
    """Raise a CheckFailed naming the known mistake that ``got`` equals, if there is one."""
    if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)
            and got.shape == expected.shape and got.dtype == expected.dtype):
        return
    for phrase, wrong in mistakes:
        try:
            mistaken = wrong(*copy.deepcopy(args))
        except Exception:  # noqa: BLE001, S112 - a mistake that cannot run on this input is not the one made
            continue
        if difference(got, mistaken, atol=atol, rtol=rtol) is None:
            raise CheckFailed(f"`{name}` {phrase} (test input #{index + 1}).")


# ---------------------------------------------------------------- the checks guard themselves
#
# A learner's cell runs in the same Python process as the checks, so it can replace them:
# ``checks.ch01.check_merge_pair = lambda *a: None``, ``torch.allclose = lambda *a, **k: True``,
# ``checks = FakeChecks()``. When ``utils.checks`` is imported (the set-up cell, before any learner
# code), :func:`seal` records the objects the checks rely on: every function, class and module
# bound in the ``utils.checks`` modules, the class bodies defined there, the torch, math, random,
# copy, sys and builtins functions they compare and sample with, and ``torch.Tensor``'s methods.
# :func:`restore` puts back anything replaced since. It runs
#
# * before every cell, through an IPython ``pre_run_cell`` hook (so a locked check cell always
#   runs the course's code, and the name ``checks`` means the course's module again);
# * at the start of every ``check_function``, ``call_learner`` and ``expect``;
# * right after every call of the learner's function inside a check: a function that replaces the
#   grading code while it is being checked fails that check.
#
# Each restore prints one line naming what was replaced (stdout, so a graded cell keeps its
# points); ``python -m utils.grading report`` flags such submissions for a person to look at.
# This stops the tricks that take a line or two; code that works at the level of the interpreter
# (``sys.setprofile``, ``ctypes``, torch function modes) is left to that review: see INSTRUCTORS.md.

import builtins as _builtins_module
import os
import types as _types

TAMPER_NOTE = "replaced by code in this notebook"
RESERVED_NAMES = ("checks",)  # notebook names that always mean the course's ``utils.checks``

_BUILTINS = ("isinstance", "issubclass", "len", "abs", "min", "max", "sum", "any", "all", "zip", "range",
             "enumerate", "repr", "str", "int", "float", "bool", "tuple", "list", "dict", "set", "frozenset",
             "sorted", "iter", "next", "getattr", "setattr", "hasattr", "callable", "type", "id", "round",
             "map", "filter", "print", "super", "object", "Exception", "AssertionError", "NotImplementedError",
             "__import__")
_TORCH_MODULES = ("torch", "torch.nn.functional", "torch.testing", "torch.linalg")
_STDLIB = (("sys", ("setprofile", "getprofile", "settrace", "gettrace")), ("copy", ("deepcopy", "copy")),
           ("math",), ("random",), ("numbers",))


@dataclass
class _Pins:
    attributes: list = field(default_factory=list)   # (owner, name, value)
    classes: list = field(default_factory=list)      # (cls, {own attribute names})
    modules: set = field(default_factory=set)        # names of utils.checks modules pinned
    ids: set = field(default_factory=set)            # ids of pinned check objects (to follow notebook names)


_pins = _Pins()
_bindings: dict[str, Any] = {}  # notebook name -> the checks object it was seen bound to
_active = False
_pinned_modules: dict[str, Any] = {}


def _public(module) -> list[tuple[str, Any]]:
    return [(n, v) for n, v in vars(module).items() if not n.startswith("_") and callable(v)]


def _pin_class(cls: type) -> None:
    own = dict(vars(cls))
    for name, value in own.items():
        if name not in ("__dict__", "__weakref__", "__doc__", "__module__", "__annotations__"):
            _pins.attributes.append((cls, name, value))
    _pins.classes.append((cls, set(own)))


_modules_seen = 0


def _pin_checks_modules() -> None:
    """Pin every ``utils.checks`` module not pinned yet: its functions, classes, modules and rules."""
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return
    _modules_seen = len(sys.modules)
    package = __name__.rsplit(".", 1)[0]
    for name, module in list(sys.modules.items()):
        if module is None or name in _pins.modules or not (name == package or name.startswith(package + ".")):
            continue
        _pins.modules.add(name)
        _pinned_modules[name] = module
        _pins.ids.add(id(module))
        for attr, value in vars(module).items():
            if attr.startswith("__") or not (callable(value) or isinstance(value, (_types.ModuleType, tuple))):
                continue
            _pins.attributes.append((module, attr, value))
            if callable(value) or isinstance(value, _types.ModuleType):
                _pins.ids.add(id(value))
            if isinstance(value, type) and value.__module__ == name:
                _pin_class(value)


def seal() -> None:
    """Record the grading code as it is now, before any learner code runs; idempotent.

    Called when ``utils.checks`` is imported. Guarding is switched on inside IPython (a notebook or
    the grader's kernel), where it also installs the ``pre_run_cell`` hook; call :func:`guarding`
    to switch it on elsewhere.
    """
    global _active
    if not _pins.attributes:
        import torch.testing  # noqa: F401 - pinned below with torch

        for module_name in _TORCH_MODULES:
            module = sys.modules.get(module_name)
            if module is not None:
                _pins.attributes.extend((module, n, v) for n, v in _public(module))
        _pin_class(torch.Tensor)
        _pin_class(torch.nn.Module)
        _pin_class(TorchFunctionMode)
        for name in _BUILTINS:
            _pins.attributes.append((_builtins_module, name, getattr(_builtins_module, name)))
        for module_name, *names in _STDLIB:
            module = __import__(module_name)
            pairs = [(n, getattr(module, n)) for n in names[0]] if names else _public(module)
            _pins.attributes.extend((module, n, v) for n, v in pairs)
        _pin_class(random.Random)
    _pin_checks_modules()
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with Jupyter
        return
    shell = get_ipython()
    if shell is not None:
        _active = True
        _install_hook(shell)


def guarding(on: bool = True) -> None:
    """Switch the guard on or off outside IPython (tests); inside IPython it is always on."""
    global _active
    seal()
    _active = on


def _hooks(shell) -> list:
    return [cb for cb in shell.events.callbacks.get("pre_run_cell", [])
            if getattr(cb, "__name__", "") == "_pre_run_cell" and getattr(cb, "__module__", "") == __name__]


def _install_hook(shell) -> None:
    """Register :func:`_pre_run_cell` with IPython once, replacing a copy from an older import."""
    ours = _hooks(shell)
    if ours == [_pre_run_cell]:
        return
    for callback in ours:
        shell.events.unregister("pre_run_cell", callback)
    shell.events.register("pre_run_cell", _pre_run_cell)


def _label(owner, name: str) -> str:
    if owner is _builtins_module:
        return f"the built-in `{name}`"
    prefix = owner.__name__ if isinstance(owner, _types.ModuleType) else f"{owner.__module__}.{owner.__qualname__}"
    return f"{prefix}.{name}"


def restore() -> list[str]:
    """Put back every pinned object that was replaced or deleted; return what was (empty if nothing)."""
    if not _pins.attributes:
        return []
    _pin_checks_modules()  # a checks module imported after the seal
    replaced = []
    missing = object()
    for index, (owner, name, value) in enumerate(_pins.attributes):
        current = owner.__dict__.get(name, missing) if isinstance(owner, type) else getattr(owner, name, missing)
        if current is not value:
            if _torch_wrapper_of(current, value):  # torch wraps some of its own functions lazily
                _pins.attributes[index] = (owner, name, current)
                continue
            try:
                setattr(owner, name, value)
            except (AttributeError, TypeError):  # a read-only slot: nothing a learner could have changed
                continue
            replaced.append(_label(owner, name))
    for cls, own in _pins.classes:
        for name in [n for n in vars(cls) if n not in own]:
            if any(name in vars(base) for base in cls.__mro__[1:]):  # shadows an inherited method
                try:
                    delattr(cls, name)
                except (AttributeError, TypeError):
                    continue
                replaced.append(_label(cls, name))
    return replaced


_TORCH_DIR = os.path.dirname(torch.__file__)


def _torch_wrapper_of(current, original) -> bool:
    """True if ``current`` is torch's own wrapper around ``original`` (``torch._dynamo`` wraps ``manual_seed``)."""
    code = getattr(current, "__code__", None)
    if code is None or not os.path.abspath(code.co_filename).startswith(_TORCH_DIR + os.sep):
        return False
    for _ in range(5):
        current = getattr(current, "__wrapped__", None)
        if current is original:
            return True
        if current is None:
            return False
    return False


def guard(namespace: dict | None = None, quiet: bool = False) -> list[str]:
    """Restore the grading code and the notebook names bound to it; print one line if anything changed.

    ``namespace`` is the notebook's globals: a name such as ``checks`` that was bound to a
    ``utils.checks`` object (and the reserved name ``checks`` itself) is bound to it again.
    Returns what was replaced. The grader calls this before every graded cell.
    """
    replaced = restore() if _active else []
    if namespace is not None and _active:
        package = _pinned_modules.get(__name__.rsplit(".", 1)[0])
        for name, value in list(_bindings.items()):
            if namespace.get(name, value) is not value:
                namespace[name] = value
                replaced.append(f"the name `{name}`")
        for name in RESERVED_NAMES:
            if package is not None and name in namespace and namespace[name] is not package and name not in _bindings:
                namespace[name] = package
                replaced.append(f"the name `{name}`")
        for name, value in list(namespace.items()):
            if name not in _bindings and not name.startswith("_") and id(value) in _pins.ids:
                _bindings[name] = value
    if replaced and not quiet:
        _note(replaced)
    return replaced


def _note(replaced: list[str]) -> None:
    more = f" and {len(replaced) - 3} more" if len(replaced) > 3 else ""
    verb, what = ("was", "the original is") if len(replaced) == 1 else ("were", "the originals are")
    print(f"Note from the course's checks: {', '.join(replaced[:3])}{more} {verb} {TAMPER_NOTE}; {what} back in place.")


def guard_for_grading(namespace: dict) -> list[str]:
    """What the grader runs before each graded cell: re-install the hook if removed, then :func:`guard`."""
    from IPython import get_ipython

    shell = get_ipython()
    replaced = []
    if shell is not None and _pins.attributes and _pre_run_cell not in _hooks(shell):
        replaced.append("the course's pre-run hook")
    seal()  # the first import, if the notebook never imported the checks; re-installs the hook
    package = _pinned_modules.get(__name__.rsplit(".", 1)[0])
    for name in RESERVED_NAMES:
        namespace.setdefault(name, package)
    found = guard(namespace, quiet=True)
    replaced += found
    if replaced:
        _note(replaced)
    return replaced


def _pre_run_cell(info=None) -> None:
    from IPython import get_ipython

    shell = get_ipython()
    guard(shell.user_ns if shell is not None else None)


def _guard_entry() -> None:
    """At the start of a check: restore anything replaced since the last cell started."""
    if _active:
        guard()


def _guard_after_learner(name: str) -> None:
    """Right after the learner's function returned inside a check: it may not have replaced anything."""
    if not _active:
        return
    replaced = restore()
    if replaced:
        raise CheckFailed(f"`{name}` replaced {replaced[0]} while it was being checked; the check put the "
                          "original back and does not accept this result.")
