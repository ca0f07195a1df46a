"""Closed-form M-steps from expected sufficient statistics.

A parameter θ qualifies when its only use in the model is one distribution argument of one
observed or latent site, and that argument is a *selection* of θ (``loc[z]``, ``trans[z_prev]``,
``probs``, broadcasts): every entry of the argument is one entry (or one row / matrix) of θ. Then

    Q(θ) = Σ_e w_e log p(x_e | θ[idx_e])
      ⇒  θ_j = argmax Σ_{e: idx_e = j} w_e log p(x_e | θ_j) + log p(θ_j)

is the weighted ML / conjugate-MAP update of the family, from sufficient statistics reduced over
the broadcast dims and scattered onto θ along the index map ``idx``. The index map is found by
evaluating the argument at *coded* parameter values (row j set to j + 1), so it follows latent
and data indices without pattern-matching the model's source.

Supported (argument ← parameter constraint, prior for MAP):
    Categorical / Multinomial ``probs`` ← simplex rows, Dirichlet
    Bernoulli / Binomial ``probs`` ← unit interval, Beta
    Poisson ``rate`` / Exponential ``rate`` ← positive, Gamma
    Normal ``loc`` ← real, Normal;  Normal ``scale`` ← positive, InverseGamma (on the scale)
    MultivariateNormal ``loc`` ← real vectors;  ``covariance_matrix`` / ``scale_tril`` ← matrices
Everything else keeps the numeric M-step.
"""

from __future__ import annotations

import string
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.handlers import substitute

from bayes_em._numpyro import (
    covariance_was_given,
    mask_of,
    packed_trace,
    plate_to_enum_plate,
    validation_enabled,
)
from bayes_em.compiled import jit
from bayes_em.constraints import clip_eigenvalues, floor_of, positive_definite_floor
from bayes_em.dependence import dependence
from bayes_em.enumeration import is_plate_weight
from bayes_em.gaussian import exact_distances
from bayes_em.vectorized_scan import vectorize_scan

__all__ = ["ClosedForm", "detect_closed_forms", "closed_form_update"]


class ClosedForm(NamedTuple):
    """Plan for one parameter's closed-form update (static)."""

    param: str
    sites: tuple  # the sites whose argument selects the parameter (a scan: first step, rest)
    family: str  # key of _FAMILIES
    prior: str | None  # prior family of a MAP site, None for ML
    floor: float = 0.0  # a scale (σ ≥ c) or covariance (eigenvalues ≥ c) floor of the constraint


# family -> (base distribution types, argument attribute, event ndim of the argument, constraint)
_FAMILIES = {
    "categorical": ((dist.CategoricalProbs,), "probs", 1, constraints.simplex),
    "multinomial": ((dist.MultinomialProbs,), "probs", 1, constraints.simplex),
    "bernoulli": ((dist.BernoulliProbs,), "probs", 0, constraints.unit_interval),
    "binomial": ((dist.BinomialProbs,), "probs", 0, constraints.unit_interval),
    "poisson": ((dist.Poisson,), "rate", 0, constraints.positive),
    "exponential": ((dist.Exponential,), "rate", 0, constraints.positive),
    "normal_loc": ((dist.Normal,), "loc", 0, constraints.real),
    "normal_scale": ((dist.Normal,), "scale", 0, constraints.positive),
    "mvn_loc": ((dist.MultivariateNormal,), "loc", 1, constraints.real_vector),
    "mvn_cov": ((dist.MultivariateNormal,), "covariance_matrix", 2, constraints.positive_definite),
    "mvn_tril": ((dist.MultivariateNormal,), "scale_tril", 2, constraints.lower_cholesky),
}
# family -> prior distribution types with a conjugate closed-form mode
_PRIORS = {
    "categorical": (dist.Dirichlet,),
    "multinomial": (dist.Dirichlet,),
    "bernoulli": (dist.Beta,),
    "binomial": (dist.Beta,),
    "poisson": (dist.Gamma,),
    "exponential": (dist.Gamma,),
    "normal_loc": (dist.Normal,),
    "normal_scale": (dist.InverseGamma,),
    "mvn_loc": (),
    "mvn_cov": (dist.InverseWishart,),
    "mvn_tril": (),
}
# order of updates inside one M-step (conditional maximisation: locations before scales)
_ORDER = ["categorical", "multinomial", "bernoulli", "binomial", "poisson", "exponential",
          "normal_loc", "mvn_loc", "normal_scale", "mvn_cov", "mvn_tril"]


