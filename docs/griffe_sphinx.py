"""A griffe extension for the API reference: the package's docstrings are reStructuredText
(``:param x:``, ``:func:`name```, simple tables); mkdocstrings renders Markdown. This turns Sphinx
cross-reference roles into code spans and simple ``====`` tables into Markdown tables before
rendering. The ``:param:`` fields themselves are parsed by ``docstring_style: sphinx``."""

import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
BORDER = re.compile(r"^ *=+( +=+)+ *$")


def _table(lines):
    """A simple reST table (border, rows, border) as a list (two columns: "- key: text") or a
    Markdown table whose first row is the header."""
    starts = [m.start() for m in re.finditer(r"=+", lines[0])]
    rows = [
        [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        for line in lines[1:-1]
        if line.strip() and not BORDER.match(line)
    ]
    if len(starts) == 2:
        return ["", *(f"- {key}: {text}" for key, text in rows), ""]
    md = ["| " + " | ".join(row) + " |" for row in rows]
    return ["", md[0], "|" + "|".join("---" for _ in starts) + "|", *md[1:], ""]


def _markdown(text):
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if BORDER.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if BORDER.match(lines[j])), None)
            if end is not None:
                out += _table(lines[i : end + 1])
                i = end + 1
                continue
        out.append(lines[i])
        i += 1
    return ROLE.sub(r"`\1`", "\n".join(out)).replace("``", "`")


class SphinxToMarkdown(griffe.Extension):
    """Configured in mkdocs.yml (``extensions:`` of the python handler, a path relative to the
    repository root, where ``mkdocs`` runs)."""

    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = _markdown(obj.docstring.value)
