"""MAP-EM against closed-form posterior modes written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from scipy.stats import norm

from bayes_em import EM, LBFGS

PRECISE = LBFGS(max_steps=500, gtol=1e-13)
LOCS = np.array([-2.0, 0.0, 3.0])


def weights_model(x, alpha):
    w = numpyro.sample("w", dist.Dirichlet(alpha))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(jnp.asarray(LOCS)[z], 1.0), obs=x)


def responsibilities(x, w, locs, scales):
    joint = np.log(w) + norm.logpdf(x[:, None], locs, scales)
    return np.exp(joint - np.logaddexp.reduce(joint, axis=1, keepdims=True))


def data(seed=0, n=200):
    rng = np.random.default_rng(seed)
    z = rng.choice(3, size=n, p=[0.2, 0.5, 0.3])
    return LOCS[z] + rng.standard_normal(n)


def test_dirichlet_weights_one_iteration_closed_form():
    x, alpha, w0 = data(), np.array([2.0, 3.0, 1.5]), np.array([0.2, 0.3, 0.5])
    em = EM(weights_model, max_iter=1, tol=0.0, init_values=dict(w=w0), mstep=PRECISE,
            progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(alpha))
    n_k = responsibilities(x, w0, LOCS, 1.0).sum(0)
    expected = (n_k + alpha - 1) / (len(x) + alpha.sum() - len(alpha))
    np.testing.assert_allclose(result.params["w"], expected, atol=1e-8)
    expected_prior = dist.Dirichlet(jnp.asarray(alpha)).log_prob(jnp.asarray(expected))
    np.testing.assert_allclose(result.log_prior, expected_prior, rtol=1e-6)


def test_dirichlet_weights_fixed_point():
    x, alpha = data(1), np.array([5.0, 1.0, 2.0])
    em = EM(weights_model, max_iter=500, tol=1e-14, mstep=PRECISE, progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(alpha))
    w = np.asarray(result.params["w"])
    n_k = responsibilities(x, w, LOCS, 1.0).sum(0)
    np.testing.assert_allclose(w, (n_k + alpha - 1) / (len(x) + alpha.sum() - 3), atol=1e-8)
    obj = result.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-12 * np.abs(obj).max())


A, B = 3.0, 2.0
W = np.array([0.4, 0.6])
MU = np.array([-1.0, 2.0])


def variance_model(x):
    with numpyro.plate("components", 2):
        var = numpyro.sample("var", dist.InverseGamma(A, B))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("x", dist.Normal(jnp.asarray(MU)[z], jnp.sqrt(var[z])), obs=x)


def test_inverse_gamma_variance_closed_form_mode():
    rng = np.random.default_rng(2)
    z = rng.choice(2, size=150, p=W)
    x = MU[z] + np.array([0.7, 1.5])[z] * rng.standard_normal(150)
    var0 = np.array([0.5, 2.0])
    em = EM(variance_model, max_iter=1, tol=0.0, init_values=dict(var=var0), mstep=PRECISE,
            progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(x))
    r = responsibilities(x, W, MU, np.sqrt(var0))
    ss = (r * (x[:, None] - MU) ** 2).sum(0)
    expected = (B + ss / 2) / (A + 1 + r.sum(0) / 2)  # mode of the inverse-gamma posterior
    np.testing.assert_allclose(result.params["var"], expected, atol=1e-8)


def niw_mixture(x, K, mu_p, kappa, nu, lam, alpha):
    """Fraley & Raftery (2007) prior: Σ_k ~ IW(ν, Λ), μ_k | Σ_k ~ N(μ_P, Σ_k/κ), w ~ Dir(α)."""
    w = numpyro.sample("w", dist.Dirichlet(alpha * jnp.ones(K)))
    with numpyro.plate("components", K):
        cov = numpyro.sample("cov", dist.InverseWishart(nu, lam))
        loc = numpyro.sample("loc", dist.MultivariateNormal(mu_p, covariance_matrix=cov / kappa))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov[z]), obs=x)


def test_normal_inverse_wishart_map_matches_fraley_raftery():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(3)
    K, D = 2, 2
    x = np.concatenate([rng.normal([-1, 0], 0.8, (40, 2)), rng.normal([2, 1], 0.5, (30, 2))])
    mu_p, kappa, nu, alpha = x.mean(0), 0.05, D + 2.0, 2.0
    lam = np.cov(x.T) / K ** (2 / D)  # the F&R default scale
    w0 = np.array([0.5, 0.5])
    m0 = np.array([[-0.5, 0.0], [1.5, 0.5]])
    c0 = np.stack([np.eye(2), 0.5 * np.eye(2)])
    em = EM(niw_mixture, max_iter=1, tol=0.0, init_values=dict(w=w0, loc=m0, cov=c0),
            mstep=LBFGS(max_steps=2000, gtol=1e-14), progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(x), K, jnp.asarray(mu_p), kappa, nu,
                    jnp.asarray(lam), alpha)
    ll = np.stack([multivariate_normal.logpdf(x, m0[k], c0[k]) for k in range(K)], 1) + np.log(w0)
    r = np.exp(ll - np.logaddexp.reduce(ll, 1, keepdims=True))
    n = r.sum(0)
    xbar = r.T @ x / n[:, None]
    mu = (n[:, None] * xbar + kappa * mu_p) / (kappa + n[:, None])
    cov = []
    for k in range(K):
        d = x - xbar[k]
        W = (r[:, k, None] * d).T @ d
        e = (xbar[k] - mu_p)[:, None]
        cov.append((lam + kappa * n[k] / (n[k] + kappa) * e @ e.T + W) / (nu + n[k] + D + 2))
    np.testing.assert_allclose(result.params["w"], (n + alpha - 1) / (len(x) + K * alpha - K),
                               atol=1e-8)
    np.testing.assert_allclose(result.params["loc"], mu, atol=1e-6)
    np.testing.assert_allclose(result.params["cov"], np.stack(cov), atol=1e-6)


def test_dirichlet_map_reaching_the_boundary_keeps_a_finite_objective():
    """A component no observation can come from gets zero expected count: under Dirichlet(1) its
    MAP weight is 0 (KKT), kept exactly 0. The log prior is then the Dirichlet of the other
    components on their face (bayes_em.boundary): Dirichlet(1, 1) has density 1, log prior 0
    (NumPyro's Dirichlet.log_prob would give NaN at an exact 0)."""

    def mixture(y):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
        emit = numpyro.param("emit", jnp.array([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]]),
                             constraint=constraints.simplex)
        emit = jnp.concatenate([jnp.array([[0.0, 0.0, 1.0]]), emit])  # a fixed first row
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("y", dist.Categorical(emit[z]), obs=y)

    y = jnp.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 1])  # symbol 2, the first component's, never seen
    result = EM(mixture, max_iter=200, tol=1e-10, init_values=dict(w=jnp.ones(3) / 3),
                progress_bar=False).run(jax.random.PRNGKey(0), y)
    assert result.status == "converged"
    w = np.asarray(result.params["w"])
    emit = np.concatenate([[[0.0, 0.0, 1.0]], np.asarray(result.params["emit"])])
    assert w[0] == 0.0  # exactly: the excluded component cannot leak back
    brute = np.sum(np.log(w @ emit[:, np.asarray(y)]))  # Σ_n log Σ_k w_k emit[k, y_n]
    np.testing.assert_allclose(result.log_likelihood, brute, rtol=1e-12)
    np.testing.assert_allclose(result.log_prior, 0.0, atol=1e-12)  # Dirichlet(1, 1) on the face


