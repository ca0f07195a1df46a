"""Dirichlet and Beta priors on the boundary of the simplex (MAP with α ≤ 1).

With α_j < 1 the density grows without bound as p_j → 0, and the conjugate MAP M-step (the KKT
point p_j ∝ max(c_j + α_j − 1, 0)) sets p_j = 0 exactly. The objective there is defined by
dropping the annihilated components from the prior, as Figueiredo & Jain (2002) do for
annihilated mixture components: the log prior is the Dirichlet of the remaining components S
on their face, with their own α and normaliser,

    log p(θ) = log Γ(Σ_{j∈S} α_j) − Σ_{j∈S} log Γ(α_j) + Σ_{j∈S} (α_j − 1) log p_j.

A component is dropped only where p_j is 0 (up to the floor of the simplex and sigmoid
transforms: the smallest normal float, or 1 − eps for a Beta's complement) and α_j ≤ 1; with
α_j > 1 a zero has density 0 and the log prior stays −∞. Off the boundary this is NumPyro's own
`log_prob`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import gammaln

__all__ = ["prior_log_prob"]


def _face(alpha, p, dropped):
    """log Dirichlet(p_S | α_S) over the last axis, S the components not `dropped`."""
    keep = ~dropped
    a = jnp.where(keep, alpha, 0.0)
    log_p = jnp.log(jnp.where(keep, p, 1.0))
    return (gammaln(jnp.sum(a, -1)) - jnp.sum(jnp.where(keep, gammaln(alpha), 0.0), -1)
            + jnp.sum(jnp.where(keep, (alpha - 1.0) * log_p, 0.0), -1))


def _base_log_prob(fn, value):
    dtype = jnp.result_type(value)
    tiny, eps = jnp.finfo(dtype).tiny, jnp.finfo(dtype).eps
    if isinstance(fn, dist.Dirichlet):
        alpha = jnp.broadcast_to(fn.concentration, jnp.shape(value)).astype(dtype)
        dropped = (value <= tiny) & (alpha <= 1.0)
        return jnp.where(jnp.any(dropped, -1), _face(alpha, value, dropped), fn.log_prob(value))
    if isinstance(fn, dist.Beta):
        shape = jnp.shape(value)
        alpha = jnp.stack([jnp.broadcast_to(fn.concentration1, shape),
                           jnp.broadcast_to(fn.concentration0, shape)], -1).astype(dtype)
        p = jnp.stack([value, 1.0 - value], -1)
        dropped = jnp.stack([value <= tiny, 1.0 - value <= eps], -1) & (alpha <= 1.0)
        return jnp.where(jnp.any(dropped, -1), _face(alpha, p, dropped), fn.log_prob(value))
    return None


def prior_log_prob(fn, value):
    """The log prior of a MAP site at `value` with the face convention above for Dirichlet
    and Beta priors (also expanded by plates or `.to_event`); `None` for other priors."""
    reinterpreted = 0
    base = fn
    while isinstance(base, (dist.ExpandedDistribution, dist.Independent)):
        if isinstance(base, dist.Independent):
            reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    lp = _base_log_prob(base, value)
    if lp is None:
        return None
    if reinterpreted:
        lp = jnp.sum(lp, axis=tuple(range(-reinterpreted, 0)))
    return jnp.broadcast_to(lp, fn.batch_shape)
