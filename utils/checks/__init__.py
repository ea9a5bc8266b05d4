"""Graders for the exercises: one module per chapter, all built on :mod:`utils.checks.core`.

In a notebook::

    from utils import checks
    checks.ch01.check_merge_pair(merge_pair)
"""

from . import ch01, ch02, ch03, ch04, ch05, core
from .core import CheckFailed, ExerciseNotDone, check_function, expect

__all__ = ["core", "ch01", "ch02", "ch03", "ch04", "ch05", "CheckFailed", "ExerciseNotDone", "check_function", "expect"]

core.seal()  # record the grading code before any learner code runs (see core.guard)
