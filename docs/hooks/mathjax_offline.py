"""mkdocs hook: serve MathJax from the site itself, so that the formulas render without a network.

MathJax 3 (its ``es5`` build) comes from the PyPI package ``django-static-mathjax`` (in the
``docs`` extra: ``pip install -e ".[docs]"``; it imports as ``mathjax`` and needs no Django). After
each build (``mkdocs build`` and every rebuild of ``mkdocs serve``) this hook copies the parts the
pages load into ``<site>/javascripts/mathjax/``: the ``tex-mml-chtml.js`` bundle, its web fonts,
the TeX extensions it autoloads (``\\boldsymbol``, ``\\cancel``, ...) and the accessibility and
menu components it loads on demand. ``mkdocs.yml`` loads ``javascripts/mathjax/tex-mml-chtml.js``;
no page loads a script from a CDN. Nothing is committed: the assets (about 7 MB of the package's
24) are copied from the installed package at build time.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from mkdocs.exceptions import PluginError

TARGET = "javascripts/mathjax"
# what tex-mml-chtml.js loads, relative to the es5 folder: the bundle itself, the CHTML fonts,
# the TeX extensions (autoload / \require), and the menu's lazily loaded a11y / speech parts
PARTS = ("tex-mml-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "a11y", "sre",
         "ui")


def mathjax_es5() -> Path:
    """The ``es5`` folder of the installed MathJax 3 package, or a ``PluginError`` saying what
    to install."""
    spec = importlib.util.find_spec("mathjax")
    if spec is not None and spec.origin is not None:
        es5 = Path(spec.origin).parent / "static" / "mathjax" / "es5"
        if (es5 / "tex-mml-chtml.js").is_file():
            return es5
    raise PluginError(
        "The documentation serves MathJax itself (no CDN): install the 'docs' extra "
        "(pip install -e '.[docs]'), which brings MathJax 3 as the PyPI package "
        "'django-static-mathjax' (imported as 'mathjax')."
    )


def on_config(config, **kwargs):
    mathjax_es5()  # fail early, before any page is built
    return config


def on_post_build(config, **kwargs):
    es5, out = mathjax_es5(), Path(config["site_dir"]) / TARGET
    for part in PARTS:
        src, dst = es5 / part, out / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
