"""One-off tool (issue 16): rewrite reStructuredText / Sphinx docstrings of `bayes_em` as
Google-style Markdown docstrings, which mkdocstrings renders natively (`docstring_style: google`
in mkdocs.yml). Not used by the documentation build except for `PendingModules` below, and not a
page of the site (mkdocs.yml's `exclude_docs: *.py`).

Usage, from the repository root (griffe must find the package, and mkdocs be installed: the tool
builds the site once into a temporary folder to learn which identifiers it renders):

    python docs/convert_docstrings.py bayes_em/families.py bayes_em/chunked.py ...

It edits docstrings only (their spans are found with `ast`; code is never touched):

- `:param x: text` fields become an `Args:` section (`x: text`, continuation lines indented four
  more), `:returns: text` a `Returns:` section, `:raises E: text` a `Raises:` one;
- Sphinx roles (`:func:`, `:class:`, `:meth:`, `:mod:`, ... with an optional `~`) become
  mkdocs-autorefs links ``[`name`][bayes_em.module.name]``: the target is resolved in the
  docstring's own scope, as Python would (`plot_bound` in `bayes_em.plots` is
  `bayes_em.plots.plot_bound`; `EM.run` is `bayes_em.api.EM.run`), and followed through griffe's
  aliases (`bayes_em.EMResult` is `bayes_em.result.EMResult`). A target that no page of the site
  renders (a private helper) becomes plain code instead, since an autorefs link to it would fail
  `mkdocs build --strict`; the tool prints each such case;
- double-backtick literals become single-backtick Markdown code spans;
- simple reST tables (`====` borders) become Markdown tables (a row whose first cell is empty
  continues the row above; a table without a header row gets an empty header);
- lines pushed past 100 characters (ruff's line length) are re-wrapped; a Markdown table row stays
  one line (shorten it by hand if ruff complains).

Math and everything else are left as they are. Review the diff by eye afterwards, run
`ruff check`, and `mkdocs build --strict`.

`PendingModules` is a griffe extension (configured in mkdocs.yml) that applies the same
conversion in memory at build time to the docstrings of the modules in `PENDING`, which were
being edited elsewhere while the rest of the package was converted (roles there become
*optional* autorefs links: an unrendered target stays code). Once those files are converted with
this tool, set `PENDING = ()` and drop the extension from mkdocs.yml (tests/test_docs_site.py
then checks that no module keeps Sphinx markup).
"""

import argparse
import ast
import html
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import griffe

ROOT = pathlib.Path(__file__).resolve().parents[1]
if not (ROOT / "bayes_em").is_dir():  # run from elsewhere: the repository is the current folder
    ROOT = pathlib.Path.cwd()
WIDTH = 100
# modules whose docstrings are still Sphinx-style (edited elsewhere while the rest was converted)
PENDING = ()

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
BORDER = re.compile(r"^ *=+( +=+)+ *$")
FIELD = re.compile(r"^(?P<indent> *):(?P<kind>param|parameter|arg|argument|key|keyword|returns?"
                   r"|raises?|except|exception)(?: +(?P<name>[^:]+))?: ?(?P<text>.*)$")
SECTION = {"param": "Args", "parameter": "Args", "arg": "Args", "argument": "Args",
           "key": "Args", "keyword": "Args", "return": "Returns", "returns": "Returns",
           "raise": "Raises", "raises": "Raises", "except": "Raises", "exception": "Raises"}


# ------------------------------------------------------------------------------------------------
# text conversion (works on a docstring's text, dedented or not)


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _fields(lines):
    """``:param x:`` / ``:returns:`` / ``:raises E:`` field lists as Google-style sections."""
    out, i = [], 0
    while i < len(lines):
        m = FIELD.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = len(m["indent"])
        sections = {}  # section title -> entries (first line, continuation lines), in order
        while i < len(lines) and (m := FIELD.match(lines[i])) and len(m["indent"]) == indent:
            more = []
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > indent:
                more.append(lines[i].strip())
                i += 1
            title = SECTION[m["kind"]]
            name = (m["name"] or "").strip().split()[-1] if m["name"] else ""
            first = f"{name}: {m['text']}" if name else m["text"]
            sections.setdefault(title, []).append((first, more))
        pad = " " * indent
        for n, (title, entries) in enumerate(sections.items()):
            if n:
                out.append("")
            out.append(f"{pad}{title}:")
            for first, more in entries:
                out.append(f"{pad}    {first}".rstrip())
                out += [f"{pad}        {line}" for line in more]
    return out


