"""Checks run once before a fit: enumeration size and structure, density at the start."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bayes_em import problem as core
from bayes_em.sites import ModelError

__all__ = ["check_enumeration", "check_initial_density"]

# log-factors, their weights, the Q evaluation and the contraction's intermediates
_COPIES = 4


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


def check_enumeration(problem, params, data, memory_limit):
    """Refuse an enumeration larger than ``memory_limit`` bytes, naming the sites that blow it up;
    refuse continuous sites whose density depends on an enumerated latent."""
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
    total = sum(per_site.values())
    if total > memory_limit:
        worst = sorted(per_site, key=per_site.get, reverse=True)[:3]
        detail = ", ".join(
            f"'{n}' {per_site[n] / 2**20:.0f} MiB over dims {_dims(metas, n)}" for n in worst
        )
        raise MemoryError(
            f"Enumerating the latents needs about {total / 2**30:.2f} GiB, over the "
            "memory_limit of "
            f"{memory_limit / 2**30:.2f} GiB. Largest sites: {detail}. Reduce the number of "
            "latents a site depends on, or raise EM(memory_limit=...)."
        )
    return total


def _dims(metas, name):
    meta = next(m for m in metas if m.name == name)
    return [f"{n}={meta.shape[d]}" for d, n in meta.dim_to_name]


def check_initial_density(problem, objective, params, data):
    """Raise if ``objective`` = log p(X|θ_0) + log p(θ_0) is not finite, naming the sites
    responsible (found by an eager evaluation of the log-factors, on this failure path only)."""
    if np.isfinite(np.asarray(objective)):
        return
    arrays = core.factors(problem, params, data).logs
    bad = [f"'{k}' (NaN or +inf)" for k, a in arrays.items()
           if np.isnan(a).any() or np.isposinf(a).any()]
    if not bad:
        bad = [f"'{k}' (zero density)" for k, a in arrays.items() if np.isneginf(a).any()]
    args, kwargs = problem.rebuild(data)
    leaves = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
    nan_args = [jax.tree_util.keystr(path[1:]) or "an argument" for path, leaf in leaves
                if isinstance(leaf, (np.ndarray, jax.Array))
                and jnp.issubdtype(leaf.dtype, jnp.inexact) and not np.isfinite(leaf).all()]
    hint = (f" Model argument(s) {', '.join(nan_args)} hold NaN or infinite values: a covariate "
            "cannot be missing (only observed sites listed in missing= can)." if nan_args else "")
    raise ModelError(
        f"The log-density at the initial values is not finite ({float(objective)}); "
        f"sites: {', '.join(bad) or 'unknown'}. Check the initial values and the data.{hint}"
    )
