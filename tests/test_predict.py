"""The fitted model on new data (issue 16): predict_proba / predict / score_samples / score equal
scikit-learn's GaussianMixture and hmmlearn's CategoricalHMM with the same parameters, a stream of
batch sizes compiles once per bucket, and draws come out with the right shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Predictive
from shared_models import categorical_hmm

from bayes_em import EM, models
from bayes_em.predict import bucket

jax.config.update("jax_enable_x64", True)


def clusters(n, seed):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 5.0]])
    return centres[rng.integers(3, size=n)] + rng.normal(size=(n, 2)) @ np.array([[1, .3], [0, .7]])


@pytest.fixture(scope="module")
def gmm_fit():
    x = jnp.asarray(clusters(400, 0))
    return EM(models.gmm, restarts=2, progress_bar=False).run(jax.random.PRNGKey(0), x, K=3)


def sklearn_twin(params):
    from sklearn.mixture import GaussianMixture
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    gm = GaussianMixture(3, covariance_type="full")
    gm.weights_ = np.asarray(params["weights"])
    gm.means_ = np.asarray(params["loc"])
    gm.covariances_ = np.asarray(params["cov"])
    gm.precisions_cholesky_ = _compute_precision_cholesky(gm.covariances_, "full")
    return gm


def test_gmm_on_new_data_matches_sklearn(gmm_fit):
    gm = sklearn_twin(gmm_fit.params)
    for n, seed in ((37, 1), (50, 2), (200, 3)):
        x = clusters(n, seed)
        proba = gmm_fit.predict_proba(jnp.asarray(x), K=3)["z"]
        assert proba.shape == (n, 3)
        np.testing.assert_allclose(proba, gm.predict_proba(x), atol=1e-8)
        np.testing.assert_allclose(gmm_fit.score_samples(jnp.asarray(x), K=3),
                                   gm.score_samples(x), rtol=1e-8)
        np.testing.assert_allclose(gmm_fit.score(jnp.asarray(x), K=3),
                                   gm.score(x) * n, rtol=1e-8)
        np.testing.assert_array_equal(gmm_fit.predict(jnp.asarray(x), K=3)["z"], gm.predict(x))


def test_batch_sizes_compile_once_per_bucket():
    x = jnp.asarray(clusters(300, 0))
    fit = EM(models.gmm, max_iter=20, progress_bar=False).run(jax.random.PRNGKey(0), x, K=3)
    assert bucket(37) == bucket(50) == 64 and bucket(200) == 256 and bucket(64) == 64
    for n in (37, 50, 61):  # one bucket
        fit.predict_proba(jnp.asarray(clusters(n, n)), K=3)
        fit.score_samples(jnp.asarray(clusters(n, n)), K=3)
    fns = [v for k, v in fit._cache.items() if isinstance(k, tuple) and k[0] == "predict"]
    assert len(fns) == 1
    assert fns[0]["posterior"]._cache_size() == 1 and fns[0]["pointwise"]._cache_size() == 1
    fit.predict_proba(jnp.asarray(clusters(200, 9)), K=3)  # a second bucket: a second program
    fns = [v for k, v in fit._cache.items() if isinstance(k, tuple) and k[0] == "predict"]
    assert len(fns) == 2


K, V = 3, 4


def test_hmm_on_new_data_matches_hmmlearn():
    from hmmlearn.hmm import CategoricalHMM

    rng = np.random.default_rng(0)
    start = dict(trans=(np.ones((K, K)) + 3 * np.eye(K)) / (K + 3),
                 emit=np.random.default_rng(5).dirichlet(np.ones(V), K))
    fit = EM(categorical_hmm, init_values=start, max_iter=30, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(rng.integers(0, V, 300)), K=K, V=V)
    p = fit.params
    # bayes_em's chain starts at z0 (no emission) and emits from z_1..z_T: hmmlearn's start
    # distribution is p(z_1) = init @ trans
    twin = CategoricalHMM(K, init_params="", params="")
    twin.startprob_ = np.asarray(p["init"]) @ np.asarray(p["trans"])
    twin.transmat_, twin.emissionprob_ = np.asarray(p["trans"]), np.asarray(p["emit"])
    ys = rng.integers(0, V, 120)
    proba = fit.predict_proba(jnp.asarray(ys), K=K, V=V)
    np.testing.assert_allclose(np.asarray(proba["z"]).reshape(-1, K),
                               twin.predict_proba(ys[:, None]), atol=1e-8)
    np.testing.assert_allclose(fit.score(jnp.asarray(ys), K=K, V=V), twin.score(ys[:, None]),
                               rtol=1e-9)
    _, path = twin.decode(ys[:, None], algorithm="viterbi")
    best = fit.predict(jnp.asarray(ys), K=K, V=V)["z"]
    np.testing.assert_array_equal(np.asarray(best).ravel(), path)


def test_sample_and_predictive_shapes(gmm_fit):
    x = jnp.asarray(clusters(30, 4))
    draws = gmm_fit.sample(jax.random.PRNGKey(1), x, num_samples=5, K=3)
    assert draws["z"].shape == (5, 30)
    assert set(draws["z"].ravel()) <= {0, 1, 2}
    # NumPyro's own Predictive takes the fitted params as they are
    out = Predictive(models.gmm, params=gmm_fit.params, num_samples=4)(
        jax.random.PRNGKey(2), x, K=3)
    assert out["z"].shape == (4, 30)
