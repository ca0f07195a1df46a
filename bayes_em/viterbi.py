"""Max-product recursions whose gradient is ONE optimal configuration (Viterbi with
back-pointers).

The gradient of a max is spread over its tied maximisers, and it is exact only where the forward
value and its recomputation in the reverse pass round alike. Here the maximisations record their
argmax (the first index on ties: a deterministic tie-break) in the forward pass, and the reverse
pass sends the whole cotangent along the recorded choices:

- `max_first`: `max(x, axis=-1)` whose cotangent goes to the first maximiser only;
- `viterbi_scan`: a_T of the chain recursion

      a_{t+1}(j) = max_i a_t(i) + C(i, j) + m_t(i, j)

  (one `lax.scan` forward, keeping the back-pointers argmax_i), whose reverse pass backtracks
  from the end state that receives the cotangent and gives every input the indicator of the one
  path: a one-hot per step for m_t, and for a part C constant over time the path's transition
  counts (summed one-hots, never a T×K×K array).

Every entry the cotangent reaches is an exact maximiser of the forward pass itself, so no
rounding of the log-factors is needed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from bayes_em.forward import pairwise_sum

__all__ = ["max_first", "viterbi_scan"]


@jax.custom_vjp
def max_first(x):
    """`max(x, axis=-1)`; its gradient is the one-hot of the first maximiser."""
    return jnp.max(x, axis=-1)


def _max_first_fwd(x):
    idx = jnp.argmax(x, axis=-1)
    return jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0], (idx, x.shape[-1])


def _max_first_bwd(res, g):
    idx, n = res
    return (g[..., None] * jax.nn.one_hot(idx, n, dtype=g.dtype),)


max_first.defvjp(_max_first_fwd, _max_first_bwd)


def _forward(a0, const, m, length):
    """a_T and the back-pointers `(T, *batch, K)`. Each step's message is carried less its
    max (the shifts are summed pairwise at the end), as in the sum-product recursion."""

    def step(a, m_t):
        shift = jnp.max(a, axis=-1, keepdims=True)
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        s = (a - shift)[..., :, None] + (const if m_t is None else const + m_t)
        back = jnp.argmax(s, axis=-2)
        a_next = jnp.take_along_axis(s, back[..., None, :], axis=-2)[..., 0, :]
        return a_next, (shift, back.astype(jnp.int32))

    a_last, (shifts, back) = jax.lax.scan(step, a0, m, length=length)
    return a_last + pairwise_sum(shifts), back


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def viterbi_scan(a0, const, m, length):
    """a_T(j) = max over paths ending in j of a_0(z_0) + Σ_t C(z_t, z_{t+1}) + m_t(z_t, z_{t+1}).

    `a0`: `(*batch, K)`; `const`: `(*batch', K | 1, K | 1)` (size-1 dims broadcast);
    `m`: `(T, *batch', K | 1, K | 1)` or None; `length` = T. The gradient with respect
    to every input is the indicator of one optimal path (see the module doc), scaled by the
    cotangent's total over the end states of each batch element.
    """
    return _forward(a0, const, m, length)[0]


def _viterbi_fwd(a0, const, m, length):
    a_last, back = _forward(a0, const, m, length)
    return a_last, (back, a0, const, m)


def _fit(ct, shape):
    """`ct` summed over the dims where `shape` (right-aligned) broadcasts (size 1)."""
    lead = ct.ndim - len(shape)
    ct = jnp.sum(ct, axis=tuple(range(lead))) if lead else ct
    axes = tuple(i for i, (c, s) in enumerate(zip(ct.shape, shape)) if s == 1 and c != 1)
    return (jnp.sum(ct, axis=axes, keepdims=True) if axes else ct).reshape(shape)


def _viterbi_bwd(length, res, g):
    back, a0, const, m = res
    k = a0.shape[-1]
    end = jnp.argmax(g, axis=-1).astype(jnp.int32)  # the end state taking the cotangent
    mass = jnp.sum(g, axis=-1)

    def step(curr, back_t):
        prev = jnp.take_along_axis(back_t, curr[..., None], axis=-1)[..., 0]
        return prev, (prev, curr)

    start, (prevs, currs) = jax.lax.scan(step, end, back, reverse=True)
    dtype = g.dtype
    ct_a0 = _fit(mass[..., None] * jax.nn.one_hot(start, k, dtype=dtype), a0.shape)

    def one_hots(shape):
        """The path's one-hots along the prev and curr dims of an input of `shape`
        (`None` where that dim broadcasts), the mass folded into the curr ones."""
        oh_prev = jax.nn.one_hot(prevs, k, dtype=dtype) if shape[-2] != 1 else None
        oh_curr = (jax.nn.one_hot(currs, k, dtype=dtype) if shape[-1] != 1
                   else jnp.ones(currs.shape + (1,), dtype)) * mass[..., None]
        return oh_prev, oh_curr

    shape_c = jnp.shape(const)
    oh_prev, oh_curr = one_hots(shape_c)
    if oh_prev is None:  # Σ_t over the steps of curr's one-hots
        counts = jnp.sum(oh_curr, axis=0)[..., None, :]
    else:  # the path's transition counts, a (K, T) @ (T, K) product per batch element
        counts = jnp.einsum("t...i,t...j->...ij", oh_prev, oh_curr)
    ct_const = _fit(counts, shape_c)
    ct_m = None
    if m is not None:
        oh_prev, oh_curr = one_hots(m.shape)
        ct = oh_curr[..., None, :]
        ct_m = _fit(ct if oh_prev is None else oh_prev[..., :, None] * ct, m.shape)
    return ct_a0, ct_const, ct_m


viterbi_scan.defvjp(_viterbi_fwd, _viterbi_bwd)
