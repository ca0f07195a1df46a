"""Raw Gaussian statistics for additive (one-pass, chunked, online) EM: per pair of a
location row and a scale / covariance row, Σ w and Σ w (x − c), and per scale / covariance
row Σ w (x − c)(x − c)ᵀ, about a reference c, read by `bayes_em.additive`. Float64
multivariate sums about one shared centre are matrix products with the packed x̃ ⊗ x̃
(x̃ = [x, 1]); float64 univariate sums are matrix products about each data column's mean,
moved to the locations. Float32 sums are the same products where their round-off is small
(`bayes_em.gaussian.expansion_fits`, `expansion_cond`), else formed per row and component
(multivariate: over blocks of rows, `bayes_em.gaussian.sum_row_blocks`)."""

from __future__ import annotations

import jax.numpy as jnp

from bayes_em.families import _count, _mvn_joint, _scatter, _weighted_outer, _weighted_sum
from bayes_em.gaussian import (
    EXPANSION_BUDGET,
    exact_distances,
    expansion_cond,
    expansion_fits,
    inverse_tril,
    moment_features,
    rows_broadcast,
    split_moments,
    sum_row_blocks,
)

__all__ = ["GaussianPair", "shift_moments"]


def shift_moments(s0, s1, s2, d, multivariate: bool):
    """Moments Σ w, Σ w (x − c), Σ w (x − c)(x − c)ᵀ about c moved to c − d:
    (s1 + s0 d, s2 + s1 dᵀ + d s1ᵀ + s0 d dᵀ), squares for a Normal (s2 + 2 d s1 + s0 d²)."""
    if multivariate:
        cross = s1[..., :, None] * d[..., None, :]
        return (s1 + s0[..., None] * d,
                s2 + cross + jnp.swapaxes(cross, -1, -2)
                + s0[..., None, None] * (d[..., :, None] * d[..., None, :]))
    return s1 + s0 * d, s2 + 2.0 * d * s1 + s0 * jnp.square(d)


def _mv_sums(w, x, c, joint, prec=None, spread=None, keep=None):
    """{"s0": Σ w, "s1": Σ w d, "s2": Σ w d dᵀ} over the entries `joint` does not keep,
    d = x − c. For one centre c (`prec` None) the three sums are one product with x̃ ⊗ x̃ packed
    (x̃ = [x − c, 1]), or, where Σ w d dᵀ is wanted only over the coarser batch `spread` (the
    spread rows: a tied covariance), Σ w d a product and Σ w d dᵀ one of the weights summed
    over the entries sharing a spread row (`keep`: the entries counted) with x ⊗ x. For `c`
    per component, the same about the rows' mean m (the E-step's
    features: XLA forms them once for both) moved to c where the components' precisions `prec`
    make that accurate (`gaussian.expansion_fits`, `expansion_cond`), else they are formed from
    the distances x − c, rows (N, D) that the components meet along a size-1 dim over blocks of
    rows (no rows × components × D intermediate in memory)."""
    D = jnp.shape(x)[-1]
    if prec is None:
        feats = moment_features(x - c)
        if (spread is not None and spread != tuple(joint)
                and jnp.broadcast_shapes(jnp.shape(keep), jnp.shape(w)) == jnp.shape(w)):
            # Σ of w over the entries sharing a spread row, as a product with `keep` (a masked
            # reduction: XLA:CPU laid the weights out transposed for it, 4x slower)
            if jnp.ndim(w) < len(joint):
                w = jnp.reshape(w, (1,) * (len(joint) - jnp.ndim(w)) + jnp.shape(w))
            lead = jnp.ndim(w) - len(joint)
            shared = tuple(1 if i >= lead and spread[i - lead] == 1 and joint[i - lead] != 1
                           else n for i, n in enumerate(jnp.shape(w)))
            wk = _weighted_sum(w, jnp.asarray(keep, w.dtype), shared)
            s2 = split_moments(_weighted_sum(wk, feats, spread, 1), D)[0]
            s0 = _count(w, jnp.shape(x)[:-1], joint)
            return {"s0": (s0, ()), "s1": (_weighted_sum(w, x - c, joint, 1), (D,)),
                    "s2": (s2, (D, D))}
        s2, s1, s0 = split_moments(_weighted_sum(w, feats, joint, 1), D)
        return {"s0": (s0, ()), "s1": (s1, (D,)), "s2": (s2, (D, D))}
    batch = jnp.broadcast_shapes(jnp.shape(x)[:-1], jnp.shape(c)[:-1])
    s0 = _count(w, batch, joint)

    def sums(rows, wb):
        db = rows - c
        return _weighted_sum(wb, db, joint, 1), _weighted_outer(wb, db, joint)

    wf = jnp.broadcast_to(w, jnp.broadcast_shapes(jnp.shape(w), batch))

    def exact():
        if rows_broadcast(x, jnp.shape(c)[:-1]) and wf.ndim >= 2:
            return sum_row_blocks(sums, x, wf)
        return sums(x, wf)

    if EXPANSION_BUDGET and jnp.ndim(x) == 2:
        m = jnp.mean(x, axis=0)
        feats = moment_features(x - m)  # outside the cond, to be shared with the E-step's
        def expanded():  # one product about the rows' mean m, moved to c
            s2m, s1m, s0m = split_moments(_weighted_sum(w, feats, joint, 1), D)
            return shift_moments(s0m, s1m, s2m, jnp.broadcast_to(m - c, s1m.shape), True)

        s1, s2 = expansion_cond(lambda: expansion_fits(x, c, prec), expanded, exact)
    else:
        s1, s2 = exact()
    return {"s0": (s0, ()), "s1": (s1, (D,)), "s2": (s2, (D, D))}


