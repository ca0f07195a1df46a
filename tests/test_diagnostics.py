"""Diagnostics against independent references: finite differences, an analytic Fisher
information, hand-computed mixture likelihoods and entropies, scikit-learn's BIC/AIC, ArviZ."""

import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from scipy.stats import binom
from shared_models import full_gmm
from sklearn.mixture import GaussianMixture

from bayes_em import EM, LBFGS, plots
from bayes_em import diagnostics as D

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore:The inplace keyword"
)

PRECISE = LBFGS(max_steps=500, gtol=1e-13)

# -- models -------------------------------------------------------------------------------------
P_KNOWN = np.array([0.2, 0.7])


def binomial_mixture(x):
    """Two known Binomial(10, p_k) components, unknown weight w (ML)."""
    w = numpyro.param("w", 0.5, constraint=constraints.unit_interval)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(w))
        numpyro.sample("x", dist.Binomial(10, probs=jnp.asarray(P_KNOWN)[z]), obs=x)


def map_mixture(x, K):
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        loc = numpyro.param("loc", jnp.linspace(-3.0, 3.0, K))
        scale = numpyro.sample("scale", dist.InverseGamma(3.0, 2.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def three_coins(y):
    pi = numpyro.param("pi", 0.5, constraint=constraints.unit_interval)
    p = numpyro.param("p", 0.5, constraint=constraints.unit_interval)
    q = numpyro.param("q", 0.5, constraint=constraints.unit_interval)
    with numpyro.plate("tosses", y.shape[0]):
        a = numpyro.sample("a", dist.Bernoulli(pi))
        numpyro.sample("y", dist.Bernoulli(jnp.where(a == 1, p, q)), obs=y)


def simulate_1d(seed, n, locs=(-3.0, 0.5, 4.0), scales=(0.5, 0.5, 0.5)):
    rng = np.random.default_rng(seed)
    z = rng.integers(len(locs), size=n)
    return jnp.asarray(np.asarray(locs)[z] + np.asarray(scales)[z] * rng.standard_normal(n))


# -- fits shared by the tests ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def binomial_fit():
    rng = np.random.default_rng(3)
    z = rng.random(150) < 0.35
    x = jnp.asarray(rng.binomial(10, np.where(z, P_KNOWN[1], P_KNOWN[0])).astype(float))
    em = EM(binomial_mixture, max_iter=2000, tol=1e-15, progress_bar=False)
    return em.run(jax.random.PRNGKey(0), x), np.asarray(x)


@pytest.fixture(scope="module")
def x1d():
    return simulate_1d(3, 120)


@pytest.fixture(scope="module")
def map_fits(x1d):
    """MAP mixtures with K = 2, 3, 4 on data from 3 components."""
    return {
        K: EM(map_mixture, restarts=2, max_iter=300, tol=1e-10, progress_bar=False).run(
            jax.random.PRNGKey(1), x1d, K=K)
        for K in (2, 3, 4)
    }


def hand_pointwise(params, x):
    """log Σ_k w_k N(x_n | loc_k, scale_k) for the 1-D mixture."""
    return logsumexp(jnp.log(params["w"]) + dist.Normal(params["loc"], params["scale"]).log_prob(
        jnp.asarray(x)[:, None]), axis=-1)


def fd_hessian(f, v, h=1e-4):
    """Central second differences of f at v (f evaluated only, no derivatives)."""
    n = v.size
    H = np.zeros((n, n))
    E = np.eye(n) * h
    for i in range(n):
        for j in range(i, n):
            H[i, j] = H[j, i] = (f(v + E[i] + E[j]) - f(v + E[i] - E[j]) - f(v - E[i] + E[j])
                                 + f(v - E[i] - E[j])) / (4 * h * h)
    return H


# -- standard errors ------------------------------------------------------------------------------
def test_standard_error_matches_analytic_fisher_information(binomial_fit):
    result, x = binomial_fit
    assert result.converged
    w = float(result.params["w"])
    f1, f0 = binom.pmf(x, 10, P_KNOWN[1]), binom.pmf(x, 10, P_KNOWN[0])
    p = w * f1 + (1 - w) * f0
    score = np.sum((f1 - f0) / p)
    assert abs(score) < 1e-6 * len(x)  # at the MLE, so the delta method is exact
    info_w = np.sum((f1 - f0) ** 2 / p**2)  # I(w) = −ℓ''(w), exact for a weight
    np.testing.assert_allclose(result.standard_errors()["w"], 1 / np.sqrt(info_w), rtol=1e-6)
    # in unconstrained space: I(v) = w'(v)² I(w) at the MLE (logistic: w' = w(1 − w))
    np.testing.assert_allclose(D.observed_information(result), [[(w * (1 - w)) ** 2 * info_w]],
                               rtol=1e-6)


def test_hessian_and_standard_errors_match_finite_differences(map_fits):
    result = map_fits[3]
    f, v = D.objective_function(result)
    info = D.observed_information(result)
    np.testing.assert_allclose(info, -fd_hessian(f, v), rtol=1e-4, atol=1e-4 * np.abs(info).max())
    # delta method with a finite-difference Jacobian of the transforms and FD information
    def constrained(v):
        u = D._functions(result).unravel(jnp.asarray(v))
        return np.concatenate([np.ravel(biject_to(p.constraint)(u[p.name]))
                               for p in sorted(result.sites.params, key=lambda p: p.name)])
    h = 1e-6
    J = np.stack([(constrained(v + h * e) - constrained(v - h * e)) / (2 * h)
                  for e in np.eye(v.size)], axis=1)
    cov = J @ np.linalg.inv(-fd_hessian(f, v)) @ J.T
    se = result.standard_errors()
    ours = np.concatenate([np.ravel(se[k]) for k in sorted(se)])
    np.testing.assert_allclose(ours, np.sqrt(np.diag(cov)), rtol=1e-4)


def test_summary_table(map_fits, capsys):
    result = map_fits[3]
    table = D.summary(result, prob=0.9)
    assert list(table) == ["w", "loc", "scale"]
    for cols in table.values():
        assert (np.all(cols["lower"] <= cols["estimate"])
                and np.all(cols["estimate"] <= cols["upper"]))
        assert np.all(cols["std_err"] > 0)
    assert np.all((table["w"]["lower"] > 0) & (table["w"]["upper"] < 1))  # inside the support
    result.summary()
    out = capsys.readouterr().out
    assert "std.err" in out and "95.0%" in out and "loc[2]" in out and "scale[0]" in out


def test_non_identified_model_has_no_standard_errors():
    y = jnp.asarray([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=float)
    result = EM(three_coins, max_iter=3, init_values=dict(pi=0.4, p=0.6, q=0.7),
                progress_bar=False).run(jax.random.PRNGKey(0), y)
    with pytest.raises(ValueError, match="not positive definite"):
        result.standard_errors()


# -- pointwise log-likelihood, entropy, information criteria ------------------------------------
def test_pointwise_log_likelihood_is_the_mixture_density(map_fits, x1d):
    result = map_fits[3]
    pw = D.pointwise_log_likelihood(result)
    np.testing.assert_allclose(pw, hand_pointwise(result.params, x1d), rtol=1e-12)
    np.testing.assert_allclose(pw.sum(), result.log_likelihood, rtol=1e-12)  # prior left out


def test_pointwise_refuses_a_latent_outside_the_data_plate():
    from bayes_em.contraction import pointwise_log_likelihood
    from bayes_em.factors import enumerated_model, log_factors

    def shared_switch(x):
        c = numpyro.sample("c", dist.Bernoulli(0.3))  # one latent for all points: couples them
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(jnp.where(c == 1, 2.0, -1.0), 1.0), obs=x)

    x = jnp.array([0.5, 1.5, -0.3])
    factors = log_factors(enumerated_model(shared_switch, 1), {}, (x,), {})
    with pytest.raises(ValueError, match=r"\['c'\] lie outside plate 'data'"):
        pointwise_log_likelihood(factors, "data")
    # without a plate the whole data set is one point: log Σ_c p(c) Π_n p(x_n | c)
    whole = pointwise_log_likelihood(factors, None)
    ref = logsumexp(jnp.log(jnp.array([0.7, 0.3]))
                    + jnp.array([dist.Normal(m, 1.0).log_prob(x).sum() for m in (-1.0, 2.0)]))
    np.testing.assert_allclose(whole, [ref], rtol=1e-12)


def test_entropy_and_icl_by_hand(map_fits):
    result = map_fits[3]
    q = np.asarray(result.posterior["z"])
    entropy = -np.sum(q * np.log(np.where(q > 0, q, 1.0)))
    np.testing.assert_allclose(D.posterior_entropy(result), entropy, rtol=1e-10)
    np.testing.assert_allclose(result.icl(), result.bic() + 2 * entropy, rtol=1e-12)


def test_bic_aic_match_sklearn_full_covariance():
    rng = np.random.default_rng(5)
    locs = np.array([[-2.0, 0.0], [2.0, 1.0]])
    z = rng.integers(2, size=120)
    x = locs[z] + rng.standard_normal((120, 2)) @ np.array([[0.8, 0.3], [0.0, 0.6]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(2, covariance_type="full", reg_covar=0.0, tol=1e-14, max_iter=5000,
                             random_state=0).fit(x)
    # one more EM iteration from scikit-learn's converged parameters changes nothing visible
    result = EM(full_gmm, max_iter=1, tol=0.0, mstep=PRECISE, progress_bar=False,
                init_values=dict(w=gm.weights_, loc=gm.means_, cov=gm.covariances_)).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=2)
    assert D.num_free_parameters(result) == gm._n_parameters() == 2 * 3 + 2 * 2 + 1
    assert D.num_observations(result) == 120
    np.testing.assert_allclose(result.bic(), gm.bic(x), rtol=1e-9)
    np.testing.assert_allclose(result.aic(), gm.aic(x), rtol=1e-9)


# -- ArviZ ----------------------------------------------------------------------------------------
def test_inference_data_works_with_arviz(map_fits, x1d):
    result = map_fits[3]
    idata = result.to_inference_data(num_samples=300, num_chains=2)
    post = idata.posterior
    assert post["loc"].shape == (2, 300, 3) and post["w"].shape == (2, 300, 3)
    np.testing.assert_allclose(post["w"].sum("w_dim_0"), 1.0)
    # draws come from N(v̂, I⁻¹) in unconstrained space
    lap = D.laplace(result)
    V = np.concatenate([np.asarray(idata.unconstrained_posterior[k]).reshape(600, -1)
                        for k in ("loc", "scale", "w")], axis=1)  # ravel_pytree order
    z = (V - lap.mean) @ np.linalg.inv(np.linalg.cholesky(lap.cov)).T
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    # log-likelihood of a draw = the hand-computed mixture density at that draw
    ll = idata.log_likelihood["x"]
    assert ll.dims == ("chain", "draw", "data") and ll.shape == (2, 300, 120)
    draw = {k: jnp.asarray(post[k].values[1, 7]) for k in ("w", "loc", "scale")}
    np.testing.assert_allclose(ll.values[1, 7], hand_pointwise(draw, x1d), rtol=1e-10)
    np.testing.assert_array_equal(idata.observed_data["x"].values, np.asarray(x1d))
    np.testing.assert_array_equal(idata.em_trace["objective"].values, result.history["objective"])
    np.testing.assert_array_equal(idata.latent_posterior["z"].values, result.posterior["z"])
    assert idata.posterior.attrs["status"] == result.status
    s = az.summary(idata)
    assert "loc[0]" in s.index and np.all(np.isfinite(s["sd"]))
    assert np.isfinite(az.loo(idata).elpd_loo) and np.isfinite(az.waic(idata).elpd_waic)


def test_restarts_are_separate_chains(map_fits):
    result = map_fits[3]
    idata = D.to_inference_data(result, num_samples=50, restarts="all")
    assert list(idata.posterior.chain.values) == [0, 1]
    aligned = result.relabel()  # restarts in the best restart's labels (align=True default)
    for r in range(2):  # each chain sits around its own restart's optimum
        lap = D.laplace(aligned, r)
        mean = np.asarray(idata.unconstrained_posterior["loc"].sel(chain=r).mean("draw"))
        assert np.all(np.abs(mean - lap.mean[:3])
                      < 5 * np.sqrt(np.diag(lap.cov)[:3]) / np.sqrt(50) + 1e-9)


def test_right_number_of_components_wins_compare(map_fits):
    data = {f"K={K}": D.to_inference_data(fit, num_samples=250, num_chains=2)
            for K, fit in map_fits.items()}
    table = az.compare(data)
    assert table.index[0] == "K=3", table
    elpd = table["elpd_loo"]
    assert elpd["K=3"] - elpd["K=2"] > 5 * table.loc["K=2", "dse"]  # too few: clearly worse
    assert min(map_fits, key=lambda K: map_fits[K].bic()) == 3


# -- the lower bound ------------------------------------------------------------------------------
def test_lower_bound_decomposition_by_hand(map_fits, x1d):
    result = map_fits[3]
    n = min(5, int(result.restart_n_iter[0]))
    tr = D.lower_bound_trace(result, n_iter=n)
    np.testing.assert_allclose(tr["log_likelihood"], result.history["log_likelihood"][0, : n + 1],
                               rtol=1e-10)
    x = np.asarray(x1d)[:, None]
    for t in range(n):
        th, nxt = ({k: v[s] for k, v in tr["params"].items()} for s in (t, t + 1))
        def log_joint(p):
            return np.log(p["w"]) + dist.Normal(p["loc"], p["scale"]).log_prob(x)
        q = np.asarray(jax.nn.softmax(log_joint(th), axis=-1))
        bound = np.sum(q * (log_joint(nxt) - np.log(q)))  # E_q log p(x, z | θ_{t+1}) + H[q]
        np.testing.assert_allclose(tr["bound"][t], bound, rtol=1e-10)
        # MAP-EM raises the bound plus the log prior; the KL gap is never negative
        assert (tr["bound"][t] + tr["log_prior"][t + 1]
                >= tr["log_likelihood"][t] + tr["log_prior"][t] - 1e-9)
        assert tr["gap"][t] >= -1e-9
    np.testing.assert_allclose(tr["log_likelihood"][1:], tr["bound"] + tr["gap"], rtol=1e-12)


# -- persistence ----------------------------------------------------------------------------------
def test_netcdf_round_trip_and_warm_start(binomial_fit, tmp_path):
    result, x = binomial_fit
    idata = result.to_inference_data(num_samples=20, num_chains=1)
    path = D.save(idata, tmp_path / "fit.nc")
    back = D.load(path)
    assert set(back.groups()) == set(idata.groups())
    for g in idata.groups():
        assert back[g].equals(idata[g]), g
        assert back[g].attrs.keys() == idata[g].attrs.keys(), g
        for k, v in idata[g].attrs.items():
            np.testing.assert_array_equal(back[g].attrs[k], v)
    params = D.params_from_inference_data(back)
    np.testing.assert_array_equal(params["w"], result.params["w"])
    # a warm start resumes where the saved fit stopped: same objective, converged at once
    warm = EM(binomial_mixture, max_iter=2000, tol=1e-15, init_values=params,
              progress_bar=False).run(jax.random.PRNGKey(0), jnp.asarray(x))
    np.testing.assert_allclose(warm.history["objective"][0, 0], result.objective, rtol=1e-14)
    assert warm.converged and warm.n_iter <= 2 and warm.objective >= result.objective - 1e-12


# -- plots ----------------------------------------------------------------------------------------
def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plots_write_png(map_fits, x1d, tmp_path):
    result = map_fits[3]
    plots.plot_convergence(result, path=tmp_path / "conv.png")
    plots.plot_responsibilities(result, x1d, path=tmp_path / "resp1d.png")
    trace = {"log_likelihood": np.array([-3.0, -2.0, -1.5]), "bound": np.array([-2.5, -1.8]),
             "gap": np.array([0.5, 0.3])}
    plots.plot_bound(trace, path=tmp_path / "bound.png")
    rng = np.random.default_rng(0)
    x2 = rng.standard_normal((40, 2))
    fake = type("Fit", (), {})()  # the 2-D plot needs only posterior, sites and params
    fake.sites = result.sites
    fake.posterior = {"z": jax.nn.softmax(jnp.asarray(rng.standard_normal((40, 2))), -1)}
    fake.params = {"loc": np.array([[0.0, 0.0], [1.0, 1.0]]),
                   "cov": np.stack([np.eye(2), [[1.0, 0.5], [0.5, 1.0]]])}
    plots.plot_responsibilities(fake, x2, path=tmp_path / "resp2d.png")
    for name in ("conv", "resp1d", "bound", "resp2d"):
        assert _is_png(tmp_path / f"{name}.png"), name
