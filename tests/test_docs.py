"""Every Python code block in README.md and docs/ runs, and every example script runs."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


BLOCKS = [
    pytest.param(path, i, code, id=f"{path.relative_to(ROOT)}#{i}")
    for path in DOCS
    for i, code in enumerate(python_blocks(path))
]


@pytest.mark.parametrize("path,index,code", BLOCKS)
def test_code_block_runs(path, index, code):
    exec(compile(code, f"{path.name}#{index}", "exec"), {"__name__": "__docs__"})


SLOW_EXAMPLES = {"diagnostics.py"}  # ~35 s: figures and a saved fit; pytest -m slow runs it


@pytest.mark.parametrize("script", [
    pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_EXAMPLES else p
    for p in sorted((ROOT / "examples").glob("*.py"))], ids=lambda p: getattr(p, "name", p))
def test_example_runs(script, tmp_path):
    """Run from a scratch folder: an example that writes files (diagnostics.py: ./figures)
    leaves them there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow runs it
def test_figures_script_runs(tmp_path):
    """docs/figures/make_figures.py still draws the figures of the docs (into a temp dir), each
    committed under docs/figures/ and small (< 150 kB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    script = ROOT / "docs" / "figures" / "make_figures.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == 7, names
    for name in names:
        assert (tmp_path / name).stat().st_size > 10_000
        committed = ROOT / "docs" / "figures" / name
        assert committed.exists(), f"docs/figures/{name} is not committed"
        assert committed.stat().st_size < 150_000, name
        assert name in "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md")), name


def test_mkdocs_build_strict(tmp_path):
    """The documentation site builds with `mkdocs build --strict` (no broken links, no warnings
    from mkdocstrings about the docstrings)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert out.returncode == 0, out.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "em" / "index.html").exists()
