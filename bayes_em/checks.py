"""Checks run once before a fit: enumeration size and structure, density at the start, and
the memory of the compiled fit.

Memory is checked twice. Before compiling, `check_enumeration` refuses an enumeration
whose log-factors alone (one copy, from their traced shapes, shared over the devices of a
sharded fit) exceed the limit: compiling a program of hundreds of GB can itself take long or
fail. After compiling, `check_compiled_memory` reads XLA's own memory analysis of the
fit (arguments, outputs and temporaries per device: what the run will allocate) before it
runs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bayes_em import problem as core
from bayes_em.sites import ModelError

__all__ = ["check_enumeration", "check_compiled_memory", "check_initial_density"]

# the pre-check's lower bound: the log-factors once (XLA's analysis counts their weights, the Q
# evaluation and the contraction's intermediates exactly, after compiling)
_COPIES = 1


def _abstract_factors(problem, params, data):
    """Shapes of the enumerated log-factors the fit builds (a soft fit evaluates a homogeneous
    chain's transition once, not at every step), found without allocating them."""
    try:
        fs = jax.eval_shape(lambda p, d: core.factors(problem, p, d, not problem.hard), params,
                            data)
    except ValueError as err:
        if "Ran out of free dims" in str(err):
            raise ModelError(
                f"Too many enumerated latent sites outside plates ({len(problem.sites.latents)}: "
                f"{list(problem.sites.latents)}): each needs its own tensor dimension. Put "
                "independent latents in a numpyro.plate, or chain them with "
                "NumPyro's scan / markov (numpyro.contrib.control_flow)."
            ) from err
        raise
    return fs.logs, fs.metas


def check_enumeration(problem, params, data, memory_limit, devices: int = 1):
    """Refuse an enumeration whose log-factors (shared over `devices`) exceed
    `memory_limit` bytes, naming the sites that blow it up; refuse continuous sites whose
    density depends on an enumerated latent. Returns the estimate in bytes."""
    shapes, metas = _abstract_factors(problem, params, data)
    latents = set(problem.sites.latents)
    for meta in metas:
        if meta.name in problem.sites.param_names:
            parents = sorted({n for _, n in meta.dim_to_name} & latents)
            if parents:
                raise ModelError(
                    f"Continuous site '{meta.name}' depends on the discrete latent(s) {parents}: "
                    "EM point-estimates continuous sites as parameters, so they must not depend "
                    "on enumerated latents."
                )
    per_site = {
        m.name: _COPIES * math.prod(m.shape) * jnp.dtype(shapes[m.name].dtype).itemsize
        for m in metas
    }
    total = sum(per_site.values()) / devices
    if total > memory_limit:
        raise MemoryError(
            f"Enumerating the latents needs at least {total / 2**30:.2f} GiB"
            f"{' per device' if devices > 1 else ''} for the log-factors alone, over the "
            f"memory_limit of {memory_limit / 2**30:.2f} GiB. Largest sites: "
            f"{_largest(per_site, metas)}. Reduce the number of latents a site depends on, "
            "fit the data plate in chunks of rows (EM(chunk_size=C): memory O(C), "
            "docs/scale.md), shard the data over more devices, or raise "
            "EM(memory_limit=...)."
        )
    return total


def _largest(per_site, metas, n=3):
    worst = sorted(per_site, key=per_site.get, reverse=True)[:n]
    return ", ".join(
        f"'{name}' {per_site[name] / 2**20:.0f} MiB over dims {_dims(metas, name)}"
        for name in worst)


def check_compiled_memory(compiled, memory_limit, problem, params, data):
    """Refuse a compiled fit (`jit(...).lower(...).compile()`) whose memory by XLA's own
    analysis, per device (arguments + outputs + temporaries), exceeds `memory_limit`,
    saying which part dominates and naming the largest enumerated sites. Returns the analysis
    as a dict of bytes (empty where the backend gives none)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    parts = {
        "temporaries (the enumerated log-factors, their E-step weights and the contraction's "
        "intermediates)": stats.temp_size_in_bytes,
        "arguments (the data and the start)": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes - stats.alias_size_in_bytes,
    }
    total = sum(parts.values())
    if total > memory_limit:
        shapes, metas = _abstract_factors(problem, params, data)
        per_site = {m.name: math.prod(m.shape) * jnp.dtype(shapes[m.name].dtype).itemsize
                    for m in metas}
        detail = ", ".join(f"{k} {v / 2**30:.3f} GiB"
                           for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        raise MemoryError(
            f"The compiled fit needs {total / 2**30:.2f} GiB per device by XLA's memory analysis, "
            f"over the memory_limit of {memory_limit / 2**30:.2f} GiB: {detail}. Largest "
            f"enumerated sites (one copy): {_largest(per_site, metas)}. Reduce the number of "
            "latents a site depends on, or the restarts; fit the data plate in chunks of "
            "rows (EM(chunk_size=C): memory O(C), docs/scale.md); shard the data over more "
            "devices (docs/distributed.md); or raise EM(memory_limit=...)."
        )
    return {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
            "temp": stats.temp_size_in_bytes, "alias": stats.alias_size_in_bytes, "total": total}


def _dims(metas, name):
    meta = next(m for m in metas if m.name == name)
    return [f"{n}={meta.shape[d]}" for d, n in meta.dim_to_name]


def check_initial_density(problem, objective, params, data):
    """Raise if `objective` = log p(X|θ_0) + log p(θ_0) is not finite, naming the sites
    responsible (found by an eager evaluation of the log-factors, on this failure path only)."""
    if np.isfinite(np.asarray(objective)):
        return
    # reduced on the devices: only booleans come to the host (the factors may be sharded)
    arrays = core.factors(problem, params, data).logs
    bad = [f"'{k}' (NaN or +inf)" for k, a in arrays.items()
           if bool(jnp.any(jnp.isnan(a) | jnp.isposinf(a)))]
    if not bad:
        bad = [f"'{k}' (zero density)" for k, a in arrays.items() if bool(jnp.any(jnp.isneginf(a)))]
    args, kwargs = problem.rebuild(data)
    leaves = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
    nan_args = [jax.tree_util.keystr(path[1:]) or "an argument" for path, leaf in leaves
                if isinstance(leaf, (np.ndarray, jax.Array))
                and jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all())]
    hint = (f" Model argument(s) {', '.join(nan_args)} hold NaN or infinite values: a covariate "
            "cannot be missing (only observed sites listed in missing= can)." if nan_args else "")
    raise ModelError(
        f"The log-density at the initial values is not finite ({float(objective)}); "
        f"sites: {', '.join(bad) or 'unknown'}. Check the initial values and the data.{hint}"
    )
