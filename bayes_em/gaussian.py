"""Gaussian log-densities for broadcasting batches of data and components, as matrix products.

For x of batch shape B_x and components of batch shape B_k (broadcasting, e.g. (N,) vs (K, 1)),
with P = L⁻ᵀ L⁻¹:

- float64: (x − μ)ᵀ P (x − μ) = ⟨x xᵀ, P⟩ − 2 ⟨x, Pμ⟩ + μᵀ P μ about the data mean, all three
  terms one `dot_general`, a quadratic form in x̃ = [x, 1] (`moment_features`); x̃ x̃ᵀ
  symmetrically packed (its entries x̃_i x̃_j, i ≤ j, against the form's with the off-diagonals
  doubled: `packed_outer`, `pack_symmetric`), loop-invariant (computed once per fit, or once per
  block of rows);
- float32: the same expansion where its round-off bound eps · ‖|P|‖ (|x − c| + |μ − c|)² is
  small (`expansion_fits`: clusters a few spreads apart, a `lax.cond` on the rows at hand),
  else ‖L⁻¹(x − μ)‖², the difference x − μ formed first for every pair (exact where x lies
  near μ), in blocks of rows. For clusters far apart relative to their spread (means ±1e3, sd
  1e-2) the expansion cancels catastrophically in float32, and even L⁻¹x − L⁻¹μ loses
  eps · |x| / σ (0.5 nat of a 2400-row objective); in float64 the expansion keeps 1e-6
  relative accuracy up to separation / spread ratios of 1e5 (`exact_distances`).
"""

from __future__ import annotations

import contextlib
import contextvars
import string

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular

from bayes_em._numpyro import mask_of

# rows per block where float32 distances are formed per row and component (`by_row_blocks`)
ROW_BLOCK = 8192
# float32 distances by the expansion where its round-off bound ‖|P|‖ (|x − c| + |μ − c|)² is at
# most this, in units of eps (a log-density off by at most 2.4e-4 nat, 1e-4 measured: the order
# of scikit-learn's float32 L⁻¹x − L⁻¹μ); 0: always entry by entry
EXPANSION_BUDGET = 4096.0

# how the float32 expansion's conditions are traced (`expansion_choice`): None, a `lax.cond`
_CHOICE = contextvars.ContextVar("bayes_em_expansion_choice", default=None)

__all__ = ["exact_distances", "expansion_fits", "expansion_choice", "expansion_cond",
           "inverse_tril", "rows_broadcast",
           "by_row_blocks", "sum_row_blocks",
           "broadcast_dot", "broadcast_matvec", "packed_outer", "moment_features",
           "split_moments", "pack_symmetric",
           "unpack_symmetric", "mvn_log_prob", "diag_normal_log_prob", "log_prob"]


def packed_outer(x):
    """x ⊗ x symmetrically packed: (..., D) → (..., D(D+1)/2), the entries x_i x_j for i ≤ j in
    row-major upper-triangle order (elementwise: slices of x, no gather)."""
    D = x.shape[-1]
    return jnp.concatenate([x[..., i:i + 1] * x[..., i:] for i in range(D)], axis=-1)


def moment_features(x):
    """x ⊗ x of x̃ = [x, 1] packed: (..., D) → (..., (D+1)(D+2)/2), the entries x_i x_j, x_i and
    1, so that a quadratic form x̃ᵀ M x̃ (a Mahalanobis distance with its linear and constant
    terms), or weighted sums of the moments 1, x and x xᵀ, are one product with them (and the
    E-step's log-densities and the statistics, formed from the same rows, share them)."""
    return packed_outer(jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], -1))


def split_moments(sums, D):
    """`(Σ w x xᵀ, Σ w x, Σ w)` from weighted sums of `moment_features`."""
    m = unpack_symmetric(sums, D + 1)
    return m[..., :D, :D], m[..., :D, D], m[..., D, D]


def pack_symmetric(m):
    """A symmetric (..., D, D) as the (..., D(D+1)/2) weights against `packed_outer`: its
    upper triangle with the off-diagonal entries doubled, so ⟨x xᵀ, M⟩ = packed_outer(x) · it."""
    D = m.shape[-1]
    i, j = np.triu_indices(D)
    return m[..., i, j] * jnp.asarray(np.where(i == j, 1.0, 2.0), m.dtype)


