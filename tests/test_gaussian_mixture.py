"""Gaussian mixtures against scikit-learn's GaussianMixture from the same initial parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from sklearn.mixture import GaussianMixture

from bayes_em import EM, LBFGS

PRECISE = LBFGS(max_steps=1000, gtol=1e-13)


def gmm_1d(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros(K))
    var = numpyro.param("var", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], jnp.sqrt(var[z])), obs=x)


def gmm_full(x, K):
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    cov = numpyro.param(
        "cov", jnp.broadcast_to(jnp.eye(D), (K, D, D)), constraint=constraints.positive_definite
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov[z]), obs=x)


def simulate(rng, n, locs, scales):
    z = rng.integers(len(locs), size=n)
    locs = np.asarray(locs)
    scales = np.asarray(scales).reshape((-1,) + (1,) * (locs.ndim - 1))
    return locs[z] + scales[z] * rng.standard_normal((n,) + locs.shape[1:])


def sklearn_fit(x, w0, m0, c0, n_iter):
    gm = GaussianMixture(
        len(w0), covariance_type="full", reg_covar=0.0, tol=0.0, max_iter=n_iter,
        weights_init=w0, means_init=m0, precisions_init=np.linalg.inv(c0),
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(x)
    assert gm.n_iter_ == n_iter
    return gm


def assert_monotone(result):
    obj = result.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())


def test_1d_matches_sklearn():
    rng = np.random.default_rng(0)
    x = simulate(rng, 400, [-2.0, 0.5, 3.0], [0.7, 1.0, 0.5])
    w0, m0, v0 = np.array([0.2, 0.3, 0.5]), np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.5])
    n_iter = 25
    em = EM(gmm_1d, max_iter=n_iter, tol=0.0, mstep=PRECISE, progress_bar=False,
            init_values=dict(w=w0, loc=m0, var=v0))
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(x), K=3)
    gm = sklearn_fit(x[:, None], w0, m0[:, None], v0[:, None, None], n_iter)
    assert result.n_iter == n_iter
    np.testing.assert_allclose(result.log_likelihood, gm.score(x[:, None]) * len(x), rtol=1e-8)
    np.testing.assert_allclose(result.params["w"], gm.weights_, atol=1e-6)
    np.testing.assert_allclose(result.params["loc"], gm.means_[:, 0], atol=1e-6)
    np.testing.assert_allclose(result.params["var"], gm.covariances_[:, 0, 0], atol=1e-6)
    assert_monotone(result)


def test_2d_full_covariance_matches_sklearn():
    rng = np.random.default_rng(1)
    locs = np.array([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]])
    x = simulate(rng, 300, locs, [0.8, 0.6, 1.0])
    x[:, 1] += 0.5 * x[:, 0]  # correlated coordinates
    w0 = np.array([0.3, 0.3, 0.4])
    m0 = np.array([[-1.0, 0.0], [0.0, 1.0], [0.5, -0.5]])
    c0 = np.stack([np.eye(2), [[2.0, 0.3], [0.3, 1.0]], 0.5 * np.eye(2)])
    n_iter = 20
    em = EM(gmm_full, max_iter=n_iter, tol=0.0, mstep=PRECISE, progress_bar=False,
            init_values=dict(w=w0, loc=m0, cov=c0))
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(x), K=3)
    gm = sklearn_fit(x, w0, m0, c0, n_iter)
    np.testing.assert_allclose(result.log_likelihood, gm.score(x) * len(x), rtol=1e-8)
    np.testing.assert_allclose(result.params["w"], gm.weights_, atol=1e-6)
    np.testing.assert_allclose(result.params["loc"], gm.means_, atol=1e-6)
    np.testing.assert_allclose(result.params["cov"], gm.covariances_, atol=1e-6)
    np.testing.assert_allclose(result.posterior["z"], gm.predict_proba(x), atol=1e-6)
    assert_monotone(result)