def _column_sums(w, x, r, joint):
    """Univariate Σ w, Σ w (x − r), Σ w (x − r)² per entry of `joint` (r: its reference, of that
    shape) as matrix products of the weights with the data: about a centre c per data position,
    x's mean over the dims that `joint` sums (so one per entry of `joint`), then moved to r with
    δ = c − r: s1 = s1c + s0 δ, s2 = s2c + 2 δ s1c + s0 δ² (float64: `exact_distances`)."""
    x = jnp.asarray(x, w.dtype)
    lead = len(joint) - x.ndim
    axes = tuple(i for i in range(x.ndim) if i + lead < 0 or joint[i + lead] == 1)
    c = jnp.mean(x, axis=axes, keepdims=True)
    xc = x - c
    s0 = _count(w, xc.shape, joint)
    s1, s2 = _weighted_sum(w, xc, joint), _weighted_sum(w, jnp.square(xc), joint)
    delta = jnp.broadcast_to(jnp.reshape(c, c.shape[max(0, -lead):]), joint) - r
    s1, s2 = shift_moments(s0, s1, s2, delta, False)
    return {"s0": (s0, ()), "s1": (s1, ()), "s2": (s2, ())}


def _precision(scale_tril):
    """L⁻ᵀ L⁻¹ for a batch of Cholesky factors."""
    inv_l = inverse_tril(scale_tril)
    return jnp.swapaxes(inv_l, -1, -2) @ inv_l


