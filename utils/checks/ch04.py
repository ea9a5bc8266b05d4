"""Checks for chapter 04, the transformer block and the GPT model."""

from __future__ import annotations
