"""Additive statistics: the closed-form plans' expected sufficient statistics in a form that
reads no θ, so that they add across rows, chunks and batches computed at different θ.

For a data plate whose rows are independent given θ,

    s = Σ_rows E[t(x, z) | x, θ_t]        (raw statistics: counts, Σ w x, Σ w n, ...)
    θ_{t+1} = M(s)                          (each plan's ML / conjugate MAP mode, in order)

For Gaussian locations and scales the raw statistics are
[`GaussianPair`][bayes_em.gaussian_pair.GaussianPair]'s Σ w, Σ w (x − c), Σ w (x − c)(x − c)ᵀ
about a reference c per location row, mapped to the batch M-step's own statistics at the
current θ by `m_step` (ECM: a covariance at the new location), so that one pass over the data
gives the whole closed-form M-step. In float64 a multivariate location's reference is one
shared centre (c: a mean of data rows), which turns the statistics into matrix products of the
weights with x and x ⊗ x (no rows × components × D intermediate); in float32 each location row
is its own reference (distances formed entry by entry, see `bayes_em.gaussian`).

Used by chunked EM (`bayes_em.chunked`: one pass per iteration) and online EM
(`bayes_em.online`: running averages of the statistics).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayes_em.conjugate import plan_index, plan_stats, plan_value
from bayes_em.families import FAMILIES, site_weight
from bayes_em.gaussian import exact_distances
from bayes_em.gaussian_pair import GaussianPair, shift_moments

__all__ = ["Layout", "layout", "references", "stats", "recentre", "m_step"]

_LOCS = ("normal_loc", "mvn_loc")
_SPREADS = ("normal_scale", "mvn_cov", "mvn_tril")


class Group(NamedTuple):
    """Gaussian sites sharing a location plan and a scale / covariance plan (either may be
    None: not fitted)."""

    sites: tuple
    loc: Any
    spread: Any
    multivariate: bool

    @property
    def key(self) -> str:
        return "|".join(p.param if p is not None else "" for p in (self.loc, self.spread))


class Layout(NamedTuple):
    """Which statistics a problem's closed-form plans need."""

    closed: tuple  # the plans, in update order
    simple: tuple  # plans whose statistics read no θ (Family.raw_stats)
    groups: tuple  # of Group: Gaussian location / spread plans (GaussianPair)


def rows(value, event_ndim):
    """`value` with its batch dims flattened into one leading axis of rows."""
    shape = jnp.shape(value)
    lead = len(shape) - event_ndim
    return jnp.reshape(value, (int(np.prod(shape[:lead])),) + tuple(shape[lead:]))


def layout(closed: tuple) -> Layout:
    """The statistics of the plans `closed`; raises ValueError (naming the site) where a
    plan has no additive form."""
    by_site, simple = {}, []
    for plan in closed:
        if plan.family in _LOCS + _SPREADS:
            role = "loc" if plan.family in _LOCS else "spread"
            for s in plan.sites:
                by_site.setdefault(s, {})[role] = plan
        elif not FAMILIES[plan.family].raw:
            raise ValueError(f"the closed form of '{plan.param}' ({plan.family}) has no "
                             "additive statistics")
        else:
            simple.append(plan)
    groups = {}
    for s, roles in by_site.items():
        loc, spread = roles.get("loc"), roles.get("spread")
        mv = (loc or spread).family not in ("normal_loc", "normal_scale")
        if mv and spread is None:
            raise ValueError(f"site '{s}' has its location '{loc.param}' fitted but a "
                             "covariance that is not: no additive statistics (fit the "
                             "covariance too)")
        key = (loc and loc.param, spread and spread.param)
        sites = groups[key].sites if key in groups else ()
        groups[key] = Group(sites + (s,), loc, spread, mv)
    return Layout(tuple(closed), tuple(simple), tuple(groups.values()))


def _shared_centre(group: Group, params) -> bool:
    return group.multivariate and not exact_distances(jnp.result_type(params[group.loc.param]))


def references(lay: Layout, params, tr) -> dict:
    """Location param -> its reference rows: one shared centre (the mean of the group's data
    rows in the trace `tr`) for a float64 multivariate location, else θ's location rows."""
    out = {}
    for g in lay.groups:
        if g.loc is None or g.loc.param in out:
            continue
        value = params[g.loc.param]
        if _shared_centre(g, params):
            x = jnp.asarray(tr[g.sites[0]]["value"], jnp.result_type(value))
            out[g.loc.param] = jnp.mean(x.reshape(-1, x.shape[-1]), axis=0)[None]
        else:
            out[g.loc.param] = rows(value, FAMILIES[g.loc.family].event_ndim)
    return out