class GaussianPair:
    """The exponential-family statistics of a Normal (`multivariate=False`) or
    MultivariateNormal site whose location rows i and scale / covariance rows j are selected
    (by any index maps, the same one or not): per pair (i, j)

        s0 = Σ w,   s1 = Σ w (x − c_i),   s2 = Σ w (x − c_i)²   (x xᵀ for a MultivariateNormal),

    s2 summed over the location rows i (the spread's statistics need no more: a tied covariance
    takes it as one product of Σ_i w with x ⊗ x), about a fixed reference c_i per location row
    (the location where the statistics started: no cancellation of moments about a far-away
    origin), or one centre c shared by every row (`ref` of one row: the sums are then matrix
    products of the weights with x and x ⊗ x).
    They read no θ, so they add over batches computed at different θ (online EM). At the
    current θ they give the statistics of [`NormalLoc`][bayes_em.families.NormalLoc] /
    [`MvnLoc`][bayes_em.families.MvnLoc] (a, b) and
    [`NormalScale`][bayes_em.families.NormalScale] /
    [`MvnCovariance`][bayes_em.families.MvnCovariance] (n, ss) exactly as the batch M-step computes
    them, hence the same modes. A location not fitted (`n_loc=0`) is one pseudo row (x − loc its
    data, c = 0); a Normal scale not fitted (`n_spread=0`) is one pseudo row with each entry's
    precision folded into its weight."""

    def __init__(self, multivariate: bool):
        self.multivariate = multivariate

    def raw_stats(self, base, x, w, idx_loc, n_loc, ref, idx_spread, n_spread) -> dict:
        """`{"s0", "s1"}` of shape (rows_loc, rows_spread) + event and `"s2"` of shape
        (rows_spread,) + event, summed over the location rows (pseudo rows: 1)."""
        mv = self.multivariate
        joint = (_mvn_joint(base) if mv
                 else jnp.broadcast_shapes(jnp.shape(base.loc), jnp.shape(base.scale)))
        nl, ns = max(n_loc, 1), max(n_spread, 1)
        shared = bool(n_loc) and jnp.shape(ref)[0] == 1  # one centre for every location row
        if n_loc:  # the reference of each entry (x − c formed where a branch needs it)
            il = jnp.broadcast_to(idx_loc, joint)
            c = ref[0] if shared else ref[jnp.clip(il, 0, n_loc - 1)]
        else:
            il, c = jnp.zeros(joint, jnp.int32), base.loc
        if n_spread:
            js = jnp.broadcast_to(idx_spread, joint)
        elif mv:
            raise ValueError("a MultivariateNormal location needs its covariance fitted too")
        else:
            js, w = jnp.zeros(joint, jnp.int32), w / jnp.square(base.scale)
        valid = (il < nl) & (js < ns)
        pair = jnp.where(valid, il * ns + js, nl * ns)
        row = jnp.where(valid, js, ns)  # s2 is kept per spread row, over its location rows
        if mv:
            # the batch of the spread rows: s2 may be summed over the dims it does not vary in
            shape = (1,) * (len(joint) - jnp.ndim(idx_spread)) + jnp.shape(idx_spread)
            spread = tuple(1 if a == 1 else b for a, b in zip(shape, joint))
            sums = _mv_sums(w, x, c, joint, None if shared else _precision(base.scale_tril),
                            spread, il < nl)
            if jnp.shape(sums["s2"][0])[:len(joint)] != tuple(joint):  # over `spread`
                idx = jnp.broadcast_to(idx_spread, spread)
                row = jnp.where(idx < ns, idx, ns)
        else:
            def entrywise():
                d = x - c
                return {"s0": (_count(w, d.shape, joint), ()),
                        "s1": (_weighted_sum(w, d, joint), ()),
                        "s2": (_weighted_sum(w, jnp.square(d), joint), ())}

            if not n_loc:
                sums = entrywise()
            elif not exact_distances(jnp.result_type(x, w)):
                sums = _column_sums(w, x, c, joint)
            elif (EXPANSION_BUDGET and jnp.ndim(x) == 2 and len(joint) >= 2
                  and joint[-1] == x.shape[-1]):
                # float32 (N, D) rows, a location per column: the column sums' products (about
                # each column's mean) where their round-off is small
                sums = expansion_cond(
                    lambda: expansion_fits(
                        x, jnp.broadcast_to(c, joint),
                        jnp.broadcast_to(1.0 / jnp.square(base.scale), joint), diagonal=True),
                    lambda: _column_sums(w, x, c, joint), entrywise)
            else:
                sums = entrywise()
        out = {k: _scatter(v, pair, nl * ns, ev).reshape((nl, ns) + ev)
               for k, (v, ev) in sums.items() if k != "s2"}
        return {**out, "s2": _scatter(sums["s2"][0], row, ns, sums["s2"][1])}

    def loc_stats(self, st, ref, loc, prec) -> dict:
        """NormalLoc / MvnLoc's `{"a", "b"}` at locations `loc` (rows) and the spread rows'
        precisions `prec` (a pseudo row: 1)."""
        s0, s1, dl = st["s0"], st["s1"], loc - ref
        if self.multivariate:
            r = s1 - s0[..., None] * dl[:, None, :]
            return {"a": jnp.einsum("ij,jab->iab", s0, prec),
                    "b": jnp.einsum("jab,ijb->ia", prec, r)}
        return {"a": s0 @ prec, "b": (s1 - s0 * dl[:, None]) @ prec}

    def spread_stats(self, st, ref, loc) -> dict:
        """NormalScale / MvnCovariance's `{"n", "ss"}` about locations `loc` (rows; a
        pseudo row: `loc = ref = 0`)."""
        s0, s1, s2 = st["s0"], st["s1"], st["s2"]
        _, moved = shift_moments(s0, s1, 0.0, (ref - loc)[:, None], self.multivariate)
        ss, n = s2 + jnp.sum(moved, axis=0), jnp.sum(s0, axis=0)
        if self.multivariate:
            return {"ss": 0.5 * (ss + jnp.swapaxes(ss, -1, -2)), "n": n}
        return {"n": n, "ss": jnp.maximum(ss, 0.0)}
