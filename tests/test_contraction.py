"""The contraction and the E-step at the array level: :class:`bayes_em.factors.Factors` built by
hand (no model, no NumPyro trace) against brute-force enumeration of every configuration."""

import itertools

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from bayes_em.contraction import log_partition, pointwise_log_likelihood
from bayes_em.estep import posterior_weights
from bayes_em.factors import FactorMeta, Factors

jax.config.update("jax_enable_x64", True)

RNG = np.random.default_rng(0)


def mixture_factors(log_w, log_lik, plate_weights=None):
    """z_n ~ Categorical(w), x_n | z_n: factors "z" and "x", both (K, N), in NumPyro's layout
    (the plate at dim -1, the enumerated latent at dim -2; the plate expands p(z))."""
    K, N = log_lik.shape
    metas = (
        FactorMeta("z", ((-2, "z"), (-1, "n")), False, frozenset({"n"}), (K, N), site="z"),
        FactorMeta("x", ((-2, "z"), (-1, "n")), True, frozenset({"n"}), (K, N), site="x"),
    )
    logs = {"z": np.broadcast_to(log_w[:, None], (K, N)), "x": log_lik}
    return Factors(logs, metas, {} if plate_weights is None else {"n": plate_weights})


def test_mixture_log_z_weights_and_pointwise_match_brute_force():
    K, N = 3, 5
    log_w = np.log(RNG.dirichlet(np.ones(K)))
    log_lik = RNG.normal(size=(K, N))
    factors = mixture_factors(log_w, log_lik)
    joint = log_w[:, None] + log_lik  # (K, N)
    per_point = logsumexp(joint, axis=0)
    np.testing.assert_allclose(log_partition(factors), per_point.sum(), rtol=1e-12)
    log_z, w = posterior_weights(factors)
    np.testing.assert_allclose(log_z, per_point.sum(), rtol=1e-12)
    np.testing.assert_allclose(w["x"], np.exp(joint - per_point), atol=1e-12)
    np.testing.assert_allclose(w["z"], np.exp(joint - per_point), atol=1e-12)
    np.testing.assert_allclose(pointwise_log_likelihood(factors, "n", drop=()), per_point,
                               rtol=1e-12)
    # max-product: the best configuration, point by point
    np.testing.assert_allclose(log_partition(factors, "max"), joint.max(0).sum(), rtol=1e-12)
    _, w_max = posterior_weights(factors, "max")
    np.testing.assert_array_equal(np.argmax(np.asarray(w_max["x"]), 0), joint.argmax(0))


def test_weights_on_a_plate_of_one_element_are_refused():
    factors = mixture_factors(np.log([0.4, 0.6]), np.array([[1.9], [0.3]]), np.array([2.0]))
    with pytest.raises(NotImplementedError, match="one element"):
        log_partition(factors)


def test_weighted_plate_counts_each_element_w_times():
    K, N = 2, 4
    log_w = np.log(RNG.dirichlet(np.ones(K)))
    log_lik = RNG.normal(size=(K, N))
    weights = np.array([1.0, 2.0, 0.5, 3.0])
    factors = mixture_factors(log_w, log_lik, weights)
    per_point = logsumexp(log_w[:, None] + log_lik, axis=0)
    np.testing.assert_allclose(log_partition(factors), weights @ per_point, rtol=1e-12)
    # an integer weight is a repeated point: the same log Z as the data with repeats
    repeated = mixture_factors(log_w, np.repeat(log_lik, [1, 2, 1, 3], axis=1))
    integer = mixture_factors(log_w, log_lik, np.array([1.0, 2.0, 1.0, 3.0]))
    np.testing.assert_allclose(log_partition(integer), log_partition(repeated), rtol=1e-12)


