"""Gaussian log-densities as matrix products, with no N×K×D intermediates.

For x of batch shape B_x and components of batch shape B_k (broadcasting, e.g. (N,) vs (K, 1)):

    (x − μ)ᵀ P (x − μ) = ⟨x xᵀ, P⟩ − 2 ⟨x, P μ⟩ + μᵀ P μ,     P = L⁻ᵀ L⁻¹,

where each ⟨·,·⟩ is one ``dot_general`` over the broadcast batch dims. Data and means are centred
on the data mean first, which keeps the expansion accurate.
"""

from __future__ import annotations

import string

import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular

__all__ = ["broadcast_dot", "mvn_log_prob", "log_prob"]


def broadcast_dot(a, b):
    """Σ_i a[..., i] b[..., i] with NumPy broadcasting of the leading dims, as one einsum."""
    shape = jnp.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    nd = len(shape)
    a_shape = (1,) * (nd - a.ndim + 1) + a.shape[:-1]
    b_shape = (1,) * (nd - b.ndim + 1) + b.shape[:-1]
    letters = string.ascii_letters
    sub_a = "".join(letters[i] for i in range(nd) if a_shape[i] != 1) + "Z"
    sub_b = "".join(letters[i] for i in range(nd) if b_shape[i] != 1) + "Z"
    sub_out = "".join(letters[i] for i in range(nd) if shape[i] != 1)
    a = a.reshape(tuple(s for s in a_shape if s != 1) + a.shape[-1:])
    b = b.reshape(tuple(s for s in b_shape if s != 1) + b.shape[-1:])
    return jnp.einsum(f"{sub_a},{sub_b}->{sub_out}", a, b).reshape(shape)


def mvn_log_prob(loc, scale_tril, x):
    """log N(x | loc, L Lᵀ) for broadcasting batches, by the quadratic-form expansion."""
    D = x.shape[-1]
    centre = jnp.mean(x.reshape(-1, D), axis=0)
    xc, mc = x - centre, loc - centre
    eye = jnp.broadcast_to(jnp.eye(D, dtype=scale_tril.dtype), scale_tril.shape)
    inv_l = solve_triangular(scale_tril, eye, lower=True)
    prec = jnp.swapaxes(inv_l, -1, -2) @ inv_l
    prec_m = (prec @ mc[..., None])[..., 0]
    xx = (xc[..., :, None] * xc[..., None, :]).reshape(xc.shape[:-1] + (D * D,))
    maha = (
        broadcast_dot(xx, prec.reshape(prec.shape[:-2] + (D * D,)))
        - 2.0 * broadcast_dot(xc, prec_m)
        + jnp.sum(mc * prec_m, -1)
    )
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)), -1)
    return -0.5 * jnp.maximum(maha, 0.0) - half_logdet - 0.5 * D * jnp.log(2 * jnp.pi)


def diag_normal_log_prob(loc, scale, x):
    """Σ_d log N(x_d | loc_d, scale_d²) over the last dim, by the same expansion."""
    loc, scale = jnp.broadcast_arrays(loc, scale)
    D = x.shape[-1]
    centre = jnp.mean(x.reshape(-1, D), axis=0)
    xc, mc = x - centre, loc - centre
    prec = 1.0 / jnp.square(scale)
    maha = (
        broadcast_dot(jnp.square(xc), prec)
        - 2.0 * broadcast_dot(xc, mc * prec)
        + jnp.sum(jnp.square(mc) * prec, -1)
    )
    return -0.5 * jnp.maximum(maha, 0.0) - jnp.sum(jnp.log(scale), -1) - 0.5 * D * jnp.log(2 * jnp.pi)


def _unexpand(fn):
    return fn.base_dist if isinstance(fn, dist.ExpandedDistribution) else fn


def log_prob(fn, value):
    """``fn.log_prob(value)``, by matrix products for (plate-expanded) multivariate normals and
    diagonal normals (``Normal(...).to_event(1)``)."""
    base = _unexpand(fn)
    if jnp.ndim(value) >= 2:
        lp = None
        if type(base) is dist.MultivariateNormal:
            lp = mvn_log_prob(base.loc, base.scale_tril, value)
        elif isinstance(base, dist.Independent) and base.reinterpreted_batch_ndims == 1:
            normal = _unexpand(base.base_dist)
            if type(normal) is dist.Normal:
                lp = diag_normal_log_prob(normal.loc, normal.scale, value)
        if lp is not None:
            shape = jnp.broadcast_shapes(fn.batch_shape, jnp.shape(value)[:-1])
            return jnp.broadcast_to(lp, shape)
    return fn.log_prob(value)