def _unwrap(fn):
    """Base distribution, mask and number of event dims reinterpreted by ``to_event``.

    The mask is aligned with the base distribution's batch shape: a mask above a ``to_event``
    gets trailing 1s for the reinterpreted dims; one below it (missing coordinates of a
    diagonal Gaussian) already covers them.
    """
    masks, reinterpreted = [], 0
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            if mask_of(fn) is not True and mask_of(fn) is not None:
                masks.append((jnp.asarray(mask_of(fn)), reinterpreted))
            fn = fn.base_dist
        elif isinstance(fn, dist.Independent):
            reinterpreted += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            break
    mask = None
    for m, above in masks:
        m = m.reshape(m.shape + (1,) * (reinterpreted - above))
        mask = m if mask is None else mask & m
    return fn, mask, reinterpreted


def _base_constraint(c):
    """The constraint of one entry: ``independent(positive, 1)`` (a ``.to_event`` prior) →
    positive."""
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


def _arg(fn, family):
    name = _FAMILIES[family][1]
    if name == "covariance_matrix" and not covariance_was_given(fn):
        return None
    return getattr(fn, name)


def _trace(enum_model, params, args, kwargs):
    # coded parameter values are not valid distribution arguments: switch validation off
    with plate_to_enum_plate(), validation_enabled(False), vectorize_scan():
        return packed_trace(substitute(enum_model, data=params)).get_trace(*args, **kwargs)


def _coded(value, event_ndim, family, offset=0):
    """θ with row j (trailing ``event_ndim`` dims) set to j + 1 + offset; SPD-coded (that
    multiple of the identity) for covariances."""
    shape = jnp.shape(value)
    batch = shape[: len(shape) - event_ndim]
    n = int(np.prod(batch))
    dtype = jnp.result_type(value)  # numpy constants: no eager JAX op to compile
    codes = np.arange(1 + offset, n + 1 + offset, dtype=dtype).reshape(batch)
    if family in ("mvn_cov", "mvn_tril"):
        return codes[..., None, None] * np.eye(shape[-1], dtype=dtype)
    return np.broadcast_to(codes.reshape(batch + (1,) * event_ndim), shape)


def _index_map(arg_coded, arg_shifted, event_ndim, n_rows):
    """Row index of θ selected by each argument entry, decoded from two coded evaluations (codes
    j + 1 and j + 1 + n_rows); entries that do not depend on θ (``where(z, p, q)``) get n_rows."""
    first = arg_coded[(...,) + (0,) * event_ndim] if event_ndim else arg_coded
    second = arg_shifted[(...,) + (0,) * event_ndim] if event_ndim else arg_shifted
    idx = jnp.round(first).astype(jnp.int32) - 1
    return jnp.where(first != second, idx, n_rows)


def _leaves(fn):
    """Array attributes of a (possibly wrapped) distribution, keyed 'Type.attr'."""
    out = {}
    while fn is not None:
        for k, v in vars(fn).items():
            if isinstance(v, (jax.Array, np.ndarray)) and jnp.issubdtype(v.dtype, jnp.inexact):
                out[f"{type(fn).__name__}.{k}"] = v
        fn = getattr(fn, "base_dist", None)
    return out