def test_dirichlet_below_one_annihilates_a_component_with_a_defined_objective():
    """Dirichlet(α < 1) MAP: a component whose expected count c_j ≤ 1 − α_j gets weight 0 (KKT)
    and is dropped from the prior (Figueiredo & Jain 2002): the log prior is that of the others'
    Dirichlet on their face, computed here with scipy, and the objective is finite."""
    from scipy.stats import dirichlet

    def mixture(x):
        w = numpyro.sample("w", dist.Dirichlet(jnp.full(3, 0.5)))
        loc = numpyro.param("loc", jnp.array([-3.0, 3.0, 40.0]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-3, 1, 40), rng.normal(3, 1, 60)]))
    result = EM(mixture, max_iter=500, tol=1e-12, init_values=dict(w=jnp.ones(3) / 3),
                progress_bar=False).run(jax.random.PRNGKey(0), x)
    w = np.asarray(result.params["w"])
    assert w[2] == 0.0 and result.status == "converged"
    assert np.isfinite(result.objective)
    np.testing.assert_allclose(result.log_prior, dirichlet([0.5, 0.5]).logpdf(w[:2]), rtol=1e-10)
    # the other weights: the KKT point of the remaining two, (c_k + α − 1) / (N + 2α − 2)
    r = np.asarray(result.posterior["z"])
    n = r.sum(0)
    np.testing.assert_allclose(w[:2], (n[:2] - 0.5) / (len(x) - 1.0), rtol=1e-8)
