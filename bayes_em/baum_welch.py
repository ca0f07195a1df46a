"""The forward recursion of a chain with a homogeneous transition, in the scaled (probability)
domain, with its gradient by the scaled backward recursion (Baum-Welch):

    α_{t+1} = (α_t A) ⊙ b_{t+1} / c_{t+1},   β_t = A (b_{t+1} ⊙ β_{t+1}) / d_t,
    ∂ log Z / ∂ m_t = γ_t ∝ α_t ⊙ β_t,       ∂ log Z / ∂ C = A ⊙ Σ_t α_{t-1} ⊗ (b_t ⊙ β_t) / n_t

with A = exp(C - max C), b_t = exp(m_t - max m_t) (one exp of each array up front: the steps
are matrix-vector products, no exp or log inside the loop) and the two-slice sums ξ as one
matrix product over time at the end. `jax.custom_vjp` replaces the transpose of the forward
`lax.scan` (which stores per-step residuals and accumulates a K×K outer product per step).

Exactness: every factor of a step is O(1) (at most K) and an entry that underflows is below the
dtype's smallest normal, so a step loses at most K² · tiny of its sum c_t. Where some c_t, or a
normaliser n_t of the gradient, is below `_threshold` (relative loss ≥ eps/100) or a result is
not finite, the log-domain recursion of `bayes_em.forward` (and its autodiff) is used instead,
decided once per call by `lax.cond`. The backward messages are normalised by their own maximum
(not by c_t), so they cannot overflow where states are unreachable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bayes_em.forward import log_forward_scan, pairwise_sum

__all__ = ["scaled_forward"]


def _threshold(dtype, k):
    """The smallest step normaliser with a relative underflow loss below eps/100."""
    info = jnp.finfo(dtype)
    return float(info.tiny) * k * k * 100 / float(info.eps)


def _finite_max(x, axis):
    """max over `axis` (kept), 0 where it is not finite; no gradient."""
    top = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return jnp.where(jnp.isfinite(top), top, 0.0)


def _safe(x):
    """x where positive, else 1 (a divisor)."""
    return jnp.where(x > 0, x, 1.0)


def _matvec(v, mat):
    """v @ mat over the last two axes, as a broadcast product and a sum over the major axis
    (on CPU faster than a dot for K ≈ 16 inside a loop)."""
    return jnp.sum(v[..., :, None] * mat, axis=-2)


def _sum_to(x, shape):
    """x summed over the axes where `shape` has size 1 (the gradient of a broadcast)."""
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _chain(first, b, mat, reverse):
    """The T + 1 messages r_0 = `first`, r_{s+1} = (r_s @ mat) ⊙ b_s / Σ r_s (forward), or
    r_T = `first`, r_{s-1} = (r_s ⊙ b_{s-1} / max r_s) @ mat (backward), each normalised by
    its predecessor's sum or maximum (the scale of a message is free: the gradient uses ratios).

    One `fori_loop` writing into the (T + 1, ..., K) buffer it carries: on CPU a step is then
    four small kernels, against six or seven for a `lax.scan` with a normalised carry and
    stacked outputs (which copies the carry into the output at every step)."""
    length = b.shape[0]
    start = length if reverse else 0
    buf = jnp.zeros((length + 1,) + first.shape, first.dtype).at[start].set(first)

    def body(i, buf):
        src = length - i if reverse else i
        r = jax.lax.dynamic_index_in_dim(buf, src, keepdims=False)
        b_s = jax.lax.dynamic_index_in_dim(b, src - 1 if reverse else src, keepdims=False)
        if reverse:
            new = _matvec(r * (b_s / _safe(jnp.max(r, -1, keepdims=True))), mat)
        else:
            new = _matvec(r, mat) * (b_s / _safe(jnp.sum(r, -1, keepdims=True)))
        return jax.lax.dynamic_update_index_in_dim(buf, new, src - 1 if reverse else src + 1, 0)

    return jax.lax.fori_loop(0, length, body, buf)


def _log_domain(a0, const, m):
    """The log-domain recursion of `bayes_em.forward` (the fallback)."""
    return log_forward_scan(a0, const, m)


def _forward(a0, const, m):
    """`(a_T, residuals, ok)`: the scaled forward pass; `ok` whether it is exact (see the
    module doc). The residuals are α_0, the unnormalised p_t = (α_{t-1} A) ⊙ b_t, their sums
    c_t, A and b."""
    cmax = _finite_max(const, (-2, -1))
    trans = jnp.exp(const - cmax)
    mmax = _finite_max(m, -1)
    b = jnp.exp(m - mmax)
    s0 = _finite_max(a0, -1)
    e0 = jnp.exp(a0 - s0)
    c0 = jnp.sum(e0, -1, keepdims=True)
    alpha0 = e0 / _safe(c0)

    ps = _chain(alpha0, b, trans, reverse=False)[1:]
    last = ps[-1] / _safe(jnp.sum(ps[-1], -1, keepdims=True))
    cs = jnp.sum(ps, -1, keepdims=True)
    ok = (jnp.min(cs) >= _threshold(a0.dtype, a0.shape[-1])) & jnp.all(jnp.isfinite(cs))
    ok = ok & jnp.all(c0 > 0)
    total = pairwise_sum(jnp.log(_safe(cs)) + mmax + cmax[..., 0]) + s0 + jnp.log(_safe(c0))
    log0 = jnp.finfo(a0.dtype).min / 1e8  # a state no path reaches: as in forward.matvec_step
    reached = last > 0
    a_last = jnp.where(reached, jnp.log(jnp.where(reached, last, 1.0)), log0) + total
    return a_last, (alpha0, ps, cs, trans, b), ok


def _primal(a0, const, m):
    """a_T by the scaled recursion, or by the log-domain one where that would underflow."""
    a_last, _, ok = _forward(a0, const, m)
    return jax.lax.cond(ok, lambda: a_last, lambda: _log_domain(a0, const, m))


scaled_forward = jax.custom_vjp(_primal)
scaled_forward.__doc__ = """a_T(j) = log Σ_i exp(a_{T-1}(i) + C(i, j)) + m_T(j), down to a_0.

