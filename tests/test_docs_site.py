"""The documentation site works offline: `mkdocs build --strict` (about 2 s) gives a site whose
pages load no script from the network and that carries its own MathJax
(docs/hooks/mathjax_offline.py); where headless Chromium is installed, the math page is rendered
with the network cut off and its formulas must come out typeset (MathJax's output elements, no
TeX left), with a screenshot kept for a person to look at."""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    return out


def test_no_page_loads_a_script_from_the_network(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        for src in SCRIPT.findall(page.read_text()):
            assert not re.match(r"(https?:)?//", src), f"{page.relative_to(site)} loads {src}"
            assert "cdn" not in src.lower(), f"{page.relative_to(site)} loads {src}"


def test_math_page_loads_the_local_mathjax(site):
    html = (site / "math" / "index.html").read_text()
    sources = SCRIPT.findall(html)
    assert "../javascripts/mathjax.js" in sources  # the configuration, before the library
    assert "../javascripts/mathjax/tex-mml-chtml.js" in sources
    assert sources.index("../javascripts/mathjax.js") < sources.index(
        "../javascripts/mathjax/tex-mml-chtml.js")
    assert html.count('class="arithmatex"') > 20  # the TeX that MathJax is to typeset
    mathjax = site / "javascripts" / "mathjax"
    assert (mathjax / "tex-mml-chtml.js").stat().st_size > 500_000
    assert list((mathjax / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (mathjax / "input" / "tex" / "extensions" / "boldsymbol.js").exists()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_math_page_renders_offline_in_chromium(site, tmp_path):
    """Headless Chromium with every host name unresolvable: the math page's formulas are typeset
    by the site's own MathJax. Skipped where no Chromium is installed (Debian: apt-get install
    chromium)."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no headless Chromium on this machine (apt-get install chromium): the math "
                    "page's rendering is not checked here")
    page = (site / "math" / "index.html").as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: a CDN would not load
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
             "--window-size=1200,1600", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-3000:]
    typeset = dom.stdout.count("<mjx-container")
    display = len(re.findall(r'<mjx-container[^>]*display="true"', dom.stdout))
    assert typeset > 20 and display >= 8, (typeset, display)
    # no TeX left untypeset: the arithmatex spans hold MathJax's output, not \( ... \)
    spans = re.findall(r'class="arithmatex">(.*?)</(?:span|div)>', dom.stdout, flags=re.S)
    raw = [s for s in spans if s.lstrip().startswith(("\\(", "\\["))]
    assert not raw, raw[:3]
    shot = tmp_path / "math.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 20_000, run.stderr[-3000:]
    print(f"screenshot of the rendered math page: {shot}")


def test_docstring_cross_references_are_links(site):
    """The docstrings are Google-style Markdown whose cross-references are mkdocs-autorefs links
    (`[`plot_bound`][bayes_em.plots.plot_bound]`): the API pages link to the entries they name,
    and no Sphinx role (`:func:`, `:class:`, `:meth:`, ...) is left as text."""
    api = sorted((site / "api").rglob("*.html"))
    assert len(api) >= 5
    links = {}
    for page in api:
        text = page.read_text()
        assert not re.search(r":(func|class|meth|mod|attr|data|exc|obj):`", text), page
        assert ":param " not in text, page
        links[page.parent.name] = re.findall(
            r'<a class="autorefs autorefs-internal"[^>]*href="([^"]*#bayes_em\.[\w.]+)"', text)
    assert sum(map(len, links.values())) >= 60, {k: len(v) for k, v in links.items()}
    assert "#bayes_em.plots.plot_bound" in links["plots"]
    assert "#bayes_em.result.EMResult.load" in links["em"]  # a method, from its class's scope
    assert "../em/#bayes_em.api.EM.run" in links["em"] or "#bayes_em.api.EM.run" in links["em"]
    # the Args: section of EM renders as a parameters table
    em = (site / "api" / "em" / "index.html").read_text()
    assert re.search(r"Parameters:.*?chunk_size", em, flags=re.S)


def _docstrings(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if (doc := ast.get_docstring(node, clean=False)) is not None:
                yield getattr(node, "name", "<module>"), doc


def test_docstrings_are_google_style_markdown():
    """No Sphinx markup in the package's docstrings, except in the modules that
    docs/convert_docstrings.py lists as PENDING (converted at build time by its griffe extension
    until that tool is run on them)."""
    tool = ast.parse((ROOT / "docs" / "convert_docstrings.py").read_text())
    pending = next(ast.literal_eval(node.value) for node in tool.body
                   if isinstance(node, ast.Assign) and node.targets[0].id == "PENDING")
    sphinx = re.compile(r":(func|class|meth|mod|attr|data|exc|obj):`|^\s*:(param|returns?|raises?)"
                        r"\b|``|^\s*=+( +=+)+\s*$", re.M)
    found = []
    for path in sorted((ROOT / "bayes_em").glob("*.py")):
        module = "bayes_em" if path.stem == "__init__" else f"bayes_em.{path.stem}"
        if module in pending:
            continue
        found += [f"{path.name}:{name}: {m.group(0)!r}" for name, doc in _docstrings(path)
                  for m in sphinx.finditer(doc)]
    assert not found, found