# argument leaves a family's parameter may reach (MVN derives scale_tril from the covariance)
_ALLOWED = {"mvn_cov": ("covariance_matrix", "scale_tril")}
_CONSTRAINTS = {"mvn_loc": (constraints.real, constraints.real_vector)}


def _constraint_fits(family, constraint, allowed):
    """The parameter's constraint is the family's own, or (scale, covariance) a static floor."""
    if str(_base_constraint(constraint)) in map(str, allowed):
        return True
    return family in ("normal_scale", "mvn_cov") and floor_of(constraint) is not None and (
        (family == "mvn_cov") == isinstance(_base_constraint(constraint), positive_definite_floor))


def _site_candidates(p, value, site_name, base, used, args_now, args_at, params, coded_args, deps):
    """Families under which ``site_name``'s argument is a pure selection of parameter ``p``,
    the reason for each family refused (for ``mstep_paths(explain=True)``), and whether the
    site never selects an entry of ``p`` (it then does not use ``p`` at any value)."""
    candidates, reasons = [], []
    for family, (types, attr, event_ndim, constraint) in _FAMILIES.items():
        allowed = _CONSTRAINTS.get(family, (constraint,))
        if not isinstance(base, types) or not _constraint_fits(family, p.constraint, allowed):
            continue
        if not used <= set(_ALLOWED.get(family, (attr,))) or attr not in used:
            reasons.append(f"{family}: '{p.name}' enters {sorted(used)} of site '{site_name}', "
                           f"not only its {attr}")
            continue
        arg = args_now[site_name][family]
        if arg is None or jnp.ndim(value) < event_ndim:
            continue
        # structural: the argument only moves entries of fitted parameters (no arithmetic on
        # any of them, whatever their values), so each entry is one entry of θ, of another
        # parameter, or a constant, chosen by data alone (``where(z < 0, init, trans[z])``)
        dep = deps[site_name][family]
        arith = sorted(n for i, n in enumerate(params) if dep.other >> i & 1)
        if arith:
            reasons.append(f"{family}: the {attr} of site '{site_name}' is computed by arithmetic "
                           f"from {', '.join(repr(o) for o in arith)}"
                           + ("" if arith == [p.name] else " (a dependence on another parameter "
                              "holds at every value, even one that is 0 now)"))
            continue
        # the index map: the coded evaluation decodes to valid rows, and the argument equals
        # θ's rows gathered along it
        batch = np.shape(value)[: np.ndim(value) - event_ndim]
        n_rows = int(np.prod(batch))
        key = (event_ndim, family in ("mvn_cov", "mvn_tril"))
        if key not in coded_args:
            coded_args[key] = [
                args_at({**params, p.name: np.asarray(_coded(value, event_ndim, family, off))})
                for off in (0, n_rows)
            ]
        arg_coded, arg_shifted = (c[site_name][family] for c in coded_args[key])
        failed = f"{family}: the {attr} of site '{site_name}' is not a selection of whole rows"
        if arg_coded is None or jnp.shape(arg_coded) != jnp.shape(arg):
            reasons.append(failed)
            continue
        first = arg_coded[(...,) + (0,) * event_ndim] if event_ndim else arg_coded
        second = arg_shifted[(...,) + (0,) * event_ndim] if event_ndim else arg_shifted
        idx = np.where(first != second, np.round(first).astype(np.int64) - 1, n_rows)
        sel = idx < n_rows
        if np.any(idx < 0):
            reasons.append(failed)
            continue
        if not sel.any():  # data never chooses θ here (a scan's first step): not a user
            return [], [], True
        code = (idx + 1).astype(arg_coded.dtype)
        if family in ("mvn_cov", "mvn_tril"):
            expect = code[..., None, None] * np.eye(arg_coded.shape[-1])
            ev = (Ellipsis, None, None)
        else:
            expect = np.broadcast_to(code.reshape(code.shape + (1,) * event_ndim), arg_coded.shape)
            ev = (Ellipsis,) + (None,) * event_ndim
        sel_b = np.broadcast_to(sel[ev], arg_coded.shape)
        rows = np.reshape(value, (n_rows,) + np.shape(value)[len(batch):])
        if not (np.array_equal(expect[sel_b], arg_coded[sel_b])
                and np.allclose(rows[np.where(sel, idx, 0)][sel_b], np.asarray(arg)[sel_b],
                                rtol=1e-6, atol=1e-12)):
            reasons.append(failed)
            continue
        candidates.append(family)
    return candidates, reasons, False


