"""Checks for chapter 03, multi-head attention and position."""

from __future__ import annotations
