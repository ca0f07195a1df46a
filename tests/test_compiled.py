"""The private XLA option of bayes_em.compiled falls back to XLA's defaults when a jaxlib does
not know it (issue 16)."""

import jax
import jax.numpy as jnp

from bayes_em import compiled


def test_unknown_compiler_option_falls_back(monkeypatch):
    monkeypatch.setattr(compiled, "_CPU_OPTIONS", {"xla_no_such_option_for_bayes_em": True})
    f = compiled.jit(lambda x: 2 * x)
    assert float(f(jnp.ones(()))) == 2.0
    assert not compiled._accepted((("xla_no_such_option_for_bayes_em", True),))


def test_known_option_is_used_on_cpu():
    if jax.default_backend() == "cpu":
        assert compiled._accepted(tuple(sorted(compiled._CPU_OPTIONS.items())))