def detect_closed_forms(problem, params, args, kwargs):
    """Which parameters take a closed-form update: ``(plans, refused)``, a tuple of
    :class:`ClosedForm` and a tuple of ``(site, reason)`` for the parameters left to the
    numeric M-step.

    Where a parameter enters the model, and whether it enters as a selection, is read from the
    program (:mod:`bayes_em.dependence`), so the answer holds at every θ, not only at
    ``params``; the index map is decoded from coded evaluations.
    """
    sites = problem.sites
    param_names = set(sites.param_names)
    bases = {}  # site -> its distribution (unwrapped), captured while tracing

    def leaves(p):
        out = {}
        for name, site in _trace(problem.enum_model, p, args, kwargs).items():
            if site["type"] == "sample":
                bases[name] = _unwrap(site["fn"])[0]
                out[name] = _leaves(site["fn"])
                if name not in param_names:
                    out[name]["value"] = site["value"]
        return out

    def family_args(p):
        out = {}
        for name, site in _trace(problem.enum_model, p, args, kwargs).items():
            if site["type"] == "sample" and name not in param_names:
                base = _unwrap(site["fn"])[0]
                out[name] = {f: _arg(base, f) for f, spec in _FAMILIES.items()
                             if isinstance(base, spec[0])}
        return out

    params = {p.name: np.asarray(params[p.name]) for p in sites.params}
    leaf_deps = dependence(leaves, params)
    arg_deps = dependence(family_args, params)
    # one compiled program evaluates the arguments at θ and at the coded values
    compiled_args = jit(family_args)

    def args_at(p):
        return jax.tree.map(np.asarray, compiled_args(p))

    args_now = None
    plans, refused = [], []
    for i, p in enumerate(sites.params):
        value = params[p.name]
        users = {(s, leaf) for s, ls in leaf_deps.items() for leaf, d in ls.items()
                 if d.depends >> i & 1}
        user_sites = sorted({s for s, _ in users})
        if not user_sites:
            refused.append((p.name, "no sample site depends on it"))
            warnings.warn(f"Parameter site '{p.name}' is used by no sample site: the data say "
                          "nothing about it and it stays at its initial value (and counts in "
                          "BIC/AIC). Remove it, or hold it with fixed=.", UserWarning,
                          stacklevel=4)
            continue
        priors = [s for s in user_sites if s in param_names]
        if priors:
            refused.append((p.name, f"it enters the prior of {', '.join(map(repr, priors))}"))
            continue
        if args_now is None:
            args_now = args_at(params)
        families, coded_args, reasons, selecting = set(), {}, [], []
        for site_name in user_sites:
            candidates, why, unused = _site_candidates(
                p, value, site_name, bases[site_name],
                {leaf.split(".", 1)[1] for s, leaf in users if s == site_name},
                args_now, args_at, params, coded_args, arg_deps)
            if unused:
                continue
            selecting.append(site_name)
            reasons += why
            if len(candidates) != 1 and not why:
                why = [f"site '{site_name}' ({type(bases[site_name]).__name__}) has no "
                       f"closed-form family for a {p.constraint} parameter"]
                reasons += why
            families.add(candidates[0] if len(candidates) == 1 else None)
        if not selecting:
            refused.append((p.name, "no site selects an entry of it"))
            continue
        if len(families) != 1 or None in families:
            if len(families) > 1 and None not in families:
                reasons.append(f"its sites need different families {sorted(families)}")
            refused.append((p.name, "; ".join(reasons)))
            continue
        family = families.pop()
        prior = None
        if p.kind == "map":
            prior_fn = bases[p.name]
            if not isinstance(prior_fn, _PRIORS[family]):
                conjugate = ", ".join(t.__name__ for t in _PRIORS[family]) or "none"
                refused.append((p.name, f"its prior {type(prior_fn).__name__} is not conjugate "
                                        f"to {family} (closed form: {conjugate})"))
                continue
            prior = type(prior_fn).__name__
        floor = floor_of(p.constraint) if family in ("normal_scale", "mvn_cov") else None
        plans.append(ClosedForm(p.name, tuple(selecting), family, prior, floor or 0.0))
    return tuple(sorted(plans, key=lambda c: _ORDER.index(c.family))), tuple(refused)


