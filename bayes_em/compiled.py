"""`jit` with the compiler settings bayes_em's programs are measured fastest under, and JAX's
persistent compilation cache in one call (`compilation_cache`).

On CPU, XLA's classic loop emitters (`xla_cpu_use_fusion_emitters=False`) compile a fit's
program 20–40% faster than its newer fusion emitters. But where an elementwise loop writes
in place over its input (the E-step's exp of the log-weights, in every block of rows), the
classic emitters' code checks the two buffers for overlap at run time and, finding it, runs
its scalar loop: a float64 Gaussian-mixture iteration at N = 1e6 is 15–50% slower under them.
So a *large* fit (see `large`) keeps XLA's default emitters, the others the classic ones
(their traces keep the mixture's exp out of place: `classic_emitters`,
`bayes_em.contraction.log_sum_exp`), and
a *quick* program (a small fit, see `quick`) is compiled without LLVM's optimisation passes
(`xla_backend_optimization_level=0`): less than half the compile time, for a run time that
stays in milliseconds at its size (`benchmarks/README.md`). Other backends keep XLA's
defaults, and so does a jaxlib that no longer knows an option (checked once per process on a
trivial program: the options are private).
"""

from __future__ import annotations

import contextvars
import functools
import os

import jax
import numpy as np

__all__ = ["jit", "quick", "large", "classic_emitters", "compilation_cache", "CACHE_ENV",
           "QUICK_BYTES", "LARGE_BYTES"]

# environment variable: a directory for JAX's persistent compilation cache, set at import
CACHE_ENV = "BAYES_EM_COMPILATION_CACHE"

_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
_QUICK_OPTIONS = {"xla_backend_optimization_level": 0}

# a fit whose work per iteration (bytes of its enumerated log-factors, times the restarts, plus
# its data) is below this is compiled quick: unoptimised code costs it a few times more per
# iteration, microseconds at this size, against ~0.2 s of compilation saved; an HMM of 1000
# steps (sequential, hundreds of iterations in hmm.py) stays above it
QUICK_BYTES = 2**14
# a fit whose work per iteration (counted as for QUICK_BYTES) is at least this keeps XLA's
# default CPU emitters: their run time saves more than their extra compile time (~0.5 s) over
# tens of iterations (a float64 D = 8, K = 16 mixture from ~2.6e5 rows)
LARGE_BYTES = 2**25

# set while a program for the classic emitters is traced (`classic_emitters`)
_CLASSIC = contextvars.ContextVar("bayes_em_classic_emitters", default=False)


def classic_emitters() -> bool:
    """Whether the program being traced is compiled, not quick, with the classic emitters
    (code that would rather not write an elementwise result over its input: see the module's
    docstring)."""
    return _CLASSIC.get()


@functools.cache
def _accepted(options: tuple) -> bool:
    """Does this jaxlib compile with these options? (A private XLA flag may be dropped.)"""
    try:
        # a NumPy argument and no run: the one program compiled is this one
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.zeros(1)).compile()
        return True
    except Exception:  # an unknown option: INVALID_ARGUMENT from the compiler
        return False


def _cpu_options(quick: bool) -> dict:
    """The options `jit` adds on CPU: all of them where the jaxlib takes them together (one
    trivial compilation), else each set it takes."""
    wanted = [_CPU_OPTIONS, _QUICK_OPTIONS] if quick else [_CPU_OPTIONS]
    merged = {k: v for options in wanted for k, v in options.items()}
    if _accepted(tuple(sorted({**_CPU_OPTIONS, **_QUICK_OPTIONS}.items()))):
        return merged
    return {k: v for options in wanted if _accepted(tuple(sorted(options.items())))
            for k, v in options.items()}


def _bytes(sizes) -> float:
    return sum(s if isinstance(s, (int, float, np.number)) else s.nbytes for s in sizes)


def quick(*sizes) -> bool:
    """Whether a program whose work is `sizes` (bytes, or arrays: their bytes; summed) is
    small enough to be compiled quick (`QUICK_BYTES`)."""
    return _bytes(sizes) < QUICK_BYTES


def large(*sizes) -> bool:
    """Whether a program whose work is `sizes` (as for `quick`) is large enough to keep XLA's
    default emitters (`LARGE_BYTES`)."""
    return _bytes(sizes) >= LARGE_BYTES


def jit(fn, quick: bool = False, large: bool = False, **kwargs):
    """`jax.jit(fn, **kwargs)`, plus the CPU compiler options above (`quick`: without LLVM's
    optimisation passes; `large`: none, XLA's defaults) when JAX's default backend is the CPU
    and the running jaxlib accepts them (a top-level jit only: JAX refuses compiler options on
    nested jits)."""
    if jax.default_backend() == "cpu" and not large:
        options = _cpu_options(bool(quick))
        if options:
            kwargs.setdefault("compiler_options", options)
            if options.get("xla_cpu_use_fusion_emitters") is False and not quick:
                fn = _traced_classic(fn)  # (a quick program's arrays are tiny)
    return jax.jit(fn, **kwargs)


def _traced_classic(fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        token = _CLASSIC.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _CLASSIC.reset(token)

    return traced


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