Same values as `bayes_em.forward.log_forward_scan`; the gradient by the scaled backward
recursion (see the module doc). Batch dims broadcast.

Args:
    a0: a_0, shape (..., K).
    const: the transition part C, constant over time, shape (..., K, K).
    m: the emissions m_t, shape (T, ..., K).

Returns:
    a_T, shape (..., K).
"""


def _fwd(a0, const, m):
    """`_primal` and the residuals of `_bwd`."""
    a_last, residuals, ok = _forward(a0, const, m)
    a_last = jax.lax.cond(ok, lambda: a_last, lambda: _log_domain(a0, const, m))
    return a_last, (a0, const, m, ok) + residuals


def _bwd(residuals, g):
    """The cotangents of (a0, const, m) for the cotangent g of a_T: γ_t = G α_t ⊙ β_t / n_t
    (G = Σ_j g_j, n_t = α_t · β_t) and ξ as one product over time."""
    a0, const, m, ok, alpha0, ps, cs, trans, b = residuals
    total = jnp.sum(g, -1, keepdims=True)
    last = ps[-1]
    beta_last = jnp.where(last > 0, g / _safe(last), 0.0)  # ∝ ∂/∂α_T; 0 where unreached
    beta_last = beta_last / _safe(jnp.max(beta_last, -1, keepdims=True))
    messages = _chain(beta_last, b, jnp.swapaxes(trans, -1, -2), reverse=True)
    beta0, betas = messages[0], messages[1:]  # betas[t]: that of ps[t]
    pb = ps * betas
    n = jnp.sum(pb, -1, keepdims=True)  # c_t n_t
    n0 = jnp.sum(alpha0 * beta0, -1, keepdims=True)
    d_m = pb * (total / _safe(n))
    d_a0 = alpha0 * beta0 * (total / _safe(n0))
    prev = jnp.concatenate([alpha0[None], ps[:-1] / _safe(cs[:-1])])
    xi = jnp.einsum("t...i,t...j->...ij", prev, b * betas * (total / _safe(n))) * trans
    fast = (_sum_to(d_a0, a0.shape), _sum_to(xi, const.shape), _sum_to(d_m, m.shape))
    thresh = _threshold(a0.dtype, a0.shape[-1])
    unused = total == 0  # a batch element without weight (e.g. a padding row): β = 0
    good = ok & jnp.all((n / _safe(cs) >= thresh) | unused) & jnp.all((n0 >= thresh) | unused)
    # n_t ≥ thresh (false if NaN) bounds γ_t by G; the small arrays are checked directly
    for x in (total, fast[0], fast[1]):
        good = good & jnp.all(jnp.isfinite(x))
    return jax.lax.cond(good, lambda: fast,
                        lambda: jax.vjp(_log_domain, a0, const, m)[1](g))


scaled_forward.defvjp(_fwd, _bwd)
