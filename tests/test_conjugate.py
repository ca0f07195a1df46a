"""Closed-form M-steps: each family against the numeric M-step and a closed form written here."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import norm

from bayes_em import EM, LBFGS

PRECISE = LBFGS(max_steps=1000, gtol=1e-13)
W = np.array([0.3, 0.7])


def one_step(model, init, *args, closed_form=True, n_iter=1, **kwargs):
    em = EM(model, max_iter=n_iter, tol=0.0, init_values=init, mstep=PRECISE,
            closed_form=closed_form, progress_bar=False)
    return em.run(jax.random.PRNGKey(0), *args, **kwargs)


def resp(log_lik_nk, w=W):
    """Responsibilities from per-point component log-likelihoods (N, K)."""
    joint = np.log(w) + log_lik_nk
    return np.exp(joint - logsumexp(joint, axis=1, keepdims=True))


def check(model, init, expected, *args, families, **kwargs):
    closed = one_step(model, init, *args, **kwargs)
    numeric = one_step(model, init, *args, closed_form=False, **kwargs)
    for name, family in families.items():
        assert closed.mstep_paths[name].startswith(f"closed-form {family}"), closed.mstep_paths
        assert numeric.mstep_paths[name] == "numeric"
    for name, value in expected.items():
        np.testing.assert_allclose(closed.params[name], value, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(numeric.params[name], value, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(closed.objective, numeric.objective, rtol=1e-9)


# --- Bernoulli with a Beta prior: latent class analysis --------------------------------------
def latent_class(x):
    with numpyro.plate("classes", 2, dim=-2), numpyro.plate("items", x.shape[1], dim=-1):
        theta = numpyro.sample("theta", dist.Beta(2.0, 3.0))
    with numpyro.plate("data", x.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        with numpyro.plate("items_", x.shape[1], dim=-1):
            numpyro.sample("x", dist.Bernoulli(theta[z, jnp.arange(x.shape[1])]), obs=x)


def test_bernoulli_beta():
    rng = np.random.default_rng(0)
    x = (rng.uniform(size=(80, 4))
         < np.where(rng.uniform(size=(80, 1)) < 0.5, 0.8, 0.2)).astype(float)
    t0 = rng.uniform(0.2, 0.8, size=(2, 4))
    ll = (x[:, None, :] * np.log(t0) + (1 - x[:, None, :]) * np.log(1 - t0)).sum(-1)
    r = resp(ll)
    expected = (r.T @ x + 2.0 - 1) / (r.sum(0)[:, None] + 2.0 + 3.0 - 2)
    check(latent_class, dict(theta=t0), dict(theta=expected), jnp.asarray(x),
          families=dict(theta="bernoulli"))


# --- Binomial, Poisson, Exponential -----------------------------------------------------------
def binomial_mix(x):
    p = numpyro.param("p", jnp.array([0.3, 0.6]), constraint=constraints.unit_interval)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("x", dist.Binomial(10, probs=p[z]), obs=x)


def test_binomial_ml():
    x = np.random.default_rng(1).binomial(10, 0.4, size=60).astype(float)
    p0 = np.array([0.3, 0.6])
    from scipy.stats import binom
    r = resp(binom.logpmf(x[:, None], 10, p0))
    expected = (r * x[:, None]).sum(0) / (10 * r.sum(0))
    check(binomial_mix, dict(p=p0), dict(p=expected), jnp.asarray(x), families=dict(p="binomial"))


def poisson_mix(x):
    with numpyro.plate("components", 2):
        rate = numpyro.sample("rate", dist.Gamma(3.0, 0.5))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("x", dist.Poisson(rate[z]), obs=x)


def test_poisson_gamma():
    x = np.random.default_rng(2).poisson(4.0, size=70).astype(float)
    r0 = np.array([2.0, 6.0])
    from scipy.stats import poisson
    r = resp(poisson.logpmf(x[:, None], r0))
    expected = ((r * x[:, None]).sum(0) + 3.0 - 1) / (r.sum(0) + 0.5)
    check(poisson_mix, dict(rate=r0), dict(rate=expected), jnp.asarray(x),
          families=dict(rate="poisson"))


def exponential_mix(x):
    with numpyro.plate("components", 2):
        rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("x", dist.Exponential(rate[z]), obs=x)


def test_exponential_gamma():
    x = np.random.default_rng(3).exponential(1.5, size=70)
    r0 = np.array([0.5, 2.0])
    r = resp(np.log(r0) - r0 * x[:, None])
    expected = (r.sum(0) + 2.0 - 1) / ((r * x[:, None]).sum(0) + 1.0)
    check(exponential_mix, dict(rate=r0), dict(rate=expected), jnp.asarray(x),
          families=dict(rate="exponential"))


# --- Normal location and scale ----------------------------------------------------------------
def normal_mix(x):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("components", 2):
        scale = numpyro.sample("scale", dist.InverseGamma(3.0, 2.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def test_normal_loc_ml_and_scale_inverse_gamma():
    x = np.random.default_rng(4).normal(size=90) * 2
    m0, s0 = np.array([-1.5, 1.0]), np.array([0.7, 1.3])
    r = resp(norm.logpdf(x[:, None], m0, s0))
    n, m = r.sum(0), (r * x[:, None]).sum(0) / r.sum(0)
    ss = (r * (x[:, None] - m) ** 2).sum(0)
    # mode of σ under InverseGamma(a, b) on σ: (a+1+n) σ² − b σ − ss = 0
    a, b = 3.0, 2.0
    c = a + 1 + n
    s = (b + np.sqrt(b * b + 4 * c * ss)) / (2 * c)
    check(normal_mix, dict(loc=m0, scale=s0), dict(loc=m, scale=s), jnp.asarray(x),
          families=dict(loc="normal_loc", scale="normal_scale"))


def normal_prior_loc(x):
    with numpyro.plate("components", 2):
        loc = numpyro.sample("loc", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("x", dist.Normal(loc[z], 1.5), obs=x)


def test_normal_loc_with_normal_prior():
    x = np.random.default_rng(5).normal(size=50) + 1
    m0 = np.array([-1.0, 2.0])
    r = resp(norm.logpdf(x[:, None], m0, 1.5))
    expected = ((r * x[:, None]).sum(0) / 1.5**2 + 0.0 / 4) / (r.sum(0) / 1.5**2 + 1 / 4)
    check(normal_prior_loc, dict(loc=m0), dict(loc=expected), jnp.asarray(x),
          families=dict(loc="normal_loc"))


# --- Gaussian mixtures: diagonal, spherical and tied covariances -----------------------------
def diag_gmm(x, K):
    loc = numpyro.param("loc", jnp.zeros((K, x.shape[1])))
    scale = numpyro.param("scale", jnp.ones((K, x.shape[1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]).to_event(1), obs=x)


def spherical_gmm(x, K):
    loc = numpyro.param("loc", jnp.zeros((K, x.shape[1])))
    scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.Normal(loc[z], scale[z][..., None]).to_event(1), obs=x)


def tied_gmm(x, K):
    D = x.shape[1]
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    cov = numpyro.param("cov", jnp.eye(D), constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov), obs=x)


def gmm_data():
    rng = np.random.default_rng(6)
    z = rng.integers(3, size=120)
    return (np.array([[0.0, 0.0], [3.0, 1.0], [0.0, 4.0]])[z]
            + rng.normal(size=(120, 2)) * [1.0, 0.6])


M0 = np.array([[-0.5, 0.5], [2.0, 0.0], [0.5, 3.0]])


def test_diagonal_gaussian():
    x = gmm_data()
    s0 = np.array([[1.0, 0.5], [0.8, 1.2], [1.5, 1.0]])
    r = resp(norm.logpdf(x[:, None, :], M0, s0).sum(-1), np.ones(3) / 3)
    n = r.sum(0)[:, None]
    m = r.T @ x / n
    var = (r.T @ x**2) / n - m**2
    check(diag_gmm, dict(loc=M0, scale=s0), dict(loc=m, scale=np.sqrt(var)), jnp.asarray(x),
          K=3, families=dict(loc="normal_loc", scale="normal_scale"))


def test_spherical_gaussian():
    x = gmm_data()
    s0 = np.array([1.0, 0.5, 2.0])
    r = resp(norm.logpdf(x[:, None, :], M0, s0[:, None]).sum(-1), np.ones(3) / 3)
    n = r.sum(0)
    m = r.T @ x / n[:, None]
    ss = (r * ((x[:, None, :] - m) ** 2).sum(-1)).sum(0)
    check(spherical_gmm, dict(loc=M0, scale=s0), dict(loc=m, scale=np.sqrt(ss / (2 * n))),
          jnp.asarray(x), K=3, families=dict(loc="normal_loc", scale="normal_scale"))


def test_tied_covariance():
    from scipy.stats import multivariate_normal
    x = gmm_data()
    c0 = np.array([[1.5, 0.3], [0.3, 0.8]])
    ll = np.stack([multivariate_normal.logpdf(x, M0[k], c0) for k in range(3)], 1)
    r = resp(ll, np.ones(3) / 3)
    m = r.T @ x / r.sum(0)[:, None]
    cov = sum((r[:, k, None] * (x - m[k])).T @ (x - m[k]) for k in range(3)) / len(x)
    check(tied_gmm, dict(loc=M0, cov=c0), dict(loc=m, cov=cov), jnp.asarray(x), K=3,
          families=dict(loc="mvn_loc", cov="mvn_cov"))


def test_non_selection_keeps_numeric():
    """scale = sqrt(var[z]) is not a selection of var: var stays numeric, loc is closed-form."""
    from test_gaussian_mixture import gmm_1d

    x = jnp.asarray(np.random.default_rng(7).normal(size=40))
    result = one_step(gmm_1d, dict(w=np.array([0.5, 0.5]), loc=np.array([-1.0, 1.0]),
                                   var=np.array([1.0, 1.0])), x, K=2)
    assert result.mstep_paths == {"w": "closed-form categorical", "loc": "closed-form normal_loc",
                                  "var": "numeric"}


@pytest.mark.parametrize("model,init,kwargs", [
    (normal_mix, dict(loc=np.array([-1.0, 1.0]), scale=np.array([1.0, 1.0])), {}),
    (normal_prior_loc, dict(loc=np.array([-1.0, 1.0])), {}),
])
def test_closed_form_and_numeric_reach_the_same_optimum(model, init, kwargs):
    x = jnp.asarray(np.concatenate([np.random.default_rng(8).normal(size=40) - 2,
                                    np.random.default_rng(9).normal(size=40) + 2]))
    a = EM(model, max_iter=2000, tol=1e-14, init_values=init, progress_bar=False).run(
        jax.random.PRNGKey(0), x, **kwargs)
    b = EM(model, max_iter=2000, tol=1e-14, init_values=init, progress_bar=False,
           closed_form=False, mstep=PRECISE).run(jax.random.PRNGKey(0), x, **kwargs)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], atol=1e-6)


def iw_gmm(x, K):
    D = x.shape[1]
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    with numpyro.plate("components", K):
        cov = numpyro.sample("cov", dist.InverseWishart(D + 2.0, 0.5 * jnp.eye(D)))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov[z]), obs=x)


def test_full_covariance_inverse_wishart():
    from scipy.stats import multivariate_normal
    x = gmm_data()
    c0 = np.stack([np.eye(2), [[1.5, 0.3], [0.3, 0.8]], 0.5 * np.eye(2)])
    ll = np.stack([multivariate_normal.logpdf(x, M0[k], c0[k]) for k in range(3)], 1)
    r = resp(ll, np.ones(3) / 3)
    n = r.sum(0)
    m = r.T @ x / n[:, None]
    cov = np.stack([(0.5 * np.eye(2) + (r[:, k, None] * (x - m[k])).T @ (x - m[k]))
                    / (4.0 + n[k] + 3)
                    for k in range(3)])  # (Ψ + S_k) / (ν + n_k + D + 1)
    check(iw_gmm, dict(loc=M0, cov=c0), dict(loc=m, cov=cov), jnp.asarray(x), K=3,
          families=dict(loc="mvn_loc", cov="mvn_cov"))


def event_prior_diag(x, K):
    D = x.shape[1]
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    scale = numpyro.sample("scale", dist.InverseGamma(3.0 * jnp.ones((K, D)), 2.0).to_event(2))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]).to_event(1), obs=x)


def test_to_event_prior_takes_the_closed_form():
    x = gmm_data()
    s0 = np.array([[1.0, 0.5], [0.8, 1.2], [1.5, 1.0]])
    r = resp(norm.logpdf(x[:, None, :], M0, s0).sum(-1), np.ones(3) / 3)
    n = r.sum(0)[:, None]
    m = r.T @ x / n
    ss = r.T @ x**2 - n * m**2
    c = 3.0 + 1 + n
    s = (2.0 + np.sqrt(4.0 + 4 * c * ss)) / (2 * c)
    check(event_prior_diag, dict(loc=M0, scale=s0), dict(loc=m, scale=s), jnp.asarray(x), K=3,
          families=dict(loc="normal_loc", scale="normal_scale"))


@pytest.mark.parametrize("counts, alpha", [
    ([5.0, 0.2, 3.0, 0.0], [0.5, 0.5, 0.9, 0.3]),  # c + α − 1 < 0 for two components
    ([4.0, 0.0, 1.5], [1.0, 1.0, 0.6]),  # c + α − 1 = 0: the boundary maximum is attained
])
def test_dirichlet_mode_below_one_is_the_constrained_optimum(counts, alpha):
    """Dirichlet α < 1: p_j ∝ max(c_j + α_j − 1, 0) (KKT), not clipped interior values. With a
    negative coefficient the objective Σ_j (c_j + α_j − 1) log p_j grows without bound towards
    p_j = 0, so the brute-force reference maximises it over {p ≥ ε} ∩ simplex (Nelder-Mead),
    whose optimum tends to the KKT point as ε → 0."""
    from scipy.optimize import minimize
    from scipy.special import softmax

    from bayes_em.families import _dirichlet_mode

    a = np.asarray(counts) + np.asarray(alpha) - 1.0
    got = np.asarray(_dirichlet_mode(jnp.asarray(counts), jnp.asarray(alpha)))
    assert np.all(got[a <= 0] == 0.0) and np.all(got[a > 0] > 0)
    gaps = []
    for eps in (1e-2, 1e-3, 1e-4):  # p = ε + (1 − Kε) softmax(θ), derivative-free over θ
        p = lambda t: eps + (1 - len(a) * eps) * softmax(t)  # noqa: E731
        res = minimize(lambda t: -np.sum(a * np.log(p(t))), np.zeros(len(a)), method="Nelder-Mead",
                       options=dict(xatol=1e-12, fatol=1e-15, maxiter=20000, maxfev=40000))
        gaps.append(np.max(np.abs(p(res.x) - got)))
        assert gaps[-1] <= 2 * len(a) * eps  # O(ε) from the KKT point
    assert gaps[0] > gaps[1] > gaps[2]
