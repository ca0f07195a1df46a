"""The code base is ruff-clean (line length 100, pyflakes, pycodestyle, import order: see
pyproject.toml); CI runs this with the rest of the suite."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "bayes_em", "tests",
                          "examples", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
