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

__all__ = ["broadcast_matvec", "mvn_log_prob", "diag_normal_log_prob", "log_prob"]


def broadcast_matvec(m, v):
    """m[..., e, :] · v[..., :] with NumPy broadcasting of the leading dims, as one einsum."""
    shape = jnp.broadcast_shapes(m.shape[:-2], v.shape[:-1])
    nd = len(shape)
    m_shape = (1,) * (nd - m.ndim + 2) + m.shape[:-2]
    v_shape = (1,) * (nd - v.ndim + 1) + v.shape[:-1]
    letters = string.ascii_letters
    sub_m = "".join(letters[i] for i in range(nd) if m_shape[i] != 1) + "YZ"
    sub_v = "".join(letters[i] for i in range(nd) if v_shape[i] != 1) + "Z"
    kept = "".join(letters[i] for i in range(nd) if m_shape[i] != 1 or v_shape[i] != 1)
    m = m.reshape(tuple(s for s in m_shape if s != 1) + m.shape[-2:])
    v = v.reshape(tuple(s for s in v_shape if s != 1) + v.shape[-1:])
    out = jnp.einsum(f"{sub_m},{sub_v}->{kept}Y", m, v)
    full = tuple(shape[i] if (m_shape[i] != 1 or v_shape[i] != 1) else 1 for i in range(nd))
    return jnp.broadcast_to(out.reshape(full + m.shape[-2:-1]), shape + m.shape[-2:-1])


def mvn_log_prob(loc, scale_tril, x):
    """log N(x | loc, L Lᵀ) for broadcasting batches: ‖L⁻¹x − L⁻¹μ‖², one matrix product for
    L⁻¹x over every (row, component) pair. Each pair's distance is formed before it is squared,
    so clusters far apart relative to their spread keep their accuracy (the expansion
    ⟨x xᵀ, P⟩ − 2⟨x, Pμ⟩ + μᵀPμ loses (distance / spread)² · eps of it, fatal in float32)."""
    D = x.shape[-1]
    centre = jnp.mean(x.reshape(-1, D), axis=0)
    xc, mc = x - centre, loc - centre
    eye = jnp.broadcast_to(jnp.eye(D, dtype=scale_tril.dtype), scale_tril.shape)
    inv_l = solve_triangular(scale_tril, eye, lower=True)
    y = broadcast_matvec(inv_l, xc) - (inv_l @ mc[..., None])[..., 0]
    maha = jnp.sum(jnp.square(y), -1)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)), -1)
    return -0.5 * maha - half_logdet - 0.5 * D * jnp.log(2 * jnp.pi)


def diag_normal_log_prob(loc, scale, x):
    """Σ_d log N(x_d | loc_d, scale_d²) over the last dim, each distance formed directly."""
    loc, scale = jnp.broadcast_arrays(loc, scale)
    D = x.shape[-1]
    maha = jnp.sum(jnp.square((x - loc) / scale), -1)
    return -0.5 * maha - jnp.sum(jnp.log(scale), -1) - 0.5 * D * jnp.log(2 * jnp.pi)


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