def unpack_symmetric(p, D):
    """The symmetric (..., D, D) whose upper triangle is the packed `p` (..., D(D+1)/2)."""
    i, j = np.triu_indices(D)
    index = np.zeros((D, D), np.int32)
    index[i, j] = index[j, i] = np.arange(len(i))
    return p[..., index]


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
    if a.size < b.size:  # the larger operand's batch dims first: a rows × K product, as
        a, b, sub_a, sub_b = b, a, sub_b, sub_a  # XLA:CPU's dot runs it fastest
    first = "".join(c for c in sub_a[:-1] if c in sub_out)
    order = first + "".join(c for c in sub_out if c not in first)
    out = jnp.einsum(f"{sub_a},{sub_b}->{order}", a, b)
    return jnp.transpose(out, [order.index(c) for c in sub_out]).reshape(shape)


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


def rows_broadcast(x, *batches) -> bool:
    """Whether `x` is (N, D) rows, N > `ROW_BLOCK`, that every component batch shape of
    `batches` meets along a trailing size-1 dim: the (components, N) result then splits into
    blocks of rows."""
    if jnp.ndim(x) != 2 or x.shape[0] <= ROW_BLOCK:
        return False
    return all(len(b) >= 1 and b[-1] == 1 for b in batches)


def by_row_blocks(fn, x, block: int | None = None):
    """`fn(x)` for rows x (N, D) whose result has the rows as its last axis, evaluated over
    blocks of `block` rows (`lax.map`; the last block zero-padded): a block's rows ×
    components × D intermediate stays in cache instead of going through memory."""
    block = block or ROW_BLOCK
    n = x.shape[0]
    nb = -(-n // block)
    xb = jnp.pad(x, ((0, nb * block - n), (0, 0))).reshape(nb, block, x.shape[1])
    out = jax.lax.map(fn, xb)  # (nb, ..., block)
    out = jnp.moveaxis(out, 0, -2)
    return out.reshape(out.shape[:-2] + (nb * block,))[..., :n]


def sum_row_blocks(fn, x, w, block: int | None = None):
    """Σ over blocks of `block` rows of `fn(x_b, w_b)` (a pytree), for rows x (N, D) and
    weights w (..., N) with the rows last (`lax.map`; the last block zero-padded, zero
    weights)."""
    block = block or ROW_BLOCK
    n = x.shape[0]
    nb = -(-n // block)
    xb = jnp.pad(x, ((0, nb * block - n), (0, 0))).reshape(nb, block, x.shape[1])
    wb = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, nb * block - n)])
    wb = jnp.moveaxis(wb.reshape(w.shape[:-1] + (nb, block)), -2, 0)
    return jax.tree.map(lambda a: jnp.sum(a, 0), jax.lax.map(lambda a: fn(*a), (xb, wb)))


def exact_distances(dtype) -> bool:
    """Whether Gaussian distances are formed entry by entry (float32 and narrower) rather than by
    the quadratic-form expansion about the data mean (float64). The expansion loses
    eps · (distance / spread)² of relative accuracy: below 1e-6 in float64 for separation /
    spread ratios up to 1e5, but garbage in float32 from ratios of about 300 (means ±1e3, sd
    1e-2). The entrywise form costs more memory traffic (an N×K×D intermediate), so float64 keeps
    the expansion."""
    return float(jnp.finfo(dtype).eps) > 1e-10


def inverse_tril(scale_tril):
    """L⁻¹ for a batch of lower Cholesky factors L (a triangular solve)."""
    eye = jnp.broadcast_to(jnp.eye(scale_tril.shape[-1], dtype=scale_tril.dtype),
                           scale_tril.shape)
    return solve_triangular(scale_tril, eye, lower=True)