def _table(lines):
    """A simple reST table (border, rows, border; an optional header row closed by a second
    border) as a Markdown table. A row whose first cell is empty continues the row above. A
    table without a header gets an empty one."""
    starts = [m.start() for m in re.finditer(r"=+", lines[0])]
    pad = " " * _indent(lines[0])
    borders = [k for k, line in enumerate(lines) if BORDER.match(line)]
    header_end = borders[1] if len(borders) > 2 else None
    rows, header = [], None
    for k, line in enumerate(lines[1:-1], start=1):
        if BORDER.match(line):
            continue
        if not line.strip():
            continue
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        if rows and not cells[0] and (header_end is None or k > header_end):
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
        else:
            rows.append(cells)
        if header_end is not None and k == header_end - 1:
            header = rows.pop()
    header = header or [""] * len(starts)
    md = [pad + "| " + " | ".join(row) + " |" for row in [header] + rows]
    return [md[0], pad + "|" + "|".join("---" for _ in starts) + "|", *md[1:]]


def _tables(lines):
    out, i = [], 0
    while i < len(lines):
        if BORDER.match(lines[i]):
            stops = [j for j in range(i + 1, len(lines)) if BORDER.match(lines[j])]
            # the closing border: the last border before a blank line
            end = None
            for j in stops:
                if all(lines[k].strip() for k in range(i, j)):
                    end = j
            if end is not None:
                out += _table(lines[i : end + 1])
                i = end + 1
                continue
        out.append(lines[i])
        i += 1
    return out


def convert_text(text, link):
    """``text`` (a docstring) in Google style and Markdown; ``link(name, tilde)`` writes a role
    (its target as written, ``~`` or not) as Markdown."""
    lines = _tables(_fields(text.split("\n")))
    text = "\n".join(lines)
    text = re.sub(r"``([^`]+?)``", r"`\1`", text)
    return ROLE.sub(lambda m: link(m.group(2).strip(), bool(m.group(1))), text)


def _shown(name, tilde):
    return name.rsplit(".", 1)[-1] if tilde else name


def target(obj, name):
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


def canonical(package, path):
    """``path`` through griffe's aliases (``bayes_em.EMResult`` -> ``bayes_em.result.EMResult``)."""
    try:
        obj = package[path.removeprefix(package.path).lstrip(".")] if path != package.path \
            else package
        return obj.final_target.path if obj.is_alias else obj.path
    except Exception:
        return path


# ------------------------------------------------------------------------------------------------
# the build-time fallback for the modules not converted yet


class PendingModules(griffe.Extension):
    """Converts, in memory, the docstrings of the modules in ``PENDING`` (roles as optional
    autorefs links). Configured in mkdocs.yml until those files are converted by this tool."""

    def on_object(self, *, obj, **kwargs):
        if obj.docstring is None or obj.is_alias or obj.module.path not in PENDING:
            return

        def link(name, tilde):
            path = target(obj, name)
            shown = html.escape(_shown(name, tilde))
            if path is None:
                return f"`{_shown(name, tilde)}`"
            return (f'<autoref identifier="{html.escape(path)}" optional>'
                    f"<code>{shown}</code></autoref>")

        obj.docstring.value = convert_text(obj.docstring.value, link)


# ------------------------------------------------------------------------------------------------
# editing the source files


def rendered_identifiers():
    """The identifiers the API pages render (the ids of their headings), from a build of the site
    into a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "--site-dir", tmp],
                       cwd=ROOT, env=env, check=True)
        ids = set()
        for page in pathlib.Path(tmp).rglob("*.html"):
            ids |= set(re.findall(r'id="(bayes_em[\w.]*)"', page.read_text()))
    return ids


def _wrap(lines, first, last):
    """Re-wrap the physical lines ``lines[first:last + 1]`` (a docstring) that are longer than
    ``WIDTH``: the overflow goes to the start of the next line of the same paragraph, or onto a new
    line."""
    i = first
    while i <= last:
        line = lines[i]
        if len(line) <= WIDTH or line.lstrip().startswith("|"):  # a table row stays one line
            i += 1
            continue
        body = _indent(line)
        stripped = line.strip()
        if i == first:  # after the opening quotes: the docstring's own indentation
            cont = body
        elif re.match(r"[-*] ", stripped):
            cont = body + 2
        elif re.match(r"\w+: ", stripped) and _in_section(lines, first, i):
            cont = body + 4
        else:
            cont = body
        cut = _cut(line, max(body, cont) + 1)
        if cut is None:
            i += 1
            continue
        head, tail = line[:cut].rstrip(), line[cut:].strip()
        lines[i] = head
        nxt = lines[i + 1] if i + 1 <= last else None
        if (nxt is not None and nxt.strip() and _indent(nxt) == cont
                and not re.match(r'([-*|] |\w[\w ]*:$|""")', nxt.strip())
                and not nxt.strip().startswith(("|", "=="))):
            lines[i + 1] = " " * cont + tail + " " + nxt.strip()
        else:
            lines.insert(i + 1, " " * cont + tail)
            last += 1
        i += 1
    return last


