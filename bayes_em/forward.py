"""The sum-product forward recursion of one Markov chain, by one `lax.scan`:

    a_{t+1}(j) = log Σ_i exp(a_t(i) + C(i, j) + m_t(i, j))

(its gradient is the backward pass: two-slice marginals). Where the transition is constant over
time and the time-varying part does not depend on the previous state (an HMM's emissions), the
scaled recursion of `bayes_em.baum_welch` computes it, with its gradient by the scaled backward
recursion. The max-product with back-pointers is `bayes_em.viterbi`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["forward_scan", "log_forward_scan", "matvec_step", "pairwise_sum"]


def pairwise_sum(x):
    """Σ over the leading axis by pairwise (tree) summation: round-off O(log n · eps)."""
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros_like(x[:1])])
        x = x[0::2] + x[1::2]
    return x[0]


def matvec_step(const, dtype):
    """Forward step a_{t+1}(j) = log Σ_i exp(a_t(i) + C(i, j)) + m_t(j) for a transition part C
    constant over time, as a matrix-vector product: K exps and K² multiply-adds per step
    instead of K² exps (the scaled forward pass of Baum-Welch, kept in log space).

    With r_i = max_j C(i, j) and A = exp(C - r), a_{t+1} = log(exp(a_t + r - s) @ A) + s + m_t
    for any shift s (the max of a_t + r): an entry below e^-745 of the largest underflows and
    drops out, an error far below float64 round-off of the sum. A state no path reaches gets
    a finite stand-in for log 0 (as masked latents do), which keeps the gradient finite.
    """
    r = jax.lax.stop_gradient(jnp.max(const, axis=-1))
    r = jnp.where(jnp.isfinite(r), r, 0.0)
    trans = jnp.exp(const - r[..., None])
    log0 = jnp.finfo(dtype).min / 1e8

    def forward(a, m_t):
        u = a + r
        shift = jax.lax.stop_gradient(jnp.max(u, axis=-1, keepdims=True))
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        q = jnp.einsum("...i,...ij->...j", jnp.exp(u - shift), trans)
        reached = q > 0
        a_next = jnp.where(reached, jnp.log(jnp.where(reached, q, 1.0)), log0)
        return (a_next if m_t is None else a_next + m_t), shift

    return forward


def forward_scan(a0, const, m, length):
    """a_T of the recursion above for a transition part C (`const`, constant over time) and
    time-varying parts m_t (`m`, or None). Each step returns its message less a shift, and the
    shift: the carried values stay O(1), so their round-off does not grow with log Z (a message
    carrying log Z itself adds eps·|log Z| at each of the T steps); the shifts are summed
    pairwise at the end. Where m_t does not depend on the previous state (emissions) a step is
    a matrix-vector product: in the scaled domain (`bayes_em.baum_welch.scaled_forward`), or
    without emissions in log space (`matvec_step`)."""
    dtype = jnp.result_type(a0)
    if jnp.ndim(const) >= 2 and m is not None and m.shape[-2] == 1:
        from bayes_em.baum_welch import scaled_forward

        return scaled_forward(a0, const, m[..., 0, :])
    if jnp.ndim(const) >= 2 and m is None:
        forward = matvec_step(const, dtype)
    else:
        def forward(a, m_t):
            m_t = const if m_t is None else const + m_t
            shift = jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))
            shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
            return jax.nn.logsumexp((a - shift)[..., :, None] + m_t, axis=-2), shift

    a_last, shifts = jax.lax.scan(forward, a0, m, length=length)
    return a_last + pairwise_sum(shifts)


def log_forward_scan(a0, const, m):
    """a_T by the log-domain matrix-vector steps (`matvec_step`) for emissions m (T, ..., K)
    that do not depend on the previous state; differentiated by autodiff of the `lax.scan`.
    The fallback of `bayes_em.baum_welch.scaled_forward` where its scaled steps would
    underflow."""
    a_last, shifts = jax.lax.scan(matvec_step(const, jnp.result_type(a0)), a0, m)
    return a_last + pairwise_sum(shifts)
