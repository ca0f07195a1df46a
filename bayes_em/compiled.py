"""``jit`` with the compiler settings bayes_em's programs are measured fastest under.

On CPU, XLA's classic loop emitters (``xla_cpu_use_fusion_emitters=False``) compile a fit's
program about 40% faster than its newer MLIR fusion emitters, with equal or better run time
(``benchmarks/README.md``). Other backends keep XLA's defaults, and so does a jaxlib that no
longer knows the option (checked once per process on a trivial program: the option is private).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["jit"]

_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def _accepted(options: tuple) -> bool:
    """Does this jaxlib compile with these options? (A private XLA flag may be dropped.)"""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options))(jnp.zeros(1)).block_until_ready()
        return True
    except Exception:  # an unknown option: INVALID_ARGUMENT from the compiler
        return False


def jit(fn, **kwargs):
    """``jax.jit(fn, **kwargs)``, plus the CPU compiler options above when JAX's default backend
    is the CPU and the running jaxlib accepts them (a top-level jit only: JAX refuses compiler
    options on nested jits)."""
    if jax.default_backend() == "cpu" and _accepted(tuple(sorted(_CPU_OPTIONS.items()))):
        kwargs.setdefault("compiler_options", _CPU_OPTIONS)
    return jax.jit(fn, **kwargs)