def _reduce_to(x, shape):
    """Sum ``x`` over the leading dims and the dims where ``shape`` is 1."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead > 0 else x
    axes = tuple(i for i, (a, b) in enumerate(zip(shape, x.shape)) if a == 1 and b != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _weighted_sum(w, t, out_batch, n_event=0):
    """Σ of w·t over the broadcast batch entries that ``out_batch`` does not keep, as one einsum
    (a matrix product: no entries × event intermediate). ``t`` has ``n_event`` trailing dims."""
    event = t.shape[t.ndim - n_event:]
    t_batch = t.shape[: t.ndim - n_event]
    nd = max(w.ndim, len(t_batch), len(out_batch))
    ws = (1,) * (nd - w.ndim) + tuple(w.shape)
    ts = (1,) * (nd - len(t_batch)) + tuple(t_batch)
    os_ = (1,) * (nd - len(out_batch)) + tuple(out_batch)
    letters = string.ascii_letters
    ev = letters[nd: nd + n_event]
    sub_w = "".join(letters[i] for i in range(nd) if ws[i] != 1)
    sub_t = "".join(letters[i] for i in range(nd) if ts[i] != 1) + ev
    kept = [i for i in range(nd) if os_[i] != 1 and (ws[i] != 1 or ts[i] != 1)]
    sub_o = "".join(letters[i] for i in kept) + ev
    res = jnp.einsum(
        f"{sub_w},{sub_t}->{sub_o}",
        w.reshape(tuple(s for s in ws if s != 1)),
        t.reshape(tuple(s for s in ts if s != 1) + tuple(event)),
    )
    shape = tuple(os_[i] if i in kept else 1 for i in range(nd)) + tuple(event)
    res = jnp.broadcast_to(res.reshape(shape), os_ + tuple(event))
    return res.reshape(tuple(out_batch) + tuple(event))


def _scatter(stat, idx, n_rows, event_shape):
    """Add the per-entry statistics onto θ's rows along the index map."""
    idx_b = jnp.broadcast_to(idx, stat.shape[: stat.ndim - len(event_shape)])
    flat = stat.reshape((-1,) + event_shape)
    out = jnp.zeros((n_rows,) + event_shape, stat.dtype)
    return out.at[idx_b.reshape(-1)].add(flat, mode="drop")


def _dirichlet_mode(counts, alpha):
    """argmax_p Σ_j (c_j + α_j − 1) log p_j on the simplex; KKT: p_j ∝ max(c_j + α_j − 1, 0).

    With α_j < 1 a negative coefficient makes the objective unbounded towards p_j = 0; the KKT
    point is then the limit of the maximisers over {p ≥ ε} as ε → 0 (not a clipped mode).
    """
    a = jnp.maximum(counts + alpha - 1.0, 0.0)
    return a / jnp.sum(a, axis=-1, keepdims=True)


