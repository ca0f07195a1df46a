"""Partially known latents (semi-supervised EM): ``numpyro.sample("z", ..., obs=z_known,
obs_mask=known)`` splits z into data (``z_observed``) and an enumerated latent (``z_unobserved``,
masked where known). Checked against an EM written here with numpy, in which the known rows have
one-hot responsibilities: same start, same number of iterations."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import norm

from bayes_em import EM, LBFGS

PRECISE = LBFGS(max_steps=1000, gtol=1e-13)


def responsibilities(log_joint, z_known, known):
    """p(z_n = k | x_n) for the unknown rows, one-hot for the known ones; and the
    log-likelihood log p(x, z_known) = Σ_known log p(x_n, z_n) + Σ_unknown log p(x_n)."""
    K = log_joint.shape[1]
    lse = logsumexp(log_joint, axis=1)
    r = np.exp(log_joint - lse[:, None])
    r[known] = np.eye(K)[z_known[known]]
    ll = lse[~known].sum() + log_joint[known, z_known[known]].sum()
    return r, ll


def fit(model, init, *args, n_iter, **kwargs):
    em = EM(model, max_iter=n_iter, tol=0.0, init_values=init, mstep=PRECISE, progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), *args, **kwargs)
    assert result.n_iter == n_iter
    obj = result.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())
    return result


# --- Gaussian mixture: every M-step in closed form ---------------------------------------------
def gmm(x, z_known, known, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
    scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w), obs=z_known, obs_mask=known)
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def test_semisupervised_gmm_matches_numpy_em():
    rng = np.random.default_rng(0)
    N, K = 90, 3
    z_true = rng.choice(K, size=N, p=[0.5, 0.3, 0.2])
    x = np.array([-2.0, 0.5, 3.0])[z_true] + rng.normal(size=N) * np.array([1.0, 0.6, 0.9])[z_true]
    known = rng.uniform(size=N) < 0.3
    z_known = np.where(known, z_true, 0)  # any filler where unknown
    w, loc, scale = np.array([0.3, 0.3, 0.4]), np.array([-1.0, 0.0, 1.0]), np.array([1.0, 1.5, 0.7])
    n_iter = 12
    result = fit(gmm, dict(w=w, loc=loc, scale=scale), jnp.asarray(x), jnp.asarray(z_known),
                 jnp.asarray(known), n_iter=n_iter, K=K)
    assert result.sites.latents == ("z_unobserved",)
    assert result.mstep_paths == {"w": "closed-form categorical", "loc": "closed-form normal_loc",
                                  "scale": "closed-form normal_scale"}
    lls = []
    for _ in range(n_iter + 1):
        r, ll = responsibilities(np.log(w) + norm.logpdf(x[:, None], loc, scale), z_known, known)
        lls.append(ll)
        if len(lls) == n_iter + 1:
            break
        n_k = r.sum(0)
        w = n_k / N
        loc = (r * x[:, None]).sum(0) / n_k
        scale = np.sqrt((r * (x[:, None] - loc) ** 2).sum(0) / n_k)
    np.testing.assert_allclose(result.params["w"], w, atol=1e-6)
    np.testing.assert_allclose(result.params["loc"], loc, atol=1e-6)
    np.testing.assert_allclose(result.params["scale"], scale, atol=1e-6)
    np.testing.assert_allclose(result.trace()["log_likelihood"], lls, rtol=1e-8)
    # the posterior of the unknown rows is p(z_n | x_n, θ) at the final parameters
    np.testing.assert_allclose(result.posterior["z_unobserved"][~known], r[~known], atol=1e-8)


# --- Mixture of regressions: numeric M-step for coefficients and variances ----------------------
def regressions(X, y, z_known, known, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    coef = numpyro.param("coef", jnp.zeros((K, X.shape[1])))
    var = numpyro.param("var", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", X.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w), obs=z_known, obs_mask=known)
        mean = jnp.sum(X * coef[z], axis=-1)
        numpyro.sample("y", dist.Normal(mean, jnp.sqrt(var[z])), obs=y)


def test_semisupervised_regressions_numeric_mstep_matches_numpy_em():
    rng = np.random.default_rng(1)
    N, K = 120, 2
    X = np.c_[np.ones(N), rng.uniform(-2, 2, size=N)]
    z_true = rng.choice(K, size=N, p=[0.6, 0.4])
    beta = np.array([[1.0, 2.0], [-1.0, -1.5]])
    y = np.sum(X * beta[z_true], 1) + rng.normal(size=N) * np.array([0.5, 0.8])[z_true]
    known = rng.uniform(size=N) < 0.25
    z_known = np.where(known, z_true, 0)
    w, coef, var = np.array([0.5, 0.5]), np.array([[0.5, 1.0], [0.0, -1.0]]), np.array([1.0, 2.0])
    n_iter = 6
    result = fit(regressions, dict(w=w, coef=coef, var=var), jnp.asarray(X), jnp.asarray(y),
                 jnp.asarray(z_known), jnp.asarray(known), n_iter=n_iter, K=K)
    assert result.mstep_paths["coef"] == "numeric" and result.mstep_paths["var"] == "numeric"
    lls = []
    for it in range(n_iter + 1):
        log_joint = np.log(w) + norm.logpdf(y[:, None], X @ coef.T, np.sqrt(var))
        r, ll = responsibilities(log_joint, z_known, known)
        lls.append(ll)
        if it == n_iter:
            break
        w = r.mean(0)
        coef = np.stack([np.linalg.solve(X.T @ (r[:, k, None] * X), X.T @ (r[:, k] * y))
                         for k in range(K)])
        var = (r * (y[:, None] - X @ coef.T) ** 2).sum(0) / r.sum(0)
    np.testing.assert_allclose(result.params["w"], w, atol=1e-6)
    np.testing.assert_allclose(result.params["coef"], coef, atol=1e-6)
    np.testing.assert_allclose(result.params["var"], var, atol=1e-6)
    np.testing.assert_allclose(result.trace()["log_likelihood"], lls, rtol=1e-8)