def chain_factors(log_init, log_trans, log_emit):
    """A hidden Markov chain z_0..z_{T-1} as a vectorised ``scan`` leaves it: the first step
    unrolled (``_PREV_z``), the rest stacked along ``_time_z`` with the previous state as the
    ``_PREV_z`` dim; the homogeneous transition has a time dim of size 1."""
    T, K = log_emit.shape
    time = "_time_z"
    lag = (("_PREV_z", "z", 1),)
    metas = (
        FactorMeta("_PREV_z", ((-1, "_PREV_z"),), False, frozenset(), (K,), site="z", step=1),
        FactorMeta("_PREV_y", ((-1, "_PREV_z"),), True, frozenset(), (K,), site="y", step=1),
        FactorMeta("z", ((-3, time), (-2, "_PREV_z"), (-1, "z")), False, frozenset(),
                   (1, K, K), time, lag, "z"),
        FactorMeta("y", ((-3, time), (-1, "z")), True, frozenset(), (T - 1, 1, K), time, (), "y"),
    )
    logs = {"_PREV_z": log_init, "_PREV_y": log_emit[0], "z": log_trans[None],
            "y": log_emit[1:, None, :]}
    return Factors(logs, metas)


def brute_force_chain(log_init, log_trans, log_emit):
    T, K = log_emit.shape
    paths = np.array(list(itertools.product(range(K), repeat=T)))
    logp = (log_init[paths[:, 0]] + log_emit[np.arange(T), paths].sum(1)
            + log_trans[paths[:, :-1], paths[:, 1:]].sum(1))
    return paths, logp


@pytest.mark.parametrize("parallel_time", [False, True])
def test_chain_log_z_and_marginals_match_brute_force(parallel_time):
    T, K = 5, 3
    log_init = np.log(RNG.dirichlet(np.ones(K)))
    log_trans = np.log(RNG.dirichlet(np.ones(K), size=K))
    log_emit = RNG.normal(size=(T, K))
    factors = chain_factors(log_init, log_trans, log_emit)
    paths, logp = brute_force_chain(log_init, log_trans, log_emit)
    log_z, w = posterior_weights(factors, "sum", parallel_time)
    np.testing.assert_allclose(log_z, logsumexp(logp), rtol=1e-12)
    post = np.exp(logp - logsumexp(logp))
    xi = np.zeros((K, K))  # transition counts summed over time
    for path, pr in zip(paths, post):
        np.add.at(xi, (path[:-1], path[1:]), pr)
    np.testing.assert_allclose(np.asarray(w["z"])[0], xi, atol=1e-12)
    first = np.array([post[paths[:, 0] == k].sum() for k in range(K)])
    np.testing.assert_allclose(w["_PREV_z"], first, atol=1e-12)
    np.testing.assert_allclose(log_partition(factors, "max", parallel_time), logp.max(),
                               rtol=1e-12)


def test_chain_with_zero_transitions_has_finite_weights():
    """A left-to-right chain (exact zeros in the transition matrix): states no path reaches
    keep weight 0, not NaN."""
    T, K = 4, 3
    trans = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    with np.errstate(divide="ignore"):
        log_init = np.log(np.array([1.0, 0.0, 0.0]))
        log_trans = np.log(trans)
    log_emit = RNG.normal(size=(T, K))
    factors = chain_factors(log_init, log_trans, log_emit)
    paths, logp = brute_force_chain(log_init, log_trans, log_emit)
    log_z, w = posterior_weights(factors)
    np.testing.assert_allclose(log_z, logsumexp(logp), rtol=1e-12)
    assert all(np.isfinite(np.asarray(v)).all() for v in w.values())
    post = np.exp(logp - logsumexp(logp))
    xi = np.zeros((K, K))
    for path, pr in zip(paths, post):
        np.add.at(xi, (path[:-1], path[1:]), pr)
    np.testing.assert_allclose(np.asarray(w["z"])[0], xi, atol=1e-12)


# -- generated structures: hypothesis draws sizes, weights and impossible entries -----------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def with_zeros(a, mask):
    """Entries of ``a`` where ``mask`` is set made impossible (log 0)."""
    return np.where(mask, -np.inf, a)


