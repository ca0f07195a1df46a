"""The documentation site works offline: `mkdocs build --strict` (about 2 s) gives a site whose
pages load no script from the network and that carries its own MathJax
(docs/hooks/mathjax_offline.py); where headless Chromium is installed, the math page is rendered
with the network cut off and its formulas must come out typeset (MathJax's output elements, no
TeX left), with a screenshot kept for a person to look at."""

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


def test_docstring_roles_are_cross_references(site):
    """docs/griffe_sphinx.py turns :func:`...` roles into links to the API entries."""
    plots_page = (site / "api" / "plots" / "index.html").read_text()
    link = r'<a class="autorefs autorefs-internal"[^>]*href="#bayes_em\.plots\.plot_bound"'
    assert re.search(link, plots_page)
    for page in (site / "api").rglob("*.html"):
        text = page.read_text()
        assert not re.search(r":(func|class|meth|mod|attr):`", text), page
