"""bayes_em.compilation_cache and its environment variable: compiled fits land on disk, and a
process that finds them gives the same fit."""

import json
import os
import subprocess
import sys

import jax
import pytest

import bayes_em

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpyro, numpyro.distributions as dist
from numpyro.distributions import constraints
from bayes_em import EM

def three_coins(y):
    pi = numpyro.param("pi", 0.4, constraint=constraints.unit_interval)
    p = numpyro.param("p", 0.6, constraint=constraints.unit_interval)
    q = numpyro.param("q", 0.7, constraint=constraints.unit_interval)
    with numpyro.plate("tosses", y.shape[0]):
        a = numpyro.sample("a", dist.Bernoulli(pi))
        numpyro.sample("y", dist.Bernoulli(jnp.where(a == 1, p, q)), obs=y)

y = jnp.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=jnp.float64)
r = EM(three_coins, tol=1e-10, progress_bar=False).run(jax.random.PRNGKey(0), y)
print(json.dumps({k: float(v) for k, v in r.params.items()}
                 | {"cache": jax.config.jax_compilation_cache_dir}))
"""


def run_child(env):
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_environment_variable_puts_compiled_fits_on_disk(tmp_path):
    cache = tmp_path / "jax-cache"
    env = {**os.environ, bayes_em.compiled.CACHE_ENV: str(cache),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = run_child(env)
    assert first["cache"] == str(cache)
    entries = set(cache.iterdir())
    assert entries  # the compiled programs
    # Li Hang's three-coin example from these starts: π = 0.4064, p = 0.5368, q = 0.6432
    assert [first[k] for k in ("pi", "p", "q")] == pytest.approx([0.4064, 0.5368, 0.6432],
                                                                 abs=1e-4)
    second = run_child(env)  # finds the programs on disk: the same fit, nothing new compiled
    assert [second[k] for k in ("pi", "p", "q")] == [first[k] for k in ("pi", "p", "q")]
    assert set(cache.iterdir()) == entries


def test_compilation_cache_defaults_and_creates_the_directory(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(bayes_em.compiled.CACHE_ENV, str(tmp_path / "from-env"))
    try:
        assert bayes_em.compilation_cache() == str(tmp_path / "from-env")
        assert (tmp_path / "from-env").is_dir()
        assert bayes_em.compilation_cache(tmp_path / "given") == str(tmp_path / "given")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
