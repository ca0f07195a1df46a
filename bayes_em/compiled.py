"""`jit` with the compiler settings bayes_em's programs are measured fastest under, and JAX's
persistent compilation cache in one call (`compilation_cache`).

On CPU, XLA's classic loop emitters (`xla_cpu_use_fusion_emitters=False`) compile a fit's
program about 40% faster than its newer MLIR fusion emitters, with equal or better run time
(`benchmarks/README.md`). Other backends keep XLA's defaults, and so does a jaxlib that no
longer knows the option (checked once per process on a trivial program: the option is private).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

__all__ = ["jit", "compilation_cache", "CACHE_ENV"]

# environment variable: a directory for JAX's persistent compilation cache, set at import
CACHE_ENV = "BAYES_EM_COMPILATION_CACHE"

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
    """`jax.jit(fn, **kwargs)`, plus the CPU compiler options above when JAX's default backend
    is the CPU and the running jaxlib accepts them (a top-level jit only: JAX refuses compiler
    options on nested jits)."""
    if jax.default_backend() == "cpu" and _accepted(tuple(sorted(_CPU_OPTIONS.items()))):
        kwargs.setdefault("compiler_options", _CPU_OPTIONS)
    return jax.jit(fn, **kwargs)


def compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Keep compiled fits on disk, so that a new process with the same model, data shapes and
    settings loads them instead of compiling (JAX's persistent compilation cache). Programs
    compiled in under a second are kept too (JAX's default keeps only slower ones).

    `path` defaults to `$BAYES_EM_COMPILATION_CACHE`, else `~/.cache/bayes_em/jax`; it is
    created if needed. Setting `BAYES_EM_COMPILATION_CACHE` in the environment enables the
    cache when bayes_em is imported. Returns the directory used.
    """
    path = path or os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "bayes_em", "jax")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