def _site_stats(family, site, idx, n_rows, event_shape, weight):
    """Sufficient statistics of one site, scattered onto the parameter's rows (summed over sites
    by the caller)."""
    base, mask, reinterpreted = _unwrap(site["fn"])
    event_ndim = _FAMILIES[family][2]
    arg = _arg(base, family)
    arg_batch = jnp.shape(arg)[: jnp.ndim(arg) - event_ndim]
    w = weight
    if site["scale"] is not None and not is_plate_weight(site["scale"]):
        w = w * site["scale"]  # plate weights are in the posterior weights already
    x = site["value"]
    w = w.reshape(jnp.shape(w) + (1,) * reinterpreted)  # to_event dims appended
    if mask is not None:
        w = w * mask
    dtype = w.dtype

    def scatter(stat, n_event=0):
        ev = tuple(stat.shape[stat.ndim - n_event:])
        return _scatter(_reduce_to(stat, arg_batch + ev), idx, n_rows, ev)

    if family in ("categorical", "multinomial"):
        V = event_shape[0]
        t = jax.nn.one_hot(x, V, dtype=dtype) if family == "categorical" else x.astype(dtype)
        return {"counts": scatter(_weighted_sum(w, t, arg_batch, 1), 1)}
    if family in ("bernoulli", "binomial"):
        total = (jnp.ones((), dtype) if family == "bernoulli"
                 else jnp.asarray(base.total_count, dtype))
        trials = jnp.broadcast_to(total, jnp.broadcast_shapes(jnp.shape(total), jnp.shape(x)))
        return {"c1": scatter(_weighted_sum(w, x.astype(dtype), arg_batch)),
                "n": scatter(_weighted_sum(w, trials, arg_batch))}
    if family in ("poisson", "exponential"):
        return {"n": scatter(_weighted_sum(w, jnp.ones_like(x, dtype), arg_batch)),
                "s": scatter(_weighted_sum(w, x.astype(dtype), arg_batch))}
    # float32: distances to the current locations m formed entry by entry; float64: moments
    # about the data mean c, corrected to m (cheaper; see gaussian.exact_distances)
    exact = exact_distances(dtype)
    if family in ("normal_loc", "normal_scale"):
        joint = jnp.broadcast_shapes(jnp.shape(base.loc), jnp.shape(base.scale))
        n = _weighted_sum(w, jnp.ones_like(x, dtype), joint)
        if family == "normal_loc":  # the step from m: Σ w P (x − m)
            prec = 1.0 / jnp.square(base.scale)
            step = (_weighted_sum(w, x - base.loc, joint) if exact
                    else _weighted_sum(w, x, joint) - n * base.loc)
            return {"a": scatter(n * prec), "b": scatter(step * prec)}
        if exact:
            ss = _weighted_sum(w, jnp.square(x - base.loc), joint)
        else:
            c = jnp.mean(x)
            xc, mc = x - c, base.loc - c
            s1 = _weighted_sum(w, xc, joint)
            ss = jnp.maximum(_weighted_sum(w, jnp.square(xc), joint) - 2 * mc * s1
                             + jnp.square(mc) * n, 0.0)
        return {"n": scatter(jnp.broadcast_to(n, joint)), "ss": scatter(ss)}
    # multivariate normal, at the joint (loc, covariance) batch shape
    D = jnp.shape(x)[-1]
    joint = jnp.broadcast_shapes(jnp.shape(base.loc)[:-1], jnp.shape(base.scale_tril)[:-2])
    n = _weighted_sum(w, jnp.ones(x.shape[:-1], dtype), joint)
    if family == "mvn_loc":
        # μ_j = m_j + (Σ_e w_e P_e)⁻¹ Σ_e w_e P_e (x_e − m_j): entries selecting one row may
        # differ in covariance
        prec = jnp.broadcast_to(base.precision_matrix, joint + (D, D))
        step = (_weighted_sum(w, x - base.loc, joint, 1) if exact
                else _weighted_sum(w, x, joint, 1) - n[..., None] * base.loc)
        return {"a": scatter(n[..., None, None] * prec, 2),
                "b": scatter((prec @ step[..., None])[..., 0], 1)}
    if exact:
        ss = _weighted_outer(w, x - base.loc, joint)
    else:
        c = jnp.mean(x.reshape(-1, D), axis=0)
        xc = x - c
        s1 = _weighted_sum(w, xc, joint, 1)
        xx = (xc[..., :, None] * xc[..., None, :]).reshape(xc.shape[:-1] + (D * D,))
        s2 = _weighted_sum(w, xx, joint, 1).reshape(joint + (D, D))
        mc = jnp.broadcast_to(base.loc - c, joint + (D,))
        outer = s1[..., :, None] * mc[..., None, :]
        ss = (s2 - outer - jnp.swapaxes(outer, -1, -2)
              + n[..., None, None] * mc[..., :, None] * mc[..., None, :])
    return {"ss": scatter(ss, 2), "n": scatter(jnp.broadcast_to(n, joint))}


