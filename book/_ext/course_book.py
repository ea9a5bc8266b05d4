"""Sphinx fixes the course's book needs on top of Jupyter Book 1.0.4.

In Jupyter Book's builds, sphinx-thebe's and sphinx-togglebutton's inline configuration scripts
reach every page twice (registered once with the file name None and once with ""), and the second
``const THEBE_JS_URL`` throws "has already been declared". This keeps the first of identical
inline or file scripts on each page.
"""

from __future__ import annotations


def _identity(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    return str(getattr(script, "filename", script) or ""), tuple(sorted((k, str(v)) for k, v in attributes.items()))


def drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        key = _identity(script)
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def setup(app):
    app.connect("html-page-context", drop_duplicate_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
