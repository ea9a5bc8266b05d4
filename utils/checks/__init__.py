"""Graders for the exercises: one module per chapter (``chNN.py``), all built on :mod:`utils.checks.core`.

In a notebook::

    from utils import checks
    checks.ch01.check_merge_pair(merge_pair)

Every ``chNN`` module in this folder is imported here, so a new chapter only adds its file.
"""

import importlib
import pkgutil
import re

from . import core
from .core import CheckFailed, ExerciseNotDone, check_function, expect

CHAPTER_MODULES = sorted(m.name for m in pkgutil.iter_modules(__path__) if re.fullmatch(r"ch\d\d", m.name))
for _name in CHAPTER_MODULES:
    globals()[_name] = importlib.import_module(f".{_name}", __name__)

__all__ = ["CheckFailed", "ExerciseNotDone", "check_function", "core", "expect"]
__all__.extend(CHAPTER_MODULES)

core.seal()  # record the grading code before any learner code runs (see core.guard)
