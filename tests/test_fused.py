"""One-pass EM (`bayes_em.fused`): the E-step's additive statistics carried in the state instead
of the weights, at once or over blocks of rows. Reference: a NumPy EM for a full-covariance
Gaussian mixture from the same start (float64), and the unfused numeric path's structure."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from shared_models import full_gmm

from bayes_em import EM, fused


def laplace_mixture(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Laplace(loc[z], 1.0), obs=x)


def numpy_em(x, w, mu, cov, n_iter):
    """Textbook EM for a full-covariance mixture (densities by Cholesky solves)."""
    N, D = x.shape
    for _ in range(n_iter):
        logp = np.empty((N, len(w)))
        for k in range(len(w)):
            L = np.linalg.cholesky(cov[k])
            y = np.linalg.solve(L, (x - mu[k]).T)
            logp[:, k] = (np.log(w[k]) - 0.5 * np.sum(y**2, 0) - np.log(np.diag(L)).sum()
                          - 0.5 * D * np.log(2 * np.pi))
        m = logp.max(1, keepdims=True)
        r = np.exp(logp - m)
        r /= r.sum(1, keepdims=True)
        n = r.sum(0)
        w, mu = n / N, (r.T @ x) / n[:, None]
        cov = np.stack([((x - mu[k]).T * r[:, k]) @ (x - mu[k]) / n[k] for k in range(len(w))])
    return w, mu, cov


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    K, D, N = 3, 3, 1000
    centres = rng.normal(size=(K, D)) * 3 + 50.0  # away from the origin: the references matter
    x = centres[rng.integers(K, size=N)] + rng.normal(size=(N, D))
    init = dict(w=np.ones(K) / K, loc=x[:K].copy(), cov=np.stack([np.eye(D) * 2.0] * K))
    return x, init


@pytest.mark.parametrize("block_rows", [0, 128, 333])  # at once, blocks (a masked last one)
def test_one_pass_matches_numpy_em(data, block_rows, monkeypatch):
    x, init = data
    monkeypatch.setattr(fused, "BLOCK_ROWS", block_rows)
    result = EM(full_gmm, max_iter=6, tol=0.0, init_values=init, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), 3)
    plan = result.problem.fused
    assert plan is not None and (plan.blocks is None) == (block_rows == 0)
    w, mu, cov = numpy_em(x, init["w"], init["loc"], init["cov"], 6)
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-9)
    np.testing.assert_allclose(result.params["loc"], mu, rtol=1e-9)
    np.testing.assert_allclose(result.params["cov"], cov, rtol=1e-9)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_numeric_parameters_keep_the_weights():
    x = np.random.default_rng(0).laplace(size=200)
    result = EM(laplace_mixture, max_iter=3, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), 2)
    assert result.problem.fused is None
