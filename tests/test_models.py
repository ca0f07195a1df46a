"""bayes_em.models, each against an independent implementation from the same start and the same
number of iterations: scikit-learn (GaussianMixture, KMeans) or an EM written here with numpy."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from bayes_em import EM, LBFGS, models

PRECISE = LBFGS(max_steps=1000, gtol=1e-13)


def fit(model, init, *args, n_iter, hard=False, **kwargs):
    em = EM(model, max_iter=n_iter, tol=0.0, init_values=init, mstep=PRECISE, hard=hard,
            progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), *args, **kwargs)
    assert result.n_iter == n_iter
    obj = result.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())  # EM never goes down
    return result


def posterior(log_joint):
    """Normalise log p(x_n, z_n = k) over k."""
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))


# --- Gaussian mixtures ---------------------------------------------------------------------------
def gmm_data():
    rng = np.random.default_rng(11)
    z = rng.choice(3, size=150, p=[0.4, 0.35, 0.25])
    locs = np.array([[0.0, 0.0], [3.0, 1.0], [0.5, 4.0]])
    x = locs[z] + rng.normal(size=(150, 2)) * np.array([[1.0, 0.6], [0.7, 0.7], [0.5, 1.2]])[z]
    x[:, 1] += 0.3 * x[:, 0]
    return x


W0 = np.array([0.3, 0.3, 0.4])
M0 = np.array([[-0.5, 0.5], [2.0, 0.0], [0.5, 3.0]])
# initial covariances: ours (as the model parametrises them) and sklearn's precisions_init
INITS = {
    "full": np.stack([np.eye(2), [[1.5, 0.3], [0.3, 0.8]], 0.7 * np.eye(2)]),
    "tied": np.array([[1.5, 0.3], [0.3, 0.8]]),
    "diag": np.array([[1.0, 0.5], [0.8, 1.2], [1.5, 1.0]]),  # standard deviations
    "spherical": np.array([1.0, 0.5, 2.0]),  # standard deviations
}


def cov_name(covariance):
    return "cov" if covariance in ("full", "tied") else "scale"


@pytest.mark.parametrize("covariance", models.COVARIANCES)
def test_gmm_ml_matches_sklearn(covariance):
    from sklearn.mixture import GaussianMixture

    x = gmm_data()
    c0 = INITS[covariance]
    n_iter = 12
    result = fit(models.gmm, dict(weights=W0, loc=M0, **{cov_name(covariance): c0}),
                 jnp.asarray(x), n_iter=n_iter, K=3, covariance=covariance)
    assert result.mstep_paths == {
        "weights": "closed-form categorical",
        "loc": "closed-form " + ("mvn_loc" if covariance in ("full", "tied") else "normal_loc"),
        cov_name(covariance): "closed-form " + ("mvn_cov" if covariance in ("full", "tied")
                                                else "normal_scale"),
    }
    precisions = np.linalg.inv(c0) if covariance in ("full", "tied") else 1.0 / c0**2
    gm = GaussianMixture(3, covariance_type=covariance, reg_covar=0.0, tol=0.0, max_iter=n_iter,
                         weights_init=W0, means_init=M0, precisions_init=precisions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge"
        gm.fit(x)
    assert gm.n_iter_ == n_iter
    np.testing.assert_allclose(result.params["weights"], gm.weights_, atol=1e-6)
    np.testing.assert_allclose(result.params["loc"], gm.means_, atol=1e-6)
    if covariance in ("full", "tied"):
        np.testing.assert_allclose(result.params["cov"], gm.covariances_, atol=1e-6)
    else:  # sklearn's diag / spherical covariances_ are variances, ours standard deviations
        np.testing.assert_allclose(result.params["scale"] ** 2, gm.covariances_, atol=1e-6)
    np.testing.assert_allclose(result.log_likelihood, gm.score(x) * len(x), rtol=1e-8)
    np.testing.assert_allclose(result.posterior["z"], gm.predict_proba(x), atol=1e-6)


def map_gmm_reference(x, w, m, c, covariance, hyper, n_iter):
    """MAP EM for the priors of models.gmm, written out: Dirichlet(α) weights, flat means,
    InverseWishart(ν, Ψ) covariances (mode in Σ: (Ψ + S_k) / (ν + D + 1 + N_k)), InverseGamma(a, b)
    on each standard deviation σ (mode: root of (a + 1 + n) σ² − b σ − ss = 0)."""
    N, D = x.shape
    K = len(w)
    for _ in range(n_iter):
        if covariance == "full":
            ll = np.stack([multivariate_normal.logpdf(x, m[k], c[k]) for k in range(K)], 1)
        elif covariance == "tied":
            ll = np.stack([multivariate_normal.logpdf(x, m[k], c) for k in range(K)], 1)
        elif covariance == "diag":
            ll = norm.logpdf(x[:, None, :], m, c).sum(-1)
        else:
            ll = norm.logpdf(x[:, None, :], m, c[:, None]).sum(-1)
        r = posterior(np.log(w) + ll)
        nk = r.sum(0)
        alpha = hyper["alpha"]
        w = (nk + alpha - 1) / (N + K * alpha - K)
        m = r.T @ x / nk[:, None]
        sq = [(r[:, k, None] * (x - m[k])).T @ (x - m[k]) for k in range(K)]  # S_k
        if covariance == "full":
            c = np.stack([(hyper["psi"] + sq[k]) / (hyper["df"] + D + 1 + nk[k]) for k in range(K)])
        elif covariance == "tied":
            c = (hyper["psi"] + sum(sq)) / (hyper["df"] + D + 1 + N)
        else:
            a, b = hyper["a"], hyper["b"]
            if covariance == "diag":
                n, ss = nk[:, None], np.stack([np.diag(s) for s in sq])
            else:
                n, ss = D * nk, np.array([np.trace(s) for s in sq])
            cc = a + 1 + n
            c = (b + np.sqrt(b * b + 4 * cc * ss)) / (2 * cc)
    return w, m, c


MAP_HYPER = {
    "full": dict(alpha=3.0, df=4.0, psi=np.array([[0.5, 0.1], [0.1, 0.8]])),
    "tied": dict(alpha=1.5, df=5.0, psi=np.array([[0.5, 0.1], [0.1, 0.8]])),
    "diag": dict(alpha=3.0, a=2.0, b=np.array([0.6, 1.0])),
    "spherical": dict(alpha=3.0, a=3.0, b=1.5),
}


@pytest.mark.parametrize("covariance", [
    "diag", "spherical", "full", "tied",
])
def test_gmm_map_matches_numpy_em(covariance):
    x = gmm_data()
    hyper = MAP_HYPER[covariance]
    c0 = INITS[covariance]
    n_iter = 6
    result = fit(models.gmm, dict(weights=W0, loc=M0, **{cov_name(covariance): c0}),
                 jnp.asarray(x), n_iter=n_iter, K=3, covariance=covariance, prior=hyper)
    paths = result.mstep_paths
    assert paths["weights"] == "closed-form categorical (Dirichlet MAP)"
    if covariance in ("diag", "spherical"):
        assert paths["scale"] == "closed-form normal_scale (InverseGamma MAP)"
    w, m, c = map_gmm_reference(x, W0, M0, c0, covariance, hyper, n_iter)
    np.testing.assert_allclose(result.params["weights"], w, atol=1e-6)
    np.testing.assert_allclose(result.params["loc"], m, atol=1e-6)
    np.testing.assert_allclose(result.params[cov_name(covariance)], c, atol=1e-6)


def test_gmm_default_prior_keeps_a_component_off_a_single_point():
    """ML is unbounded: a component started on one point with a tiny spread shrinks onto it. The
    default prior keeps its scale away from zero."""
    x = gmm_data()
    init = dict(weights=np.array([0.02, 0.49, 0.49]), loc=np.stack([x[0], [0.0, 0.0], [2.0, 2.0]]),
                scale=np.array([1e-3, 1.0, 1.0]))
    ml = EM(models.gmm, max_iter=30, init_values=init, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=3, covariance="spherical")
    ok = EM(models.gmm, max_iter=30, init_values=init, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=3, covariance="spherical", prior=True)
    # collapsed: the scale shrinks towards 0, or reaches it (log-density +inf: the fit stops
    # "nonfinite" and keeps its last finite parameters), depending on round-off
    assert ml.status in ("collapsed", "nonfinite") or ml.params["scale"].min() < 1e-6
    assert ok.params["scale"].min() > 0.1


# --- K-means as hard EM --------------------------------------------------------------------------
def test_kmeans_hard_em_is_lloyd():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(c, 0.8, size=(50, 2)) for c in ([0, 0], [3, 3], [0, 4], [4, 0])])
    init = x[[0, 1, 2, 3]]  # four points of the first cluster: Lloyd has work to do
    n_iter = 8
    result = fit(models.kmeans, dict(loc=init), jnp.asarray(x), n_iter=n_iter, hard=True, K=4)
    assert result.mstep_paths == {"loc": "closed-form normal_loc"}
    km = KMeans(4, init=init, n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd").fit(x)
    np.testing.assert_allclose(result.params["loc"], km.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(result.most_probable["z"], km.labels_)


# --- Latent class analysis -----------------------------------------------------------------------
def test_bernoulli_mixture_matches_numpy_em():
    rng = np.random.default_rng(3)
    truth = np.array([[0.9, 0.8, 0.2, 0.1, 0.7], [0.2, 0.3, 0.8, 0.9, 0.4],
                      [0.5, 0.9, 0.9, 0.1, 0.1]])
    z = rng.choice(3, size=200, p=[0.5, 0.3, 0.2])
    x = (rng.uniform(size=(200, 5)) < truth[z]).astype(float)
    w, p = np.array([0.4, 0.3, 0.3]), rng.uniform(0.3, 0.7, size=(3, 5))
    n_iter = 15
    result = fit(models.bernoulli_mixture, dict(weights=w, probs=p), jnp.asarray(x), n_iter=n_iter,
                 K=3)
    assert result.mstep_paths == {"weights": "closed-form categorical",
                                  "probs": "closed-form bernoulli"}
    for _ in range(n_iter):
        r = posterior(np.log(w) + x @ np.log(p).T + (1 - x) @ np.log(1 - p).T)
        w, p = r.mean(0), (r.T @ x) / r.sum(0)[:, None]
    np.testing.assert_allclose(result.params["weights"], w, atol=1e-6)
    np.testing.assert_allclose(result.params["probs"], p, atol=1e-6)


def test_categorical_mixture_matches_numpy_em():
    rng = np.random.default_rng(4)
    K, D, V, N = 2, 4, 3, 150
    truth = rng.dirichlet(np.ones(V), size=(K, D))
    z = rng.choice(K, size=N, p=[0.6, 0.4])
    x = np.stack([[rng.choice(V, p=truth[z[n], d]) for d in range(D)] for n in range(N)])
    w, p = np.array([0.5, 0.5]), rng.dirichlet(5 * np.ones(V), size=(K, D))
    n_iter = 15
    result = fit(models.categorical_mixture, dict(weights=w, probs=p), jnp.asarray(x),
                 n_iter=n_iter, K=K, V=V)
    assert result.mstep_paths == {"weights": "closed-form categorical",
                                  "probs": "closed-form categorical"}
    onehot = np.eye(V)[x]  # (N, D, V)
    for _ in range(n_iter):
        r = posterior(np.log(w) + np.einsum("ndv,kdv->nk", onehot, np.log(p)))
        counts = np.einsum("nk,ndv->kdv", r, onehot)
        w, p = r.mean(0), counts / counts.sum(-1, keepdims=True)
    np.testing.assert_allclose(result.params["weights"], w, atol=1e-6)
    np.testing.assert_allclose(result.params["probs"], p, atol=1e-6)


# --- Bayesian network with missing values --------------------------------------------------------
NODES = (("A", 2, ()), ("B", 3, ("A",)), ("C", 2, ("A",)), ("D", 2, ("B", "C")), ("E", 2, ("D",)))


def bn_sample(rng, cpts, n):
    rows = np.zeros((n, len(NODES)), int)
    for i in range(n):
        state = {}
        for j, (name, card, parents) in enumerate(NODES):
            state[name] = rows[i, j] = rng.choice(
                card, p=cpts[name][tuple(state[p] for p in parents)])
    return rows


def random_cpts(rng, concentration):
    card = {name: k for name, k, _ in NODES}
    return {name: rng.dirichlet(concentration * np.ones(k), size=tuple(card[p] for p in parents))
            for name, k, parents in NODES}


def bn_brute_force_em(values, observed, cpts, n_iter):
    """EM by listing every completion of every row's missing entries."""
    idx = {name: j for j, (name, _, _) in enumerate(NODES)}
    for _ in range(n_iter):
        counts = {name: np.zeros_like(t) for name, t in cpts.items()}
        for row, seen in zip(values, observed):
            missing = np.flatnonzero(~seen)
            completions = list(itertools.product(*[range(NODES[j][1]) for j in missing]))
            fulls, probs = [], []
            for comp in completions:
                full = row.copy()
                full[missing] = comp
                fulls.append(full)
                probs.append(np.prod([cpts[name][tuple(full[idx[p]] for p in parents)
                                                 + (full[idx[name]],)]
                                      for name, _, parents in NODES]))
            probs = np.array(probs) / np.sum(probs)
            for full, q in zip(fulls, probs):
                for name, _, parents in NODES:
                    counts[name][tuple(full[idx[p]] for p in parents) + (full[idx[name]],)] += q
        cpts = {name: c / c.sum(-1, keepdims=True) for name, c in counts.items()}
    return cpts


