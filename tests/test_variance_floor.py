"""A variance floor for maximum likelihood (issue 13): the closed-form M-step is the exact
constrained maximiser, checked against a NumPy EM written from the textbook update (eigenvalues
of the weighted scatter clipped at the floor)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions.transforms import biject_to
from scipy.stats import multivariate_normal as mvn

from bayes_em import EM, ConvergenceWarning, models
from bayes_em.constraints import floor_of, positive_definite_floor

jax.config.update("jax_enable_x64", True)

FLOOR = 1e-2


def data_with_a_repeated_point():
    """Two clusters and five copies of one far point: ML puts a component on the copies, where
    the unconstrained likelihood is unbounded."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal([0, 0], 1.0, (60, 2)), rng.normal([4, 3], 0.5, (40, 2)),
                           np.tile([[10.0, -10.0]], (5, 1))])


START = dict(weights=np.array([0.05, 0.5, 0.45]), loc=np.array([[10.0, -10.0], [0, 0], [4, 3]]))


def numpy_em(x, w, mu, cov, n_iter, floor, covariance):
    """Textbook EM for a Gaussian mixture with every covariance eigenvalue ≥ floor."""
    K = len(w)
    for _ in range(n_iter):
        lp = np.stack([np.log(w[k]) + mvn.logpdf(x, mu[k], cov[k]) for k in range(K)], 1)
        r = np.exp(lp - lp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0)
        w, mu = nk / nk.sum(), (r.T @ x) / nk[:, None]
        new = []
        for k in range(K):
            d = x - mu[k]
            s = (r[:, k, None] * d).T @ d / nk[k]
            if covariance == "diag":
                s = np.diag(np.maximum(np.diag(s), floor))
            else:
                lam, vec = np.linalg.eigh(s)
                s = (vec * np.maximum(lam, floor)) @ vec.T
            new.append(s)
        cov = np.array(new)
    return w, mu, cov


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_floor_matches_a_numpy_constrained_em(covariance):
    x = data_with_a_repeated_point()
    result = EM(models.gmm, max_iter=40, tol=0.0, init_values=START, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=3, covariance=covariance, variance_floor=FLOOR)
    var = np.var(x, axis=0)
    w, mu, cov = numpy_em(x, START["weights"], START["loc"], np.stack([np.diag(var)] * 3), 40,
                          FLOOR, covariance)
    np.testing.assert_allclose(result.params["weights"], w, atol=1e-10)
    np.testing.assert_allclose(result.params["loc"], mu, atol=1e-9)
    got = (result.params["cov"] if covariance == "full"
           else np.stack([np.diag(s ** 2) for s in result.params["scale"]]))
    np.testing.assert_allclose(got, cov, atol=1e-9)
    # the floor binds on the component on the repeated point, and only there
    np.testing.assert_allclose(np.linalg.eigvalsh(got[0]), [FLOOR, FLOOR], rtol=1e-9)
    assert np.linalg.eigvalsh(got[1:]).min() > 10 * FLOOR
    assert "closed-form" in result.mstep_paths["cov" if covariance == "full" else "scale"]


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_floor_stops_the_collapse_and_the_fit_ascends(covariance):
    x = jnp.asarray(data_with_a_repeated_point())
    fit = EM(models.gmm, max_iter=300, init_values=START, progress_bar=False)
    if covariance != "tied":  # one shared covariance cannot sit on the copies alone
        with pytest.warns(ConvergenceWarning):  # the unconstrained fit collapses onto them
            ml = fit.run(jax.random.PRNGKey(0), x, K=3, covariance=covariance)
        assert ml.status in ("collapsed", "nonfinite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        floored = fit.run(jax.random.PRNGKey(0), x, K=3, covariance=covariance,
                          variance_floor=FLOOR)
    assert floored.status == "converged"
    h = floored.history["objective"][0, : floored.n_iter + 1]
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h).max())
    for v in floored.params.values():
        assert np.isfinite(v).all()


def test_floor_arguments_are_checked():
    x = jnp.asarray(data_with_a_repeated_point())
    with pytest.raises(ValueError, match="variance_floor applies to maximum likelihood"):
        EM(models.gmm, progress_bar=False).run(jax.random.PRNGKey(0), x, K=2, prior=True,
                                               variance_floor=0.1)
    with pytest.raises(ValueError, match="positive number"):
        EM(models.gmm, progress_bar=False).run(jax.random.PRNGKey(0), x, K=2, variance_floor=0.0)


def test_positive_definite_floor_constraint_and_transform():
    c = positive_definite_floor(0.5)
    t = biject_to(c)
    u = jax.random.normal(jax.random.PRNGKey(1), (4, 3))  # 4 unconstrained 2x2 matrices
    m = t(u)
    assert np.linalg.eigvalsh(np.asarray(m)).min() > 0.5
    assert np.asarray(c(m)).all()
    np.testing.assert_allclose(t.inv(m), u, atol=1e-10)
    assert not bool(c(jnp.eye(2) * 0.4))
    assert floor_of(c) == 0.5 and c == positive_definite_floor(0.5)
    assert c != positive_definite_floor(0.25)