def _in_section(lines, first, i):
    """Whether line ``i`` is an entry of an ``Args:`` / ``Returns:`` / ``Raises:`` section."""
    for k in range(i - 1, first - 1, -1):
        s = lines[k].strip()
        if re.fullmatch(r"(Args|Returns|Raises):", s):
            return _indent(lines[k]) + 4 == _indent(lines[i])
        if not s:
            return False
    return False


def _cut(line, lo):
    """Where to break ``line``: the last space at or before column ``WIDTH`` outside code spans
    (or any space if there is none), after column ``lo``."""
    spaces, inside = [], False
    for k, ch in enumerate(line):
        if ch == "`":
            inside = not inside
        elif ch == " " and lo < k <= WIDTH:
            spaces.append((inside, k))
    outside = [k for inside, k in spaces if not inside]
    if outside:
        return outside[-1]
    return spaces[-1][1] if spaces else None


def _docstrings(tree):
    """(node, qualified name) of every docstring's string node, outermost first."""
    def walk(node, qual):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            yield body[0].value, qual
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, [*qual, child.name])
            elif not isinstance(child, ast.expr):
                yield from walk(child, qual)
    yield from walk(tree, [])


def convert_file(path, package, rendered, report):
    path = pathlib.Path(path)
    module = ".".join(path.resolve().relative_to(ROOT).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    source = path.read_text()
    lines = source.split("\n")
    nodes = list(_docstrings(ast.parse(source)))
    # last to first, so that line numbers above stay valid
    for node, qual in sorted(nodes, key=lambda nq: -nq[0].lineno):
        obj = _griffe_object(package, module, qual)
        a, b = node.lineno - 1, node.end_lineno - 1
        opening = re.match(r'([rRuU]?)("""|\'\'\'|"|\')', lines[a][node.col_offset:])
        quote = opening.group(2)
        start = node.col_offset + len(opening.group(0))
        end_col = node.end_col_offset - len(quote)
        if a == b:
            text = lines[a][start:end_col]
        else:
            text = "\n".join([lines[a][start:], *lines[a + 1 : b], lines[b][:end_col]])

        def link(name, tilde, obj=obj, qual=qual):
            shown = _shown(name, tilde)
            path_ = target(obj, name)
            where = ".".join([module, *qual])
            if path_ is None:
                report.append(f"{where}: {name!r} does not resolve: code")
                return f"`{shown}`"
            path_ = canonical(package, path_)
            if path_ not in rendered:
                report.append(f"{where}: {name!r} -> {path_} is not rendered: code")
                return f"`{shown}`"
            return f"[`{shown}`][{path_}]"

        new = convert_text(text, link)
        if new == text:
            continue
        new_lines = new.split("\n")
        prefix, suffix = lines[a][:start], lines[b][end_col:]
        new_lines[0] = prefix + new_lines[0]
        new_lines[-1] = new_lines[-1] + suffix
        lines[a : b + 1] = new_lines
        _wrap(lines, a, a + len(new_lines) - 1)
    result = "\n".join(lines)
    if result != source:
        ast.parse(result)  # still Python
        path.write_text(result)
        return True
    return False


def _griffe_object(package, module, qual):
    obj = package if module == package.path else package[module.removeprefix("bayes_em.")]
    for name in qual:
        try:
            obj = obj.members[name]
        except KeyError:  # a function nested in a function: its enclosing scope
            break
    return obj


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="Python files of bayes_em to convert in place")
    args = parser.parse_args(argv)
    package = griffe.load("bayes_em", search_paths=[str(ROOT)], resolve_aliases=True,
                          resolve_external=False)
    rendered = rendered_identifiers()
    report = []
    for path in args.files:
        if convert_file(path, package, rendered, report):
            print(f"converted {path}")
    for line in report:
        print(f"  {line}")


if __name__ == "__main__":
    main()
