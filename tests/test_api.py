"""The object API: restarts, results, progress bar, compilation reuse, float32, hard EM."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from sklearn.cluster import KMeans

from bayes_em import EM, LBFGS


def mixture(x, K):
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
        scale = numpyro.sample("scale", dist.InverseGamma(2.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def data(seed=0, n=300):
    rng = np.random.default_rng(seed)
    z = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    return jnp.asarray(np.array([-3.0, 2.0, 6.0])[z]
                       + np.array([1.0, 0.5, 0.3])[z] * rng.standard_normal(n))


def test_first_restart_is_the_declared_start():
    x = data()
    one = EM(mixture, restarts=1, max_iter=40, progress_bar=False).run(
        jax.random.PRNGKey(0), x, K=3)
    many = EM(mixture, restarts=4, max_iter=40, progress_bar=False).run(
        jax.random.PRNGKey(0), x, K=3)
    np.testing.assert_allclose(many.history["objective"][0], one.history["objective"][0])
    for k in one.params:
        np.testing.assert_allclose(many.restart_params[k][0], one.params[k])
    # the first start is the declared one: loc = linspace(-1, 1), w and scale at the prior mean
    np.testing.assert_allclose(one.history["log_prior"][0, 0],
                               dist.Dirichlet(2.0 * jnp.ones(3)).log_prob(jnp.ones(3) / 3)
                               + 3 * dist.InverseGamma(2.0, 1.0).log_prob(1.0))
    assert many.restart_objective.shape == (4,)
    assert many.history["objective"].shape == (4, 41)
    assert many.best_restart == int(np.argmax(many.restart_objective))
    assert many.objective == many.restart_objective.max()
    # the random starts differ from the declared one
    assert len({round(float(o), 6) for o in many.history["objective"][:, 0]}) == 4


def test_result_contents():
    x = data(1)
    result = EM(mixture, restarts=3, max_iter=300, tol=1e-10, progress_bar=False).run(
        jax.random.PRNGKey(2), x, K=3
    )
    assert result.converged and result.status == "converged"
    assert result.posterior["z"].shape == (300, 3)
    np.testing.assert_allclose(result.posterior["z"].sum(-1), 1.0)
    np.testing.assert_array_equal(result.most_probable["z"], np.argmax(result.posterior["z"], -1))
    trace = result.trace()
    assert len(trace["objective"]) == result.n_iter + 1
    np.testing.assert_allclose(trace["objective"], trace["log_likelihood"] + trace["log_prior"])
    assert np.isclose(trace["objective"][-1], result.objective)
    for v in result.params.values():
        assert np.all(np.isfinite(v))
    # the fit recovers the simulation
    np.testing.assert_allclose(np.sort(result.params["loc"]), [-3.0, 2.0, 6.0], atol=0.3)


def test_progress_bar_on_by_default(capsys):
    EM(mixture, max_iter=20).run(jax.random.PRNGKey(0), data(), K=3)
    err = capsys.readouterr().err
    assert "EM" in err and "objective=" in err


def test_progress_bar_fit_starts_from_the_exact_initial_objective():
    """With the bar on, the first E-step runs alone before the chunks: history[0] is
    log p(X|θ_0) + log p(θ_0) at the declared start (computed here with scipy), and every later
    entry is one EM iteration, the trajectory of the fit compiled as one program."""
    from scipy.special import logsumexp
    from scipy.stats import dirichlet, invgamma, norm

    x = np.asarray(data())
    bar = EM(mixture, max_iter=25, tol=0.0).run(jax.random.PRNGKey(0), jnp.asarray(x), K=3)
    w0, loc0 = np.ones(3) / 3, np.linspace(-1.0, 1.0, 3)  # prior mean, declared init, scale 1
    ll0 = np.sum(logsumexp(norm.logpdf(x[:, None], loc0, 1.0) + np.log(w0), axis=1))
    lp0 = dirichlet.logpdf(w0, 2.0 * np.ones(3)) + 3 * invgamma.logpdf(1.0, 2.0, scale=1.0)
    np.testing.assert_allclose(bar.history["log_likelihood"][0, 0], ll0, rtol=1e-12)
    np.testing.assert_allclose(bar.history["log_prior"][0, 0], lp0, rtol=1e-12)
    assert bar.n_iter == 25 and bar.n_evals[0] == 25
    plain = EM(mixture, max_iter=25, tol=0.0, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=3)
    np.testing.assert_allclose(bar.history["objective"], plain.history["objective"], rtol=1e-10)


def test_second_run_with_same_shapes_does_not_recompile():
    em = EM(mixture, max_iter=10, progress_bar=False)
    em.run(jax.random.PRNGKey(0), data(0), K=3)
    ((_, fns),) = em._compiled.values()
    sizes = {k: f._cache_size() for k, f in fns.items()}
    assert sizes["fit"] == 1
    em.run(jax.random.PRNGKey(1), data(5), K=3)
    assert len(em._compiled) == 1
    assert {k: f._cache_size() for k, f in fns.items()} == sizes


def test_float32():
    with jax.enable_x64(False):
        x = data().astype(jnp.float32)
        result = EM(mixture, restarts=2, max_iter=200, tol=1e-6, progress_bar=False).run(
            jax.random.PRNGKey(0), x, K=3
        )
        assert result.params["loc"].dtype == jnp.float32
        assert result.status == "converged"
        assert not result.n_decreases.any()
        np.testing.assert_allclose(np.sort(result.params["loc"]), [-3.0, 2.0, 6.0], atol=0.3)


def kmeans_model(x, K):
    loc = numpyro.param("loc", jnp.zeros((K, x.shape[1])))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.Normal(loc[z], 1.0).to_event(1), obs=x)


def test_hard_em_with_the_numeric_m_step_is_lloyd():
    """The closed-form path is checked against KMeans in test_models.py; here L-BFGS does the
    M-step (closed_form=False) and must land on the same centres."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(c, 0.7, size=(60, 2)) for c in ([0, 0], [3, 3], [0, 4])])
    init = x[[0, 70, 130]]
    n_iter = 10
    result = EM(kmeans_model, hard=True, max_iter=n_iter, tol=0.0, init_values=dict(loc=init),
                mstep=LBFGS(max_steps=200, gtol=1e-13), closed_form=False, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=3)
    assert result.mstep_paths == {"loc": "numeric"}
    km = KMeans(3, init=init, n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd").fit(x)
    np.testing.assert_allclose(result.params["loc"], km.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(result.most_probable["z"], km.labels_)