def expansion_fits(x, loc, prec, diagonal: bool = False):
    """Whether the quadratic-form expansion about the rows' mean c is accurate for the distances
    of rows x (..., D) to `loc` under precisions `prec` (..., D, D), or (`diagonal`) their
    diagonals (..., D) (traced: a scalar bool). Its round-off on a distance is at most about
    eps · ‖|P_k|‖ (|x − c| + |μ_k − c|)², the magnitude of the terms of
    x̃ᵀ [[P, −Pμ], [−μᵀP, μᵀPμ]] x̃; the expansion is taken where that is below
    `EXPANSION_BUDGET` eps for every row and component."""
    D = x.shape[-1]
    c = jnp.mean(x.reshape(-1, D), axis=0)
    rx = jnp.sqrt(jnp.max(jnp.sum(jnp.square(x.reshape(-1, D) - c), -1)))
    loc = jnp.broadcast_to(loc, loc.shape[:-1] + (D,))  # an event entry shared by all D
    rm = jnp.sqrt(jnp.sum(jnp.square(loc - c), -1))  # per location row
    if diagonal:
        norm = jnp.max(jnp.abs(prec), -1)
    else:  # ‖|P|‖₂ is at most the Frobenius norm and the largest row sum
        norm = jnp.minimum(jnp.sqrt(jnp.sum(jnp.square(prec), (-2, -1))),
                           jnp.max(jnp.sum(jnp.abs(prec), -1), -1))
    return jnp.max(norm * jnp.square(rx + rm)) <= EXPANSION_BUDGET


@contextlib.contextmanager
def expansion_choice(choice):
    """Within it, `expansion_cond` is decided at trace time: True, the expansion; False, the
    exact form; a list, the expansion, each condition's predicate appended to the list (so a
    loop over blocks of rows can decide once for all its blocks, outside the loop: a
    `lax.cond` per block kept XLA from laying out the block's arrays for their consumers)."""
    token = _CHOICE.set(choice)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def expansion_cond(fits, expanded, exact):
    """`lax.cond(fits(), expanded, exact)`, or the choice of the enclosing `expansion_choice`
    (`fits`, `expanded`, `exact`: functions of no arguments)."""
    choice = _CHOICE.get()
    if choice is None:
        return jax.lax.cond(fits(), expanded, exact)
    if isinstance(choice, list):
        choice.append(fits())
        return expanded()
    return expanded() if choice else exact()


def _expanded_distances(x, loc, prec, centre, feats):
    """(x − μ)ᵀ P (x − μ) = ⟨x xᵀ, P⟩ − 2⟨x, Pμ⟩ + μᵀPμ about the rows' mean, as products with
    the loop-invariant `feats`, x̃ ⊗ x̃ (`moment_features`) of x̃ = [x − centre, 1]."""
    xc, mc = x - centre, loc - centre
    prec_m = (prec @ mc[..., None])[..., 0]
    m_prec = jnp.sum(mc * prec_m, -1)
    if prec.shape[:-2] == jnp.broadcast_shapes(prec.shape[:-2], prec_m.shape[:-1]):
        # (x − μ)ᵀ P (x − μ) = x̃ᵀ [[P, −Pμ], [−μᵀP, μᵀPμ]] x̃: one product
        row = jnp.concatenate([-prec_m, m_prec[..., None]], -1)
        aug = jnp.concatenate([jnp.concatenate([prec, -prec_m[..., None]], -1),
                               row[..., None, :]], -2)
        quad = broadcast_dot(feats, pack_symmetric(aug))
    else:  # fewer precisions than locations (tied): ⟨x xᵀ, P⟩ once per precision
        pad = [(0, 0)] * (prec.ndim - 2) + [(0, 1), (0, 1)]
        quad = (broadcast_dot(feats, pack_symmetric(jnp.pad(prec, pad)))
                - 2.0 * broadcast_dot(xc, prec_m) + m_prec)
    return jnp.maximum(quad, 0.0)


