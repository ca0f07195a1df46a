"""``jit`` with the compiler settings bayes_em's programs are measured fastest under.

On CPU, XLA's classic loop emitters (``xla_cpu_use_fusion_emitters=False``) compile a fit's
program about 40% faster than its newer MLIR fusion emitters, with equal or better run time
(``benchmarks/README.md``). Other backends keep XLA's defaults.
"""

from __future__ import annotations

import jax

__all__ = ["jit"]

_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def jit(fn, **kwargs):
    """``jax.jit(fn, **kwargs)``, plus the CPU compiler options above when JAX's default backend
    is the CPU (a top-level jit only: JAX refuses compiler options on nested jits)."""
    if jax.default_backend() == "cpu":
        kwargs.setdefault("compiler_options", _CPU_OPTIONS)
    return jax.jit(fn, **kwargs)