@st.composite
def mixtures(draw):
    K, N = draw(st.integers(2, 4)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    log_w = np.log(rng.dirichlet(np.ones(K)))
    log_lik = rng.normal(scale=3.0, size=(K, N))
    # some components impossible for some points, never all of them for one point
    zeros = rng.random((K, N)) < 0.3
    zeros[rng.integers(K, size=N), np.arange(N)] = False
    weighted = N > 1 and draw(st.booleans())  # a plate of one element takes no weights
    weights = rng.choice([0.5, 1.0, 2.0, 3.0], size=N) if weighted else None
    return log_w, with_zeros(log_lik, zeros), weights


@settings(max_examples=5, **SETTINGS)
@given(mixtures())
def test_generated_mixtures_match_brute_force(case):
    log_w, log_lik, weights = case
    factors = mixture_factors(log_w, log_lik, weights)
    joint = log_w[:, None] + log_lik
    per_point = logsumexp(joint, axis=0)
    w = np.ones(joint.shape[1]) if weights is None else weights
    log_z, post = posterior_weights(factors)
    np.testing.assert_allclose(log_z, w @ per_point, rtol=1e-10)
    expected = np.exp(joint - per_point) * w  # weighted plates weight the posteriors too
    np.testing.assert_allclose(post["x"], expected, atol=1e-10)
    assert all(np.isfinite(np.asarray(v)).all() for v in post.values())
    np.testing.assert_allclose(log_partition(factors, "max"), w @ joint.max(0), rtol=1e-10)


@st.composite
def chains(draw):
    T, K = draw(st.integers(2, 5)), draw(st.integers(2, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    trans = rng.dirichlet(np.ones(K), size=K)
    if draw(st.booleans()):  # exact zeros off the diagonal: some states unreachable
        trans = trans * (rng.random((K, K)) > 0.4) + np.eye(K) * 1e-3
        trans = trans / trans.sum(1, keepdims=True)
    with np.errstate(divide="ignore"):
        return (np.log(rng.dirichlet(np.ones(K))), np.log(trans),
                rng.normal(scale=2.0, size=(T, K)), draw(st.booleans()))


@settings(max_examples=5, **SETTINGS)
@given(chains())
def test_generated_chains_match_brute_force(case):
    log_init, log_trans, log_emit, parallel_time = case
    factors = chain_factors(log_init, log_trans, log_emit)
    paths, logp = brute_force_chain(log_init, log_trans, log_emit)
    log_z, w = posterior_weights(factors, "sum", parallel_time)
    np.testing.assert_allclose(log_z, logsumexp(logp), rtol=1e-10)
    assert all(np.isfinite(np.asarray(v)).all() for v in w.values())
    post = np.exp(logp - logsumexp(logp))
    K = log_emit.shape[1]
    xi = np.zeros((K, K))
    for path, pr in zip(paths, post):
        np.add.at(xi, (path[:-1], path[1:]), pr)
    np.testing.assert_allclose(np.asarray(w["z"])[0], xi, atol=1e-10)
    np.testing.assert_allclose(log_partition(factors, "max", parallel_time), logp.max(),
                               rtol=1e-10)


def test_log_sum_exp_matches_scipy_with_softmax_derivatives():
    """`contraction.log_sum_exp` (the one-factor reduction, its exp kept out of place): value
    as SciPy's logsumexp, gradient the softmax, Hessian diag(p) − p pᵀ, over any axes; a
    slice of -inf gives -inf."""
    import jax.numpy as jnp

    from bayes_em.contraction import log_sum_exp

    with jax.enable_x64(True):
        a = np.random.default_rng(0).normal(size=(4, 3, 2)) * 5
        for axes in [(0,), (1,), (0, 2)]:
            np.testing.assert_allclose(log_sum_exp(jnp.asarray(a), axes),
                                       logsumexp(a, axis=axes), rtol=1e-13)
        g = np.asarray(jax.grad(lambda v: log_sum_exp(v, (0,)).sum())(jnp.asarray(a)))
        p = np.exp(a - logsumexp(a, axis=0, keepdims=True))
        np.testing.assert_allclose(g, p, rtol=1e-12)
        v = a[:, 0, 0]
        h = np.asarray(jax.hessian(lambda u: log_sum_exp(u, (0,)))(jnp.asarray(v)))
        q = np.exp(v - logsumexp(v))
        np.testing.assert_allclose(h, np.diag(q) - np.outer(q, q), atol=1e-13)
        assert float(log_sum_exp(jnp.full((3,), -jnp.inf), (0,))) == -np.inf