def stats(problem, lay: Layout, params, weights, reference, args, kwargs, tr) -> dict:
    """The raw statistics of the rows in trace `tr` (the model on `args` / `kwargs` at θ =
    `params`) under the E-step `weights`: plan (or group key) -> {name: array}."""
    out = {plan.param: plan_stats(problem, plan, params, weights, args, kwargs, tr, raw=True)
           for plan in lay.simple}
    for g in lay.groups:
        total = None
        for s in g.sites:
            base, w = site_weight(tr[s], weights[s])
            il, nl = (plan_index(problem, g.loc, params, args, kwargs, s) if g.loc
                      else (None, 0))
            js, ns = (plan_index(problem, g.spread, params, args, kwargs, s) if g.spread
                      else (None, 0))
            ref = reference[g.loc.param] if g.loc else None
            st = GaussianPair(g.multivariate).raw_stats(base, tr[s]["value"], w, il, nl, ref,
                                                        js, ns)
            total = st if total is None else jax.tree.map(jnp.add, total, st)
        out[g.key] = total
    return out


def recentre(lay: Layout, st: dict, old: dict, new: dict) -> dict:
    """Raw statistics about the references `old` moved to `new` (location param -> rows):
    with δ = c_old − c_new, Σ w (x − c_new) = s1 + s0 δ and
    Σ w (x − c_new)(x − c_new)ᵀ = s2 + s1 δᵀ + δ s1ᵀ + s0 δ δᵀ (squares for a Normal)."""
    st = dict(st)
    for g in lay.groups:
        if g.loc is None or g.loc.param not in old:
            continue
        s0, s1, s2 = (st[g.key][k] for k in ("s0", "s1", "s2"))
        d = (old[g.loc.param] - new[g.loc.param])[:, None]  # (rows_loc or 1, 1) + event
        s1, moved = shift_moments(s0, s1, 0.0, d, g.multivariate)
        s2 = s2 + jnp.sum(moved, axis=0)  # s2 is summed over the location rows
        st[g.key] = {**st[g.key], "s1": s1, "s2": s2}
    return st


def _precision(g: Group, params):
    """The precision of each scale / covariance row of group `g` (a pseudo row: 1)."""
    if g.spread is None:
        return jnp.ones((1,), jnp.result_type(params[g.loc.param]))
    value = params[g.spread.param]
    if g.spread.family == "normal_scale":
        return 1.0 / jnp.square(rows(value, 0))
    r = rows(value, 2)
    if g.spread.family == "mvn_tril":
        r = r @ jnp.swapaxes(r, -1, -2)
    return jnp.linalg.inv(r)


def _plan_stats(lay: Layout, plan, params, st, reference):
    """The batch M-step's statistics of `plan` at the current θ from the raw ones."""
    if plan.family in _LOCS:
        return [GaussianPair(g.multivariate).loc_stats(
            st[g.key], reference[plan.param],
            rows(params[plan.param], FAMILIES[plan.family].event_ndim), _precision(g, params))
            for g in lay.groups if g.loc is not None and g.loc.param == plan.param]
    if plan.family not in _SPREADS:
        return [st[plan.param]]
    parts = []
    for g in lay.groups:
        if g.spread is None or g.spread.param != plan.param:
            continue
        s = st[g.key]
        if g.loc is None:
            ref = loc = jnp.zeros((1,) + s["s1"].shape[2:], s["s1"].dtype)
        else:
            ref = reference[g.loc.param]
            loc = rows(params[g.loc.param], FAMILIES[g.loc.family].event_ndim)
        parts.append(GaussianPair(g.multivariate).spread_stats(s, ref, loc))
    return parts


def m_step(lay: Layout, params, st, reference, priors) -> dict:
    """θ from the raw statistics `st`: each plan's mode, in the batch M-step's order (a scale
    or covariance at the new location); `priors`: plan param -> its prior (or absent)."""
    params = dict(params)
    for plan in lay.closed:
        parts = _plan_stats(lay, plan, params, st, reference)
        total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts)
        new = plan_value(plan, params[plan.param], total, priors.get(plan.param))
        params[plan.param] = new.astype(jnp.result_type(params[plan.param]))
    return params