def _weighted_outer(w, d, out_batch):
    """Σ of w · d dᵀ over the broadcast batch entries that ``out_batch`` does not keep (one
    batched matrix product; the distances d are formed before the product, so no moments
    about a far-away centre cancel)."""
    D = d.shape[-1]
    batch = jnp.broadcast_shapes(jnp.shape(w), d.shape[:-1])
    d = jnp.broadcast_to(d, batch + (D,))
    wd = jnp.broadcast_to(w, batch)[..., None] * d
    nd = len(batch)
    os_ = (1,) * (nd - len(out_batch)) + tuple(out_batch)
    letters = string.ascii_letters
    sub = letters[:nd]
    kept = [i for i in range(nd) if os_[i] != 1]
    res = jnp.einsum(f"{sub}Y,{sub}Z->{''.join(sub[i] for i in kept)}YZ", wd, d)
    shape = tuple(os_[i] if i in kept else 1 for i in range(nd)) + (D, D)
    res = jnp.broadcast_to(res.reshape(shape), os_ + (D, D))
    return res.reshape(tuple(out_batch) + (D, D))


def _mode(family, st, prior_fn, hyper, value):
    """The family's weighted ML / conjugate MAP update from the summed statistics."""
    if family in ("categorical", "multinomial"):
        alpha = hyper("concentration") if prior_fn is not None else jnp.ones_like(st["counts"])
        return _dirichlet_mode(st["counts"], alpha)
    if family in ("bernoulli", "binomial"):
        c1, n = st["c1"], st["n"]
        if prior_fn is not None:
            a, b = hyper("concentration1"), hyper("concentration0")
            c1, n = c1 + a - 1.0, n + a + b - 2.0
        return c1 / n
    if family in ("poisson", "exponential"):
        num, den = (st["s"], st["n"]) if family == "poisson" else (st["n"], st["s"])
        if prior_fn is not None:
            num, den = num + hyper("concentration") - 1.0, den + hyper("rate")
        return num / den
    rows = jnp.reshape(value, st[next(iter(st))].shape[:1] + jnp.shape(value)[
        jnp.ndim(value) - _FAMILIES[family][2]:])
    if family == "normal_loc":  # m + (Σ w P (x − m) + P₀ (μ₀ − m)) / (Σ w P + P₀)
        a, b = st["a"], st["b"]
        if prior_fn is not None:
            p0 = 1.0 / jnp.square(hyper("scale"))
            a, b = a + p0, b + p0 * (hyper("loc") - rows)
        return rows + b / a
    if family == "normal_scale":
        n, ss = st["n"], st["ss"]
        if prior_fn is None:
            return jnp.sqrt(ss / n)
        # the mode of n(−log σ) − ss/2σ² − (a+1)log σ − b/σ
        a, b = hyper("concentration"), hyper("rate")
        cc = a + 1.0 + n
        return (b + jnp.sqrt(b * b + 4.0 * cc * ss)) / (2.0 * cc)
    if family == "mvn_loc":  # a row with no weight has a = 0: NaN, so it keeps its value
        a, b = st["a"], st["b"]
        empty = jnp.trace(a, axis1=-2, axis2=-1) <= 0
        a = jnp.where(empty[..., None, None], jnp.eye(a.shape[-1], dtype=a.dtype), a)
        step = jnp.linalg.solve(a, b[..., None])[..., 0]
        return jnp.where(empty[..., None], jnp.nan, rows + step)
    D = jnp.shape(value)[-1]
    n_k = st["n"][:, None, None]
    if prior_fn is not None:  # inverse-Wishart mode: (Ψ + S) / (ν + n + D + 1)
        nu = jnp.broadcast_to(prior_fn.concentration, jnp.shape(value)[:-2]).reshape(-1)
        cov = (hyper("scale_matrix") + st["ss"]) / (nu[:, None, None] + n_k + D + 1)
    else:
        cov = st["ss"] / n_k
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    return cov if family == "mvn_cov" else jnp.linalg.cholesky(cov)


