"""A griffe extension for the API reference: the package's docstrings are reStructuredText
(``:param x:``, ``:func:`name```, simple tables); mkdocstrings renders Markdown. This turns Sphinx
cross-reference roles into cross-references (links to the object's entry in the API reference,
through mkdocs-autorefs) and simple ``====`` tables into Markdown tables before rendering. The
``:param:`` fields themselves are parsed natively by ``docstring_style: sphinx``.

A role's target is resolved as Python would in the docstring's scope (``:func:`plot_bound``` in
``bayes_em.plots`` is ``bayes_em.plots.plot_bound``; ``:meth:`EM.run``` is
``bayes_em.api.EM.run``); the link is *optional*: a target that no page renders (a private
helper) stays a code span instead of failing the strict build."""

import html
import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
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


def _target(obj, name):
    """The full path of ``name`` as seen from ``obj``'s scope, or ``None``."""
    name = name.strip().removesuffix("()")
    if name.startswith("bayes_em"):
        return name
    first, _, rest = name.partition(".")
    try:
        path = obj.resolve(first)
    except Exception:  # griffe's NameResolutionError, or an alias it cannot follow
        return None
    return f"{path}.{rest}" if rest else path


def _role(obj, match):
    tilde, name = match.group(1), match.group(2)
    shown = name.strip().rsplit(".", 1)[-1] if tilde else name.strip()
    path = None if obj is None else _target(obj, name)
    if path is None:
        return f"`{shown}`"
    return (f'<autoref identifier="{html.escape(path)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>")


def _markdown(text, obj=None):
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
    text = "\n".join(out).replace("``", "`")
    return ROLE.sub(lambda m: _role(obj, m), text)


class SphinxToMarkdown(griffe.Extension):
    """Configured in mkdocs.yml (``extensions:`` of the python handler, a path relative to the
    repository root, where ``mkdocs`` runs)."""

    def on_object(self, *, obj, **kwargs):
        # once the object tree is complete, so that names resolve
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = _markdown(obj.docstring.value, obj)
