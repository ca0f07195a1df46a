"""The conjugate families of the closed-form M-step, one object each: which distribution
argument it updates, its sufficient statistics (weighted, reduced over broadcast dims and
scattered onto the parameter's rows), its conjugate priors and its ML / MAP mode. Adding a family
is one class and one entry of `FAMILIES`. Detection lives in
[`bayes_em.conjugate`][bayes_em.conjugate].
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em._numpyro import covariance_was_given, mask_of
from bayes_em.constraints import clip_eigenvalues
from bayes_em.factors import is_plate_weight
from bayes_em.gaussian import exact_distances, moment_features, split_moments

__all__ = ["Family", "FAMILIES", "site_stats", "site_weight", "unwrap"]


def unwrap(fn):
    """Base distribution, mask and number of event dims reinterpreted by `to_event`.

    The mask is aligned with the base distribution's batch shape: a mask above a `to_event`
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
    """The constraint of one entry: `independent(positive, 1)` (a `.to_event` prior) →
    positive."""
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


def _reduce_to(x, shape):
    """Sum `x` over the leading dims and the dims where `shape` is 1."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead > 0 else x
    axes = tuple(i for i, (a, b) in enumerate(zip(shape, x.shape)) if a == 1 and b != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _weighted_sum(w, t, out_batch, n_event=0):
    """Σ of w·t over the broadcast batch entries that `out_batch` does not keep, as one einsum
    (a matrix product: no entries × event intermediate). `t` has `n_event` trailing dims."""
    event = t.shape[t.ndim - n_event:]
    t_batch = t.shape[: t.ndim - n_event]
    nd = max(w.ndim, len(t_batch), len(out_batch))
    ws = (1,) * (nd - w.ndim) + tuple(w.shape)
    ts = (1,) * (nd - len(t_batch)) + tuple(t_batch)
    os_ = (1,) * (nd - len(out_batch)) + tuple(out_batch)
    alone = tuple(i for i in range(nd) if ws[i] != 1 and ts[i] == 1 and os_[i] == 1)
    if alone:  # summed over w's dims alone first: a reduction (as a product with ones, XLA:CPU
        # copied w transposed, when its rows come from the E-step's rows-first layout)
        w = jnp.sum(w.reshape(ws), axis=alone, keepdims=True)
        ws = w.shape
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


def _count(w, batch, out_batch):
    """Σ w over the entries of `batch` (broadcast with w's) that `out_batch` does not keep: a
    reduction of w (as a product with ones, XLA:CPU first copied the E-step's rows-first
    weights transposed)."""
    return _weighted_sum(jnp.broadcast_to(w, jnp.broadcast_shapes(jnp.shape(w), batch)),
                         jnp.ones((), w.dtype), out_batch)


# entries × rows up to which `_scatter` adds by a one-hot matrix product (XLA:CPU runs a scatter
# as a loop over the entries: 46 µs per block of a K = 16 mixture's 16 × 256 covariance pairs)
ONE_HOT_SCATTER = 1 << 16


def _scatter(stat, idx, n_rows, event_shape):
    """Add the per-entry statistics onto θ's rows along the index map (indices outside
    [0, n_rows) dropped)."""
    idx_b = jnp.broadcast_to(idx, stat.shape[: stat.ndim - len(event_shape)]).reshape(-1)
    flat = stat.reshape((-1,) + event_shape)
    if flat.shape[0] * n_rows <= ONE_HOT_SCATTER:
        one_hot = idx_b[None, :] == jnp.arange(n_rows, dtype=idx_b.dtype)[:, None]
        kept = jnp.reshape((idx_b >= 0) & (idx_b < n_rows), (-1,) + (1,) * len(event_shape))
        flat = jnp.where(kept, flat, 0)  # a dropped entry's non-finite value stays out
        return jnp.tensordot(one_hot.astype(stat.dtype), flat, axes=1,
                             precision=jax.lax.Precision.HIGHEST)
    out = jnp.zeros((n_rows,) + event_shape, stat.dtype)
    return out.at[idx_b].add(flat, mode="drop")


def _dirichlet_mode(counts, alpha):
    """argmax_p Σ_j (c_j + α_j − 1) log p_j on the simplex; KKT: p_j ∝ max(c_j + α_j − 1, 0).

    With α_j < 1 a negative coefficient makes the objective unbounded towards p_j = 0; the KKT
    point is then the limit of the maximisers over {p ≥ ε} as ε → 0 (not a clipped mode).
    """
    a = jnp.maximum(counts + alpha - 1.0, 0.0)
    return a / jnp.sum(a, axis=-1, keepdims=True)


def _weighted_outer(w, d, out_batch):
    """Σ of w · d dᵀ over the broadcast batch entries that `out_batch` does not keep (one
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




class Family:
    """A conjugate family: the argument `arg` of distributions `types` that a parameter
    (constraint `constraint`, `event_ndim` dims per row) may fill, the priors with a closed
    form mode, its statistics and its mode."""

    name: str
    types: tuple
    arg: str
    event_ndim: int
    constraint: object
    priors: tuple = ()
    reads: tuple = ()  # argument leaves the parameter may reach (default: ``arg`` alone)
    accepts: tuple = ()  # constraints accepted (default: ``constraint`` alone)
    floored: bool = False  # accepts a floor constraint (scales, covariances)
    matrix: bool = False  # rows are matrices (coded as multiples of the identity)

    def __init__(self, name, types):
        self.name, self.types = name, types

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    def argument(self, base):
        """The argument of distribution `base` this family updates (None if not given)."""
        return getattr(base, self.arg)

    def stats(self, base, x, w, batch, event_shape, scatter) -> dict:
        """Statistics of values `x` under weights `w` (argument batch shape `batch`),
        each put on the parameter's rows by `scatter(stat, n_event)`."""
        raise NotImplementedError

    def mode(self, st, prior, hyper, value):
        """The ML mode (`prior` None) or conjugate MAP mode from the summed statistics, per
        row; `hyper(name)` is the prior's argument per row."""
        raise NotImplementedError

    def floor(self, new, c):
        """The constrained maximiser under a floor c (scales: σ ≥ c; covariances: λ ≥ c)."""
        return new

    # ``stats`` reads no θ: they are the family's expected complete-data sufficient statistics,
    # additive over batches computed at different θ (online EM, ``bayes_em.online``). Gaussian
    # locations and scales read the current θ; their raw form is :class:`GaussianPair`.
    raw = True

    def raw_stats(self, base, x, w, batch, event_shape, scatter) -> dict:
        """Parameter-free sufficient statistics (weighted sums of functions of x alone, put on
        the parameter's rows), additive over batches; only where `raw` is True."""
        if not self.raw:
            raise ValueError(f"{self.name}: its statistics read θ; use GaussianPair")
        return self.stats(base, x, w, batch, event_shape, scatter)

    def raw_mode(self, st, prior, hyper, value):
        """The ML / conjugate MAP mode from (running) raw statistics."""
        return self.mode(st, prior, hyper, value)


class Counts(Family):
    """Categorical / Multinomial probabilities: p_j ∝ Σ w c_j (+ α_j − 1 under a Dirichlet)."""

    arg, event_ndim, constraint, priors = "probs", 1, constraints.simplex, (dist.Dirichlet,)

    def stats(self, base, x, w, batch, event_shape, scatter):
        t = (jax.nn.one_hot(x, event_shape[0], dtype=w.dtype) if self.name == "categorical"
             else x.astype(w.dtype))
        return {"counts": scatter(_weighted_sum(w, t, batch, 1), 1)}

    def mode(self, st, prior, hyper, value):
        alpha = hyper("concentration") if prior is not None else jnp.ones_like(st["counts"])
        return _dirichlet_mode(st["counts"], alpha)


class Trials(Family):
    """Bernoulli / Binomial probability: p = Σ w x / Σ w n (Beta: + a − 1, + a + b − 2)."""

    arg, event_ndim, constraint, priors = "probs", 0, constraints.unit_interval, (dist.Beta,)

    def stats(self, base, x, w, batch, event_shape, scatter):
        dtype = w.dtype
        total = (jnp.ones((), dtype) if self.name == "bernoulli"
                 else jnp.asarray(base.total_count, dtype))
        trials = jnp.broadcast_to(total, jnp.broadcast_shapes(jnp.shape(total), jnp.shape(x)))
        return {"c1": scatter(_weighted_sum(w, x.astype(dtype), batch)),
                "n": scatter(_weighted_sum(w, trials, batch))}

    def mode(self, st, prior, hyper, value):
        c1, n = st["c1"], st["n"]
        if prior is not None:
            a, b = hyper("concentration1"), hyper("concentration0")
            c1, n = c1 + a - 1.0, n + a + b - 2.0
        return c1 / n


class Rate(Family):
    """Poisson rate Σ w x / Σ w, Exponential rate Σ w / Σ w x (Gamma: + a − 1, + b)."""

    arg, event_ndim, constraint, priors = "rate", 0, constraints.positive, (dist.Gamma,)

    def stats(self, base, x, w, batch, event_shape, scatter):
        return {"n": scatter(_count(w, jnp.shape(x), batch)),
                "s": scatter(_weighted_sum(w, x.astype(w.dtype), batch))}

    def mode(self, st, prior, hyper, value):
        num, den = (st["s"], st["n"]) if self.name == "poisson" else (st["n"], st["s"])
        if prior is not None:
            num, den = num + hyper("concentration") - 1.0, den + hyper("rate")
        return num / den


def _rows(st, value, event_ndim):
    """θ's current value, one row per parameter row."""
    return jnp.reshape(value, st[next(iter(st))].shape[:1]
                       + jnp.shape(value)[jnp.ndim(value) - event_ndim:])


class NormalLoc(Family):
    """Normal location: m + (Σ w P (x − m) + P₀ (μ₀ − m)) / (Σ w P + P₀), stepped from the
    current m (float32: distances entry by entry, see `gaussian.exact_distances`)."""

    raw = False
    arg, event_ndim, constraint, priors = "loc", 0, constraints.real, (dist.Normal,)

    def stats(self, base, x, w, batch, event_shape, scatter):
        joint = jnp.broadcast_shapes(jnp.shape(base.loc), jnp.shape(base.scale))
        n = _count(w, jnp.shape(x), joint)
        prec = 1.0 / jnp.square(base.scale)
        step = (_weighted_sum(w, x - base.loc, joint) if exact_distances(w.dtype)
                else _weighted_sum(w, x, joint) - n * base.loc)
        return {"a": scatter(n * prec), "b": scatter(step * prec)}

    def mode(self, st, prior, hyper, value):
        a, b, rows = st["a"], st["b"], _rows(st, value, 0)
        if prior is not None:
            p0 = 1.0 / jnp.square(hyper("scale"))
            a, b = a + p0, b + p0 * (hyper("loc") - rows)
        return rows + b / a


class NormalScale(Family):
    """Normal scale: σ = √(Σ w (x − μ)² / Σ w); under InverseGamma(a, b) on σ the mode of
    n(−log σ) − ss/2σ² − (a+1) log σ − b/σ."""

    raw = False
    arg, event_ndim, constraint = "scale", 0, constraints.positive
    priors, floored = (dist.InverseGamma,), True

    def stats(self, base, x, w, batch, event_shape, scatter):
        joint = jnp.broadcast_shapes(jnp.shape(base.loc), jnp.shape(base.scale))
        n = _count(w, jnp.shape(x), joint)
        if exact_distances(w.dtype):
            ss = _weighted_sum(w, jnp.square(x - base.loc), joint)
        else:  # moments about the data mean c, corrected to the location m
            c = jnp.mean(x)
            xc, mc = x - c, base.loc - c
            s1 = _weighted_sum(w, xc, joint)
            ss = jnp.maximum(_weighted_sum(w, jnp.square(xc), joint) - 2 * mc * s1
                             + jnp.square(mc) * n, 0.0)
        return {"n": scatter(jnp.broadcast_to(n, joint)), "ss": scatter(ss)}

    def mode(self, st, prior, hyper, value):
        n, ss = st["n"], st["ss"]
        if prior is None:
            return jnp.sqrt(ss / n)
        a, b = hyper("concentration"), hyper("rate")
        cc = a + 1.0 + n
        return (b + jnp.sqrt(b * b + 4.0 * cc * ss)) / (2.0 * cc)

    def floor(self, new, c):
        return jnp.maximum(new, c)


def _mvn_joint(base):
    return jnp.broadcast_shapes(jnp.shape(base.loc)[:-1], jnp.shape(base.scale_tril)[:-2])


class MvnLoc(Family):
    """Multivariate normal location μ_j = m_j + (Σ_e w_e P_e)⁻¹ Σ_e w_e P_e (x_e − m_j):
    entries selecting one row may differ in covariance."""

    raw = False
    arg, event_ndim, constraint = "loc", 1, constraints.real_vector
    accepts = (constraints.real, constraints.real_vector)

    def stats(self, base, x, w, batch, event_shape, scatter):
        D, joint = jnp.shape(x)[-1], _mvn_joint(base)
        n = _weighted_sum(w, jnp.ones(x.shape[:-1], w.dtype), joint)
        prec = jnp.broadcast_to(base.precision_matrix, joint + (D, D))
        step = (_weighted_sum(w, x - base.loc, joint, 1) if exact_distances(w.dtype)
                else _weighted_sum(w, x, joint, 1) - n[..., None] * base.loc)
        return {"a": scatter(n[..., None, None] * prec, 2),
                "b": scatter((prec @ step[..., None])[..., 0], 1)}

    def mode(self, st, prior, hyper, value):  # a row with no weight: NaN, it keeps its value
        a, b, rows = st["a"], st["b"], _rows(st, value, 1)
        empty = jnp.trace(a, axis1=-2, axis2=-1) <= 0
        a = jnp.where(empty[..., None, None], jnp.eye(a.shape[-1], dtype=a.dtype), a)
        step = jnp.linalg.solve(a, b[..., None])[..., 0]
        return jnp.where(empty[..., None], jnp.nan, rows + step)


class MvnCovariance(Family):
    """Multivariate normal covariance Σ = S / n (the weighted scatter about the locations), or
    its Cholesky factor; inverse-Wishart mode (Ψ + S) / (ν + n + D + 1)."""

    raw = False
    event_ndim, matrix = 2, True

    def __init__(self, name, types, arg, constraint, priors, floored, reads=()):
        super().__init__(name, types)
        self.arg, self.constraint, self.priors = arg, constraint, priors
        self.floored, self.reads = floored, reads

    def argument(self, base):
        if self.arg == "covariance_matrix" and not covariance_was_given(base):
            return None
        return getattr(base, self.arg)

    def stats(self, base, x, w, batch, event_shape, scatter):
        D, joint = jnp.shape(x)[-1], _mvn_joint(base)
        n = _weighted_sum(w, jnp.ones(x.shape[:-1], w.dtype), joint)
        if exact_distances(w.dtype):
            ss = _weighted_outer(w, x - base.loc, joint)
        else:  # moments about the data mean c, corrected to the locations m
            c = jnp.mean(x.reshape(-1, D), axis=0)
            xc = x - c
            s2, s1, _ = split_moments(_weighted_sum(w, moment_features(xc), joint, 1), D)
            mc = jnp.broadcast_to(base.loc - c, joint + (D,))
            outer = s1[..., :, None] * mc[..., None, :]
            ss = (s2 - outer - jnp.swapaxes(outer, -1, -2)
                  + n[..., None, None] * mc[..., :, None] * mc[..., None, :])
        return {"ss": scatter(ss, 2), "n": scatter(jnp.broadcast_to(n, joint))}

    def mode(self, st, prior, hyper, value):
        D = jnp.shape(value)[-1]
        n_k = st["n"][:, None, None]
        if prior is not None:
            nu = jnp.broadcast_to(prior.concentration, jnp.shape(value)[:-2]).reshape(-1)
            cov = (hyper("scale_matrix") + st["ss"]) / (nu[:, None, None] + n_k + D + 1)
        else:
            cov = st["ss"] / n_k
        cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
        return cov if self.name == "mvn_cov" else jnp.linalg.cholesky(cov)

    def floor(self, new, c):
        return clip_eigenvalues(new, c)


# every family, in the order of updates inside one M-step (conditional maximisation: locations
# before scales)
FAMILIES = {f.name: f for f in (
    Counts("categorical", (dist.CategoricalProbs,)),
    Counts("multinomial", (dist.MultinomialProbs,)),
    Trials("bernoulli", (dist.BernoulliProbs,)),
    Trials("binomial", (dist.BinomialProbs,)),
    Rate("poisson", (dist.Poisson,)),
    Rate("exponential", (dist.Exponential,)),
    NormalLoc("normal_loc", (dist.Normal,)),
    MvnLoc("mvn_loc", (dist.MultivariateNormal,)),
    NormalScale("normal_scale", (dist.Normal,)),
    MvnCovariance("mvn_cov", (dist.MultivariateNormal,), "covariance_matrix",
                  constraints.positive_definite, (dist.InverseWishart,), True,
                  reads=("covariance_matrix", "scale_tril")),
    MvnCovariance("mvn_tril", (dist.MultivariateNormal,), "scale_tril",
                  constraints.lower_cholesky, (), False),
)}


def site_weight(site, weight):
    """`(base, w)`: the site's base distribution and the weight of each of its entries (the
    E-step weight, a `scale` handler's factor, the `to_event` dims appended, the mask)."""
    base, mask, reinterpreted = unwrap(site["fn"])
    w = weight
    if site["scale"] is not None and not is_plate_weight(site["scale"]):
        w = w * site["scale"]  # plate weights are in the posterior weights already
    w = w.reshape(jnp.shape(w) + (1,) * reinterpreted)  # to_event dims appended
    if mask is not None:
        w = w * mask
    return base, w


def site_stats(family: Family, site, idx, n_rows, event_shape, weight, raw=False) -> dict:
    """Sufficient statistics of one site under `family`, scattered onto the parameter's
    `n_rows` rows along the index map `idx` (summed over sites by the caller)."""
    base, w = site_weight(site, weight)
    arg = family.argument(base)
    arg_batch = jnp.shape(arg)[: jnp.ndim(arg) - family.event_ndim]

    def scatter(stat, n_event=0):
        ev = tuple(stat.shape[stat.ndim - n_event:])
        return _scatter(_reduce_to(stat, arg_batch + ev), idx, n_rows, ev)

    stats = family.raw_stats if raw else family.stats
    return stats(base, site["value"], w, arg_batch, event_shape, scatter)