def closed_form_update(problem, plans, params, weights, args, kwargs):
    """New constrained values of the planned parameters (in plan order, each conditional on the
    ones before); the others are returned unchanged."""
    params = dict(params)
    for plan in plans:
        tr = _trace(problem.enum_model, params, args, kwargs)
        event_ndim = _FAMILIES[plan.family][2]
        value = params[plan.param]
        n_rows = int(np.prod(jnp.shape(value)[: jnp.ndim(value) - event_ndim]))
        event_shape = tuple(jnp.shape(value)[jnp.ndim(value) - event_ndim:])
        coded = [
            _trace(problem.enum_model,
                   {**params, plan.param: jnp.asarray(_coded(value, event_ndim, plan.family, off))},
                   args, kwargs)
            for off in (0, n_rows)
        ]
        stats = None
        for name in plan.sites:
            idx = _index_map(
                *(_arg(_unwrap(t[name]["fn"])[0], plan.family) for t in coded), event_ndim, n_rows
            )
            st = _site_stats(plan.family, tr[name], idx, n_rows, event_shape, weights[name])
            stats = st if stats is None else {k: stats[k] + st[k] for k in st}
        prior_fn = _unwrap(tr[plan.param]["fn"])[0] if plan.prior else None

        def hyper(name):
            return jnp.broadcast_to(getattr(prior_fn, name), jnp.shape(value)).reshape(
                (n_rows,) + event_shape
            )

        new = _mode(plan.family, stats, prior_fn, hyper, value).astype(jnp.result_type(value))
        if plan.floor > 0:  # the constrained maximiser: Q is unimodal in σ, and in Σ's spectrum
            new = (jnp.maximum(new, plan.floor) if plan.family == "normal_scale"
                   else clip_eigenvalues(new, plan.floor))
        # per row: a row no entry selects with positive weight has no statistics (0/0 under
        # ML) and keeps its value; under MAP the prior alone gives its mode. A row with
        # statistics but no finite maximum (ML: all its weight on one point, a zero scatter)
        # stays non-finite: the objective does too, and the restart stops there ("nonfinite",
        # diagnosed as a collapse by the API) instead of silently keeping its old value.
        old = jnp.reshape(value, new.shape)
        empty = jnp.all(jnp.stack([jnp.all(v.reshape(n_rows, -1) == 0, axis=1)
                                   for v in stats.values()]), axis=0)
        ok = jnp.all(jnp.isfinite(new.reshape(n_rows, -1)), axis=1) | ~empty
        new = jnp.where(ok.reshape((n_rows,) + (1,) * (new.ndim - 1)), new, old)
        params[plan.param] = new.reshape(jnp.shape(value))
    return params
