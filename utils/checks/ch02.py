"""Checks for chapter 02, attention."""

from __future__ import annotations
