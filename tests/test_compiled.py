"""The private XLA options of bayes_em.compiled fall back to XLA's defaults when a jaxlib does
not know them (issue 16); small programs are compiled quick (issue 17)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em import EM, compiled


def three_coins(y):
    pi = numpyro.param("pi", 0.4, constraint=constraints.unit_interval)
    p = numpyro.param("p", 0.6, constraint=constraints.unit_interval)
    q = numpyro.param("q", 0.7, constraint=constraints.unit_interval)
    with numpyro.plate("tosses", y.shape[0]):
        a = numpyro.sample("a", dist.Bernoulli(pi))
        numpyro.sample("y", dist.Bernoulli(jnp.where(a == 1, p, q)), obs=y)


def test_unknown_compiler_option_falls_back(monkeypatch):
    monkeypatch.setattr(compiled, "_CPU_OPTIONS", {"xla_no_such_option_for_bayes_em": True})
    f = compiled.jit(lambda x: 2 * x)
    assert float(f(jnp.ones(()))) == 2.0
    assert not compiled._accepted((("xla_no_such_option_for_bayes_em", True),))


def test_known_option_is_used_on_cpu():
    if jax.default_backend() == "cpu":
        assert compiled._accepted(tuple(sorted(compiled._CPU_OPTIONS.items())))


def test_quick_is_decided_by_bytes():
    small = np.zeros(10)
    assert compiled.quick(small, 100)
    assert not compiled.quick(np.zeros(compiled.QUICK_BYTES // 8))
    assert not compiled.quick(compiled.QUICK_BYTES)
    assert compiled.quick()


def test_quick_programs_skip_llvm_optimisation_on_cpu():
    f = compiled.jit(lambda x: 2 * x, quick=True)
    assert float(f(jnp.ones(()))) == 2.0
    if jax.default_backend() == "cpu" and compiled._accepted(
            tuple(sorted({**compiled._CPU_OPTIONS, **compiled._QUICK_OPTIONS}.items()))):
        assert compiled._cpu_options(True) == {**compiled._CPU_OPTIONS, **compiled._QUICK_OPTIONS}
        assert compiled._cpu_options(False) == compiled._CPU_OPTIONS


def test_quick_and_optimised_fits_agree(monkeypatch):
    """A small fit compiled quick (no LLVM optimisation) and the same fit compiled optimised
    reach the same optimum (to round-off: the code differs, not the arithmetic asked for)."""
    y = jnp.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=jnp.float64)
    quick = EM(three_coins, tol=1e-10, progress_bar=False).run(jax.random.PRNGKey(0), y)
    monkeypatch.setattr(compiled, "QUICK_BYTES", 0)
    slow = EM(three_coins, tol=1e-10, progress_bar=False).run(jax.random.PRNGKey(0), y)
    assert quick.n_iter == slow.n_iter
    for k in quick.params:
        np.testing.assert_allclose(quick.params[k], slow.params[k], rtol=1e-9)


def test_large_is_decided_by_bytes():
    assert compiled.large(np.zeros(compiled.LARGE_BYTES // 8))
    assert compiled.large(compiled.LARGE_BYTES // 2, compiled.LARGE_BYTES // 2)
    assert not compiled.large(np.zeros(compiled.LARGE_BYTES // 8 - 1))
    assert not compiled.large()


def test_large_and_classic_fits_agree(monkeypatch):
    """A fit compiled with XLA's default CPU emitters (large) and with the classic ones reach
    the same optimum (to round-off), and the large one is compiled without bayes_em's options."""
    y = jnp.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1] * 50, dtype=jnp.float64)
    classic = EM(three_coins, tol=1e-10, progress_bar=False).run(jax.random.PRNGKey(0), y)
    seen = []
    real_jit = jax.jit

    def jit(fn, **kw):
        seen.append(kw.get("compiler_options"))
        return real_jit(fn, **kw)

    monkeypatch.setattr(compiled.jax, "jit", jit)
    monkeypatch.setattr(compiled, "LARGE_BYTES", 0)
    large = EM(three_coins, tol=1e-10, progress_bar=False).run(jax.random.PRNGKey(0), y)
    assert None in seen  # the fit's program: XLA's defaults
    assert classic.n_iter == large.n_iter
    for k in classic.params:
        np.testing.assert_allclose(classic.params[k], large.params[k], rtol=1e-9)


def test_programs_for_the_classic_emitters_are_traced_as_such():
    """`classic_emitters()` is True while a program compiled with the classic emitters is
    traced (so the E-step keeps its exp out of place), False for a large one and outside."""
    seen = []

    def double(x):
        seen.append(compiled.classic_emitters())
        return 2 * x

    compiled.jit(double)(jnp.ones(()))
    compiled.jit(double, large=True)(jnp.ones(()))
    classic = jax.default_backend() == "cpu" and compiled._accepted(
        tuple(sorted(compiled._CPU_OPTIONS.items())))
    assert seen == [classic, False]
    assert not compiled.classic_emitters()
