"""Label switching: the values of a latent (mixture components, HMM states) can be permuted
together with the parameter rows they select, leaving the fit unchanged; restarts then reach
the same optimum under different labels, and pooled summaries (R-hat across restarts) read them
as different. [`align_restarts`][bayes_em.relabel.align_restarts] relabels every restart to match
the best one.

A relabelling is only applied where it is a symmetry of this model: a permutation of the
latent's K values applied to the candidate parameter axes must leave log p(X|θ) + log p(θ)
unchanged at the best restart (checked for two permutations). The candidates are, in turn,
every axis of size K of every parameter (an HMM's transition matrix has two), then the leading
axis only (a mixture whose dimension D happens to equal K).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from bayes_em import diagnostics

__all__ = ["symmetries", "align_restarts"]


def _latent_sizes(result) -> dict:
    """{latent: number of values} from the static factor layout."""
    sizes = {}
    for meta in diagnostics._metas(result):
        if meta.name in result.sites.latents and meta.name in meta.names:
            sizes[meta.name] = meta.shape[meta.names[meta.name]]
    return sizes


def _permute(params, axes, perm):
    """`params` with every axis in `axes` ({site: axes}) reordered by `perm`."""
    out = dict(params)
    for name, ax in axes.items():
        v = np.asarray(out[name])
        for a in ax:
            v = np.take(v, perm, axis=a)
        out[name] = v
    return out


def _invariant(result, params, axes, k, rtol=1e-9):
    objective = diagnostics._functions(result).objective

    def value(p):
        return float(objective(_flat(result, p), result.data))

    base = value(params)
    tests = [np.roll(np.arange(k), 1), np.r_[1, 0, np.arange(2, k)]] if k > 2 else [[1, 0]]
    return all(abs(value(_permute(params, axes, np.asarray(t))) - base)
               <= rtol * max(1.0, abs(base)) for t in tests)


def _flat(result, params):
    from jax.flatten_util import ravel_pytree

    u = diagnostics.core.unconstrain(result.problem, {k: jnp.asarray(v)
                                                      for k, v in params.items()})
    return ravel_pytree(u)[0]


def symmetries(result) -> dict:
    """{latent: {site: axes}}: for each latent, the parameter axes whose joint permutation with
    the latent's values is a symmetry of the fit (latents without one are left out)."""
    best = {k: np.asarray(v[result.best_restart]) for k, v in result.restart_params.items()}
    found = {}
    for latent, k in _latent_sizes(result).items():
        if k < 2:
            continue
        every = {n: tuple(a for a, s in enumerate(np.shape(v)) if s == k)
                 for n, v in best.items()}
        leading = {n: (0,) for n, v in best.items() if np.ndim(v) and np.shape(v)[0] == k}
        for axes in ({n: a for n, a in every.items() if a}, leading):
            if axes and _invariant(result, best, axes, k):
                found[latent] = axes
                break
    return found


def _match(rows_r, rows_best, scale):
    """The permutation p with restart row p[j] playing the best restart's row j."""
    cost = sum(np.sum(((a[:, None] - b[None]) / s) ** 2, axis=-1)
               for a, b, s in zip(rows_r, rows_best, scale))
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(rows)
    perm[cols] = rows
    return perm


def align_restarts(result, by: str | None = None):
    """`result` with every restart's parameters relabelled (per latent with a symmetry, see
    [`symmetries`][bayes_em.relabel.symmetries]) to match the best restart's labels, by the
    assignment that minimises the scaled squared distance between parameter rows. Objectives are
    unchanged (checked).

    `by`: a parameter site (e.g. `"loc"`); the best restart's values are then ordered too,
    ascending by that site's rows (lexicographically): a canonical order that does not depend on
    the start, applied to every restart, to `params` and to `posterior` /
    `most_probable`."""
    found = symmetries(result)
    if not found:
        if by is not None:
            raise ValueError(f"relabel(by={by!r}): the model has no latent whose values can be "
                             "permuted with the parameter rows they select.")
        return result
    params = {k: np.array(v) for k, v in result.restart_params.items()}
    best = result.best_restart
    orders = {}
    for latent, axes in found.items():
        names = sorted(axes)

        def rows(r):
            return [np.moveaxis(params[n][r], axes[n][0], 0).reshape(
                np.shape(params[n][r])[axes[n][0]], -1) for n in names]

        scale = [np.std(np.stack([rows(r)[i] for r in range(result.n_restarts)]), axis=(0, 1))
                 + 1e-12 for i in range(len(names))]
        canonical = _canonical(params, axes, best, by)
        perms = [canonical if r == best else _match(rows(r), rows(best), scale)[canonical]
                 for r in range(result.n_restarts)]  # all from the unpermuted rows
        for r, perm in enumerate(perms):
            one = _permute({n: params[n][r] for n in names}, axes, perm)
            for n in names:
                params[n][r] = one[n]
        if not np.array_equal(canonical, np.arange(len(canonical))):
            orders[latent] = canonical
    best_params = {k: jnp.asarray(v[best]) for k, v in params.items()}
    return dataclasses.replace(result, restart_params=params, params=best_params,
                               latents=_relabelled_latents(result, orders),
                               _cache={k: v for k, v in result._cache.items()
                                       if k != "latents" or not orders})


def _canonical(params, axes, best, by):
    """The order of the best restart's values ascending by site `by`'s rows (identity when
    `by` is None)."""
    k = np.shape(params[next(iter(axes))][best])[axes[next(iter(axes))][0]]
    if by is None:
        return np.arange(k)
    if by not in axes:
        raise ValueError(f"relabel(by={by!r}): '{by}' is not a site whose rows the latent "
                         f"selects ({sorted(axes)}).")
    rows = np.moveaxis(params[by][best], axes[by][0], 0).reshape(k, -1)
    return np.lexsort(rows.T[::-1])


def _relabelled_latents(result, orders):
    """The result's `latents` with the values of each reordered latent permuted: posterior
    columns reordered, most probable values mapped to their new labels."""
    if not orders:
        return result.latents

    def latents():
        posterior, mode = result.latents()
        posterior, mode = dict(posterior), dict(mode)
        for latent, perm in orders.items():
            inverse = np.argsort(perm)
            if latent in posterior:
                posterior[latent] = np.asarray(posterior[latent])[..., perm]
                mode[latent] = inverse[np.asarray(mode[latent])]
        return posterior, mode

    return latents
