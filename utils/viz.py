"""Pictures and tables for the notebooks. Attention widgets and bertviz views arrive in chapter 06."""

from __future__ import annotations

from typing import Sequence


def results_table(rows: Sequence[tuple[str, object]], header: tuple[str, str] = ("measured", "value")):
    """A chapter's closing table of what it measured, as a Markdown display object.

    ``rows`` holds (label, value) pairs; floats are printed with 4 significant digits.
    """
    from IPython.display import Markdown

    def show(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.4g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {label} | {show(value)} |" for label, value in rows]
    return Markdown("\n".join(lines))
