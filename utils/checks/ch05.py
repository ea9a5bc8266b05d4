"""Checks for chapter 05, training and generation."""

from __future__ import annotations