def bn_problem():
    rng = np.random.default_rng(5)
    values = bn_sample(rng, random_cpts(rng, 1.0), 120)
    observed = rng.uniform(size=values.shape) > 0.2  # 20% missing
    observed[:, 0] = rng.uniform(size=len(values)) > 0.5  # the root: half missing
    values = np.where(observed, values, -1)  # what the model sees
    return values, observed, random_cpts(rng, 5.0)


def test_bayesian_network_with_missing_values_matches_brute_force():
    values, observed, init = bn_problem()
    n_iter = 4
    result = fit(models.bayesian_network, {f"cpt_{k}": v for k, v in init.items()},
                 jnp.asarray(values), jnp.asarray(observed), NODES, n_iter=n_iter)
    assert set(result.mstep_paths.values()) == {"closed-form categorical"}
    expected = bn_brute_force_em(values, observed, init, n_iter)
    for name in expected:
        np.testing.assert_allclose(result.params[f"cpt_{name}"], expected[name], atol=1e-6,
                                   err_msg=name)
    # the posterior of a missing entry is p(x_nv | observed part of row n): brute force again
    n = int(np.flatnonzero(~observed[:, 1])[0])
    fitted = {name: np.asarray(result.params[f"cpt_{name}"]) for name, _, _ in NODES}
    joint = np.zeros(3)
    missing = np.flatnonzero(~observed[n])
    idx = {name: j for j, (name, _, _) in enumerate(NODES)}
    for comp in itertools.product(*[range(NODES[j][1]) for j in missing]):
        full = values[n].copy()
        full[missing] = comp
        joint[full[1]] += np.prod([fitted[name][tuple(full[idx[p]] for p in parents)
                                                + (full[idx[name]],)]
                                   for name, _, parents in NODES])
    np.testing.assert_allclose(result.posterior["B"][n], joint / joint.sum(), atol=1e-8)
    seen = observed[:, 1]
    np.testing.assert_allclose(result.posterior["B"][seen], np.eye(3)[values[seen, 1]], atol=1e-12)


