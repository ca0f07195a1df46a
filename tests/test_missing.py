"""Missing values: ``EM(model, missing=("x",))`` marginalises the NaN entries of observed site x.

Each fit is checked against an EM written here with numpy on the observed-data likelihood (the
missing entries' factors dropped, or the marginal N(x_o; μ_o, Σ_oo) for a full covariance), from
the same start; log-likelihoods against brute-force evaluation with scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm, poisson

from bayes_em import EM, LBFGS
from bayes_em.missing import MissingMultivariateNormal
from bayes_em.sites import ModelError

PRECISE = LBFGS(max_steps=1000, gtol=1e-13)


def fit(model, init, *args, n_iter, tol=0.0, **kwargs):
    em = EM(model, missing=("x",), max_iter=n_iter, tol=tol, init_values=init, mstep=PRECISE,
            progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), *args, **kwargs)
    if tol == 0.0:
        assert result.n_iter == n_iter
    obj = result.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())  # still monotone
    return em, result


def posterior(log_joint):
    lse = logsumexp(log_joint, axis=1, keepdims=True)
    return np.exp(log_joint - lse), float(lse.sum())


def two_clusters(rng, N, D, frac=0.15):
    x = np.r_[rng.normal(size=(N // 2, D)) * 0.8 - 1.5, rng.normal(size=(N - N // 2, D)) + 1.5]
    x[:, -1] += 0.5 * x[:, 0]
    x[rng.uniform(size=x.shape) < frac] = np.nan
    x[0] = np.nan  # a row with nothing observed: contributes nothing
    return x


# --- the marginal multivariate normal ------------------------------------------------------------
def test_missing_mvn_log_prob_is_the_marginal_density():
    rng = np.random.default_rng(0)
    K, N, D = 3, 7, 3
    loc = rng.normal(size=(K, 1, D))
    a = rng.normal(size=(K, 1, D, D))
    cov = a @ np.swapaxes(a, -1, -2) + np.eye(D)
    x = rng.normal(size=(N, D))
    observed = rng.uniform(size=(N, D)) > 0.4
    observed[0] = False
    observed[1] = True
    got = np.asarray(MissingMultivariateNormal(jnp.asarray(loc), jnp.asarray(cov), observed)
                     .log_prob(jnp.where(observed, x, 123.0)))
    assert got.shape == (K, N)
    for k in range(K):
        for n in range(N):
            o = observed[n]
            want = 0.0 if not o.any() else multivariate_normal.logpdf(
                x[n, o], loc[k, 0, o], cov[k, 0][np.ix_(o, o)])
            np.testing.assert_allclose(got[k, n], want, rtol=1e-12, atol=1e-12)


# --- diagonal Gaussian mixture: missing coordinates dropped --------------------------------------
def gmm_diag(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, x.shape[1])))
    scale = numpyro.param("scale", jnp.ones((K, x.shape[1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]).to_event(1), obs=x)


def test_diagonal_gmm_with_missing_coordinates_matches_numpy_em():
    rng = np.random.default_rng(1)
    x = two_clusters(rng, 70, 3)
    seen = ~np.isnan(x)
    xz = np.where(seen, x, 0.0)
    w, loc, scale = (np.array([0.4, 0.6]), np.array([[-1.0, 0.0, -0.5], [1.0, 0.5, 1.0]]),
                     np.ones((2, 3)))
    init = dict(w=w, loc=loc, scale=scale)
    n_iter = 6

    def log_joint(w, loc, scale):  # Σ over observed coordinates only
        lp = norm.logpdf(xz[:, None, :], loc, scale) * seen[:, None, :]
        return np.log(w) + lp.sum(-1)

    em, result = fit(gmm_diag, init, jnp.asarray(x), n_iter=n_iter, K=2)
    # the mask sits inside .to_event: the closed forms count only the observed coordinates
    assert result.mstep_paths == {"w": "closed-form categorical", "loc": "closed-form normal_loc",
                                  "scale": "closed-form normal_scale"}
    lls = []
    for it in range(n_iter + 1):
        r, ll = posterior(log_joint(w, loc, scale))
        lls.append(ll)
        if it == n_iter:
            break
        rm = r[:, :, None] * seen[:, None, :]  # (N, K, D) weights of the observed coordinates
        w = r.mean(0)
        loc = (rm * xz[:, None, :]).sum(0) / rm.sum(0)
        scale = np.sqrt((rm * (xz[:, None, :] - loc) ** 2).sum(0) / rm.sum(0))
    np.testing.assert_allclose(result.params["w"], w, atol=1e-6)
    np.testing.assert_allclose(result.params["loc"], loc, atol=1e-6)
    np.testing.assert_allclose(result.params["scale"], scale, atol=1e-6)
    np.testing.assert_allclose(result.trace()["log_likelihood"], lls, rtol=1e-8)
    np.testing.assert_allclose(result.posterior["z"], r, atol=1e-8)
    np.testing.assert_allclose(result.posterior["z"][0], w, atol=1e-8)  # nothing observed: prior


# --- full-covariance Gaussian mixture: the exact marginal of the observed coordinates -----------
def gmm_full(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, x.shape[1])))
    cov = numpyro.param("cov", jnp.broadcast_to(jnp.eye(x.shape[1]), (K, x.shape[1], x.shape[1])),
                        constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], cov[z]), obs=x)


def observed_log_joint(x, w, loc, cov):
    """log w_k + log N(x_o; μ_ko, Σ_k,oo), row by row with scipy (brute force)."""
    out = np.zeros((len(x), len(w)))
    for n, row in enumerate(x):
        o = ~np.isnan(row)
        for k in range(len(w)):
            out[n, k] = np.log(w[k]) + (multivariate_normal.logpdf(
                row[o], loc[k, o], cov[k][np.ix_(o, o)]) if o.any() else 0.0)
    return out


def ecm_missing_latent(x, w, loc, cov, n_iter):
    """The classic EM for Gaussian mixtures with missing coordinates (Ghahramani & Jordan 1994):
    the missing coordinates are latent too, filled in by their conditional mean and covariance.
    A different EM map with the same fixed points (stationary points of the observed-data
    likelihood)."""
    N, D = x.shape
    K = len(w)
    for _ in range(n_iter):
        r, _ = posterior(observed_log_joint(x, w, loc, cov))
        s1, s2 = np.zeros((K, D)), np.zeros((K, D, D))
        for n, row in enumerate(x):
            o = ~np.isnan(row)
            u = ~o
            for k in range(K):
                xh, c = row.copy(), np.zeros((D, D))
                if u.any():
                    S = cov[k]
                    gain = S[np.ix_(u, o)] @ np.linalg.inv(S[np.ix_(o, o)])  # (#u, #o); #o may be 0
                    xh[u] = loc[k, u] + gain @ (row[o] - loc[k, o])
                    c[np.ix_(u, u)] = S[np.ix_(u, u)] - gain @ S[np.ix_(o, u)]
                s1[k] += r[n, k] * xh
                s2[k] += r[n, k] * (np.outer(xh, xh) + c)
        n_k = r.sum(0)
        w = n_k / N
        loc = s1 / n_k[:, None]
        cov = s2 / n_k[:, None, None] - loc[:, :, None] * loc[:, None, :]
    return w, loc, cov


def test_full_covariance_gmm_with_missing_coordinates():
    rng = np.random.default_rng(2)
    x = two_clusters(rng, 60, 2)
    w, loc = np.array([0.5, 0.5]), np.array([[-1.0, -1.0], [1.0, 1.0]])
    cov = np.stack([np.eye(2), np.array([[1.5, 0.3], [0.3, 0.8]])])
    em, result = fit(gmm_full, dict(w=w, loc=loc, cov=cov), jnp.asarray(x), n_iter=40, K=2)
    obj = result.trace()["objective"]
    assert abs(obj[-1] - obj[-2]) < 1e-12 * abs(obj[-1])  # converged
    # the log-likelihood at the start and at the optimum is the brute-force observed-data one
    ll0 = logsumexp(observed_log_joint(x, w, loc, cov), axis=1).sum()
    np.testing.assert_allclose(result.trace()["log_likelihood"][0], ll0, rtol=1e-10)
    p = result.params
    ll = logsumexp(observed_log_joint(x, p["w"], p["loc"], p["cov"]), axis=1).sum()
    np.testing.assert_allclose(result.log_likelihood, ll, rtol=1e-10)
    # the same optimum as the classic EM with the missing coordinates latent, from the same start
    w2, loc2, cov2 = ecm_missing_latent(x, w, loc, cov, 50)
    np.testing.assert_allclose(p["w"], w2, atol=1e-8)
    np.testing.assert_allclose(p["loc"], loc2, atol=1e-8)
    np.testing.assert_allclose(p["cov"], cov2, atol=1e-8)
    ll2 = logsumexp(observed_log_joint(x, w2, loc2, cov2), axis=1).sum()
    np.testing.assert_allclose(result.log_likelihood, ll2, rtol=1e-8)
    # ... which no perturbation of the means improves
    for d in np.eye(4).reshape(4, 2, 2) * 1e-3:
        for sign in (1, -1):
            assert logsumexp(observed_log_joint(x, p["w"], p["loc"] + sign * d, p["cov"]),
                             1).sum() < ll
    post = result.posterior["z"]
    np.testing.assert_allclose(post,
                               posterior(observed_log_joint(x, p["w"], p["loc"], p["cov"]))[0],
                               atol=1e-8)


# --- latent class analysis: missing answers dropped -------------------------------------------
def latent_class(x, K, C):
    N, J = x.shape
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    probs = numpyro.param("probs", jnp.ones((K, J, C)) / C, constraint=constraints.simplex)
    with numpyro.plate("people", N, dim=-2):
        z = numpyro.sample("z", dist.Categorical(w))
        with numpyro.plate("items", J, dim=-1):
            numpyro.sample("x", dist.Categorical(probs[z, jnp.arange(J)]), obs=x)


def test_latent_class_with_missing_answers_matches_numpy_em():
    rng = np.random.default_rng(3)
    N, J, K, C = 80, 4, 2, 3
    truth = rng.dirichlet(np.ones(C), size=(K, J))
    z = rng.choice(K, size=N)
    x = np.array([[rng.choice(C, p=truth[z[n], j]) for j in range(J)] for n in range(N)], float)
    x[rng.uniform(size=x.shape) < 0.15] = np.nan
    seen = ~np.isnan(x)
    onehot = np.eye(C)[np.where(seen, x, 0).astype(int)] * seen[..., None]  # (N, J, C)
    w, probs = np.array([0.45, 0.55]), rng.dirichlet(5 * np.ones(C), size=(K, J))
    n_iter = 8
    _, result = fit(latent_class, dict(w=w, probs=probs), jnp.asarray(x), n_iter=n_iter, K=K, C=C)
    # an event_dim-0 site is masked where missing: the closed forms still apply
    assert result.mstep_paths == {"w": "closed-form categorical",
                                  "probs": "closed-form categorical"}
    lls = []
    for it in range(n_iter + 1):
        r, ll = posterior(np.log(w) + np.einsum("njc,kjc->nk", onehot, np.log(probs)))
        lls.append(ll)
        if it == n_iter:
            break
        w = r.mean(0)
        counts = np.einsum("nk,njc->kjc", r, onehot)
        probs = counts / counts.sum(-1, keepdims=True)
    np.testing.assert_allclose(result.params["w"], w, atol=1e-8)
    np.testing.assert_allclose(result.params["probs"], probs, atol=1e-8)
    np.testing.assert_allclose(result.trace()["log_likelihood"], lls, rtol=1e-10)
    np.testing.assert_allclose(result.posterior["z"], r, atol=1e-8)


# --- Poisson mixture: a discrete site without enumerable support ---------------------------------
def poisson_mixture(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.arange(1.0, K + 1.0), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Categorical(w))
        with numpyro.plate("repeats", x.shape[1], dim=-1):
            numpyro.sample("x", dist.Poisson(rate[z]), obs=x)


def test_poisson_mixture_with_missing_counts_matches_numpy_em():
    rng = np.random.default_rng(4)
    x = rng.poisson(np.where(rng.uniform(size=(60, 1)) < 0.4, 1.0, 6.0), size=(60, 3)).astype(float)
    x[rng.uniform(size=x.shape) < 0.2] = np.nan
    seen = ~np.isnan(x)
    xz = np.where(seen, x, 0.0)
    w, rate = np.array([0.5, 0.5]), np.array([2.0, 4.0])
    n_iter = 8
    _, result = fit(poisson_mixture, dict(w=w, rate=rate), jnp.asarray(x), n_iter=n_iter, K=2)
    assert result.mstep_paths == {"w": "closed-form categorical", "rate": "closed-form poisson"}
    for _ in range(n_iter):
        r, _ = posterior(np.log(w)
                         + (poisson.logpmf(xz[:, None, :], rate[:, None]) * seen[:, None]).sum(-1))
        w = r.mean(0)
        rate = (r * xz.sum(1, keepdims=True)).sum(0) / (r * seen.sum(1, keepdims=True)).sum(0)
    np.testing.assert_allclose(result.params["w"], w, atol=1e-8)
    np.testing.assert_allclose(result.params["rate"], rate, atol=1e-8)
    _, ll = posterior(np.log(w)
                      + (poisson.logpmf(xz[:, None, :], rate[:, None]) * seen[:, None]).sum(-1))
    np.testing.assert_allclose(result.log_likelihood, ll, rtol=1e-10)


# --- errors ---------------------------------------------------------------------------------------
def network(a, b):
    """A → B; with a NaN in a, dropping a's factor would leave B's density at the placeholder."""
    pa = numpyro.param("pa", jnp.ones(2) / 2, constraint=constraints.simplex)
    pb = numpyro.param("pb", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)
    pc = numpyro.param("pc", jnp.ones(2) / 2, constraint=constraints.simplex)
    with numpyro.plate("rows", a.shape[0]):
        c = numpyro.sample("c", dist.Categorical(pc))
        a = numpyro.sample("a", dist.Categorical(pa), obs=a)
        numpyro.sample("b", dist.Categorical(pb[a] * 0.5 + pb[c] * 0.5), obs=b)


def test_discrete_parent_with_missing_values_asks_for_obs_mask():
    a = jnp.array([0.0, 1.0, jnp.nan, 1.0])
    b = jnp.array([0, 1, 1, 0])
    with pytest.raises(ModelError, match=r"'a'.*\['b'\].*obs_mask="):
        EM(network, missing=("a",), progress_bar=False).run(jax.random.PRNGKey(0), a, b)
    # without NaN the parent is fine: nothing is dropped
    EM(network, missing=("a",), max_iter=2, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.array([0.0, 1.0, 0.0, 1.0]), b)


def regression_chain(x1, x2):
    slope = numpyro.param("slope", 0.5)
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    with numpyro.plate("rows", x1.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        x1 = numpyro.sample("x1", dist.Normal(jnp.array([-1.0, 1.0])[z], 1.0), obs=x1)
        numpyro.sample("x2", dist.Normal(slope * x1, 1.0), obs=x2)


def test_continuous_parent_with_missing_values_is_refused():
    x1 = jnp.array([0.0, jnp.nan, 1.0])
    with pytest.raises(ModelError, match=r"'x1'.*\['x2'\].*cannot be enumerated"):
        EM(regression_chain, missing=("x1",), progress_bar=False).run(
            jax.random.PRNGKey(0), x1, jnp.zeros(3))


def test_nan_in_an_unlisted_site_still_raises():
    x1 = jnp.array([0.0, 1.0, 1.0])
    x2 = jnp.array([0.0, jnp.nan, 1.0])
    with pytest.raises(ModelError, match="'x2' has 1 NaN"):
        EM(regression_chain, progress_bar=False).run(jax.random.PRNGKey(0), x1, x2)
    with pytest.raises(ModelError, match="'x2' has 1 NaN"):
        EM(regression_chain, missing=("x1",), progress_bar=False).run(jax.random.PRNGKey(0), x1, x2)
    # an infinite value is not missing
    with pytest.raises(ModelError, match="'x2' has 1 NaN or infinite"):
        EM(regression_chain, missing=("x2",), progress_bar=False).run(
            jax.random.PRNGKey(0), x1, jnp.array([0.0, jnp.inf, 1.0]))


@pytest.mark.parametrize("name", ["z", "slope", "nope"])
def test_missing_names_an_observed_site(name):
    with pytest.raises(ValueError, match=f"missing= names '{name}'"):
        EM(regression_chain, missing=(name,), progress_bar=False).run(
            jax.random.PRNGKey(0), jnp.zeros(3), jnp.zeros(3))


def dirichlet_obs(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    conc = numpyro.param("conc", jnp.ones((2, 3)), constraint=constraints.positive)
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Dirichlet(conc[z]), obs=x)


def test_unsupported_distribution_is_named():
    x = jnp.array([[0.2, 0.3, 0.5], [jnp.nan, 0.5, 0.5]])
    with pytest.raises(NotImplementedError, match="'x'.*Dirichlet"):
        EM(dirichlet_obs, missing=("x",), progress_bar=False).run(jax.random.PRNGKey(0), x)