def mvn_log_prob(loc, scale_tril, x):
    """log N(x | loc, L Lᵀ) for broadcasting batches (see `exact_distances`; float32 takes the
    expansion where `expansion_fits`, a `lax.cond` on the rows at hand)."""
    D = x.shape[-1]
    inv_l = inverse_tril(scale_tril)
    prec = jnp.swapaxes(inv_l, -1, -2) @ inv_l
    if exact_distances(jnp.result_type(x, loc)):  # ‖L⁻¹(x − μ)‖², the difference first

        def distances(rows):  # (no centring: x − μ is exact where x is near μ)
            return jnp.sum(jnp.square(broadcast_matvec(inv_l, rows - loc)), -1)

        blocks = rows_broadcast(x, loc.shape[:-1], inv_l.shape[:-2])
        shape = jnp.broadcast_shapes(x.shape[:-1], loc.shape[:-1], inv_l.shape[:-2])

        def exact():
            return jnp.broadcast_to(by_row_blocks(distances, x) if blocks else distances(x),
                                    shape)

        if EXPANSION_BUDGET and x.ndim == 2:
            # the features outside the condition: the statistics' branch forms the same ones
            # (`gaussian_pair`), and XLA computes them once per block for both
            centre = jnp.mean(x, axis=0)
            feats = moment_features(x - centre)
            maha = expansion_cond(
                lambda: expansion_fits(x, loc, prec),
                lambda: jnp.broadcast_to(_expanded_distances(x, loc, prec, centre, feats),
                                         shape), exact)
        else:
            maha = exact()
    else:
        centre = jnp.mean(x.reshape(-1, D), axis=0)
        maha = _expanded_distances(x, loc, prec, centre, moment_features(x - centre))
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)), -1)
    return -0.5 * maha - half_logdet - 0.5 * D * jnp.log(2 * jnp.pi)


def diag_normal_log_prob(loc, scale, x):
    """Σ_d log N(x_d | loc_d, scale_d²) over the last dim (see `exact_distances`; float32
    takes the expansion where `expansion_fits`)."""
    loc, scale = jnp.broadcast_arrays(loc, scale)
    D = x.shape[-1]
    prec = 1.0 / jnp.square(scale)

    def expanded():  # Σ_d P_d (x_d − μ_d)² about the rows' mean, as products
        centre = jnp.mean(x.reshape(-1, D), axis=0)
        xc, mc = x - centre, loc - centre
        return jnp.maximum(
            broadcast_dot(jnp.square(xc), prec)
            - 2.0 * broadcast_dot(xc, mc * prec)
            + jnp.sum(jnp.square(mc) * prec, -1), 0.0)

    if exact_distances(jnp.result_type(x, loc)):
        shape = jnp.broadcast_shapes(x.shape[:-1], loc.shape[:-1])

        def exact():
            return jnp.broadcast_to(jnp.sum(jnp.square((x - loc) / scale), -1), shape)

        if EXPANSION_BUDGET and x.ndim == 2:
            maha = expansion_cond(lambda: expansion_fits(x, loc, prec, diagonal=True),
                                  lambda: jnp.broadcast_to(expanded(), shape), exact)
        else:
            maha = exact()
    else:
        maha = expanded()
    # every entry of the event counts its scale (a scale of event size 1 serves all D entries)
    log_scale = jnp.sum(jnp.log(jnp.broadcast_to(scale, scale.shape[:-1] + (D,))), -1)
    return -0.5 * maha - log_scale - 0.5 * D * jnp.log(2 * jnp.pi)


def _unexpand(fn):
    return fn.base_dist if isinstance(fn, dist.ExpandedDistribution) else fn


def _value_mask(mask, batch):
    """The mask reduced (any) to the value's batch shape `batch`: the value keeps the data's
    shape (an enumerated mask (K, N) would otherwise broadcast x (N, D) to (K, N, D))."""
    m = jax.lax.optimization_barrier(jnp.asarray(mask))  # a constant mask: no slow folding
    lead = m.ndim - len(batch)
    if lead > 0:
        m = jnp.any(m, axis=tuple(range(lead)))
    axes = tuple(i for i in range(m.ndim)
                 if m.shape[i] != 1 and batch[len(batch) - m.ndim + i] == 1)
    return jnp.any(m, axis=axes, keepdims=True) if axes else m


def log_prob(fn, value):
    """`fn.log_prob(value)`, by matrix products for (plate-expanded) multivariate normals and
    diagonal normals (`Normal(...).to_event(1)`); a mask (`MaskedDistribution`, e.g. a
    chunk's repeated rows) as NumPyro applies it, around the fast path."""
    mask = mask_of(fn) if isinstance(fn, dist.MaskedDistribution) else None
    if mask is not None and not isinstance(mask, bool) and jnp.ndim(value) >= 2:
        base = fn.base_dist
        keep = _value_mask(mask, jnp.shape(value)[: jnp.ndim(value) - base.event_dim])
        keep = jnp.reshape(keep, jnp.shape(keep) + (1,) * base.event_dim)
        value = jnp.where(keep, value, base.support.feasible_like(value))
        return jnp.where(mask, log_prob(base, value), 0.0)
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
