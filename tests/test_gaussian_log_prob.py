"""The matrix-product Gaussian log-densities (`bayes_em.gaussian.log_prob`, the E-step's fast
path) against NumPyro's own `log_prob`, on generated batch shapes: locations, scales and
covariances broadcasting against the data and an enumerated dim in every combination, event
entries sharing a location or scale, plate expansion, and masks."""

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from hypothesis import given, settings

from bayes_em import gaussian


def _reference(fn, x):
    """log p(x) by NumPy, entry by entry (NumPyro's own MVN `log_prob` fails on some of these
    broadcasts, e.g. D = 1 with more covariance batch dims than location ones)."""
    mask = None
    if isinstance(fn, dist.MaskedDistribution):
        mask, fn = np.asarray(fn._mask), fn.base_dist
    batch = np.broadcast_shapes(fn.batch_shape, x.shape[:-1])
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    if isinstance(fn, dist.Normal):
        loc, scale = (np.broadcast_to(np.asarray(a), np.broadcast_shapes(
            np.shape(fn.loc), np.shape(fn.scale), x.shape)) for a in (fn.loc, fn.scale))
        lp = np.sum(-0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi),
                    -1)
    else:
        D = x.shape[-1]
        lead = np.broadcast_shapes(np.shape(fn.loc)[:-1], np.shape(fn.scale_tril)[:-2],
                                   x.shape[:-1])
        L = np.broadcast_to(np.asarray(fn.scale_tril), lead + (D, D))
        r = np.broadcast_to(x - np.asarray(fn.loc), lead + (D,))
        y = np.linalg.solve(L, r[..., None])[..., 0]
        lp = (-0.5 * np.sum(y**2, -1) - np.sum(np.log(np.diagonal(L, 0, -2, -1)), -1)
              - 0.5 * D * np.log(2 * np.pi))
    lp = np.broadcast_to(lp, batch)
    return lp if mask is None else np.where(mask, lp, 0.0)


def _spd(rng, shape, D):
    a = rng.normal(size=shape + (D, D))
    return a @ np.swapaxes(a, -1, -2) + D * np.eye(D)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fast_log_prob_matches_numpyro(data):
    """In float64 to 1e-9; in float32 to float32's accuracy, the multivariate distances entry by
    entry (budget 0), by the expansion (an infinite budget) or as chosen by the bound."""
    draw = data.draw
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    budget = (draw(st.sampled_from([0.0, gaussian.EXPANSION_BUDGET, np.inf]))
              if dtype == np.float32 else gaussian.EXPANSION_BUDGET)
    D = draw(st.integers(1, 3))
    value_batch = draw(st.sampled_from([(5,), (2, 5)]))
    full = (draw(st.integers(1, 3)),) + value_batch  # an enumerated dim, then the data's

    def batch():  # a right-aligned part of `full`, any dim possibly 1
        n = draw(st.integers(0, len(full)))
        return tuple(draw(st.sampled_from([1, s])) for s in full[len(full) - n:])

    kind = draw(st.sampled_from(["diag", "tril", "cov"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = jnp.asarray(rng.normal(size=value_batch + (D,)) * 3 + 40.0, dtype)
    loc = jnp.asarray(rng.normal(size=batch() + (draw(st.sampled_from([1, D]))
                                                if kind == "diag" else D,)) * 4 + 40.0, dtype)
    if kind == "diag":
        scale_shape = draw(st.sampled_from([(), "batch"]))
        shape = () if scale_shape == () else batch() + (draw(st.sampled_from([1, D])),)
        fn = dist.Normal(loc, jnp.asarray(rng.uniform(0.5, 3.0, size=shape), dtype))
        event = draw(st.sampled_from(["to_event", "expand_then_event", "event_then_expand"]))
        if event == "expand_then_event":
            fn = fn.expand(jnp.broadcast_shapes(fn.batch_shape, (D,))).to_event(1)
        else:
            fn = fn.to_event(1)
            if event == "event_then_expand":
                fn = fn.expand(jnp.broadcast_shapes(fn.batch_shape, value_batch))
    else:
        cov = jnp.asarray(_spd(rng, batch(), D), dtype)
        fn = (dist.MultivariateNormal(loc, scale_tril=jnp.linalg.cholesky(cov)) if kind == "tril"
              else dist.MultivariateNormal(loc, covariance_matrix=cov))
        if draw(st.booleans()):
            fn = fn.expand(jnp.broadcast_shapes(fn.batch_shape, value_batch))
    if draw(st.booleans()):
        mask = rng.uniform(size=batch()) < 0.7
        fn = fn.mask(jnp.asarray(mask))
    expected = _reference(fn, np.asarray(x, np.float64))
    default, gaussian.EXPANSION_BUDGET = gaussian.EXPANSION_BUDGET, budget
    try:
        got = gaussian.log_prob(fn, x)
    finally:
        gaussian.EXPANSION_BUDGET = default
    assert got.shape == expected.shape and got.dtype == dtype
    tol = 1e-9 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
