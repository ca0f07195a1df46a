"""The conjugate families of the closed-form M-step: which distribution argument each family
updates, its sufficient statistics (weighted, reduced over broadcast dims and scattered onto the
parameter's rows), and its ML / conjugate-MAP mode. Detection lives in :mod:`bayes_em.conjugate`.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em._numpyro import covariance_was_given, mask_of
from bayes_em.factors import is_plate_weight
from bayes_em.gaussian import exact_distances

__all__ = ["FAMILIES"]


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


# the public name of the table: family -> (distribution types, argument, event ndim, constraint)
FAMILIES = _FAMILIES