def bayesian_network_obs_mask(values, observed, nodes):
    """The same network written with NumPyro's obs_mask (latents only where missing)."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    observed = jnp.asarray(observed, bool)
    values = jnp.where(observed, jnp.asarray(values), 0)
    card = {name: k for name, k, _ in nodes}
    cpts = {name: numpyro.param(f"cpt_{name}",
                                jnp.full(tuple(card[p] for p in parents) + (k,), 1.0 / k),
                                constraint=constraints.simplex) for name, k, parents in nodes}
    state = {}
    with numpyro.plate("rows", values.shape[0]):
        for j, (name, k, parents) in enumerate(nodes):
            probs = cpts[name][tuple(state[p] for p in parents)]
            state[name] = numpyro.sample(name, dist.Categorical(probs), obs=values[:, j],
                                         obs_mask=observed[:, j])


@pytest.mark.slow
def test_bayesian_network_written_with_obs_mask_matches_brute_force():
    """obs_mask makes <name>_unobserved latents (enumerated) and <name>_observed data; each CPT
    is selected by both sites, and its closed-form update sums their statistics — same fit as
    the brute-force EM, to 1e-6."""
    values, observed, init = bn_problem()
    n_iter = 4
    result = fit(bayesian_network_obs_mask, {f"cpt_{k}": v for k, v in init.items()},
                 jnp.asarray(values), jnp.asarray(observed), NODES, n_iter=n_iter)
    assert set(result.sites.latents) == {f"{name}_unobserved" for name, _, _ in NODES}
    assert set(result.mstep_paths.values()) == {"closed-form categorical"}
    expected = bn_brute_force_em(values, observed, init, n_iter)
    for name in expected:
        np.testing.assert_allclose(result.params[f"cpt_{name}"], expected[name], atol=1e-6,
                                   err_msg=name)


# --- Mixture of linear regressions ---------------------------------------------------------------
def test_mixture_of_regressions_matches_weighted_least_squares_em():
    rng = np.random.default_rng(6)
    N = 160
    X = np.c_[np.ones(N), rng.uniform(-2, 2, size=N)]
    z = rng.choice(2, size=N, p=[0.6, 0.4])
    y = (np.sum(X * np.array([[1.0, 2.0], [-1.0, -1.5]])[z], 1)
         + rng.normal(size=N) * np.array([0.5, 0.8])[z])
    w, coef, var = np.array([0.5, 0.5]), np.array([[0.5, 1.0], [0.0, -1.0]]), np.array([1.0, 2.0])
    n_iter = 5
    result = fit(models.mixture_of_regressions, dict(weights=w, coef=coef, var=var),
                 jnp.asarray(X), jnp.asarray(y), n_iter=n_iter, K=2)
    assert result.mstep_paths == {"weights": "closed-form categorical", "coef": "numeric",
                                  "var": "numeric"}
    for _ in range(n_iter):
        r = posterior(np.log(w) + norm.logpdf(y[:, None], X @ coef.T, np.sqrt(var)))
        w = r.mean(0)
        coef = np.stack([np.linalg.solve(X.T @ (r[:, k, None] * X), X.T @ (r[:, k] * y))
                         for k in range(2)])
        var = (r * (y[:, None] - X @ coef.T) ** 2).sum(0) / r.sum(0)
    np.testing.assert_allclose(result.params["weights"], w, atol=1e-6)
    np.testing.assert_allclose(result.params["coef"], coef, atol=1e-6)
    np.testing.assert_allclose(result.params["var"], var, atol=1e-6)
