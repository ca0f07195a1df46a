"""Chunked exact EM (``EM(model, chunk_size=C)``): the same iterates as unchunked EM, in float64,
for a full-covariance mixture, a MAP mixture, padded HMM sequences and a numeric M-step; and
clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from shared_models import padded_hmm_map

from bayes_em import EM, chunked, models


@pytest.fixture(autouse=True)
def x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _fit(model, args, kwargs=None, chunk_size=None, **options):
    options = dict(dict(restarts=2, max_iter=12, tol=0.0, progress_bar=False), **options)
    em = EM(model, chunk_size=chunk_size, **options)
    return em.run(jax.random.PRNGKey(0), *args, **(kwargs or {}))


def _same(model, args, kwargs=None, chunk_size=7, atol=1e-10, **options):
    a = _fit(model, args, kwargs, None, **options)
    b = _fit(model, args, kwargs, chunk_size, **options)
    assert b.problem.chunks is not None and a.problem.chunks is None
    np.testing.assert_array_equal(a.restart_n_iter, b.restart_n_iter)
    np.testing.assert_allclose(b.history["objective"], a.history["objective"], rtol=0, atol=atol)
    np.testing.assert_allclose(b.history["log_prior"], a.history["log_prior"], rtol=0, atol=atol)
    for k in a.restart_params:
        np.testing.assert_allclose(np.asarray(b.restart_params[k]),
                                   np.asarray(a.restart_params[k]), rtol=0, atol=atol, err_msg=k)
    assert list(a.restart_status) == list(b.restart_status)
    return a, b


def _blobs(n=53, d=2, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[-3.0] * d, [0.5] * d, [4.0] * d])
    z = rng.integers(0, 3, n)
    return centres[z] + rng.normal(size=(n, d)) * np.array([1.0, 0.7, 1.3])[z, None]


def test_full_covariance_gmm_matches_unchunked():
    x = _blobs()  # N = 53, not a multiple of 7
    a, b = _same(models.gmm, (x, 3))
    # every closed form from one pass (additive statistics), not 2 stages
    assert b.problem.chunks.layout is not None
    assert [[p.param for p in s] for s in chunked.stages(b.problem.closed)] == [
        ["weights", "loc"], ["cov"]]


def mvn_fixed_cov(x, K):
    """A location fitted under a fixed covariance: no additive form, so stages."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, 2)) + jnp.arange(K)[:, None])
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], 0.5 * jnp.eye(2)), obs=x)


def test_staged_closed_forms_match_unchunked():
    a, b = _same(mvn_fixed_cov, (_blobs(), 3), restarts=1)
    assert b.problem.chunks.layout is None and b.problem.chunks.first_stage


def test_float32_chunked_gmm_is_close_to_unchunked():
    """float32: the statistics about each current location (entrywise distances)."""
    jax.config.update("jax_enable_x64", False)
    x = _blobs().astype(np.float32)
    a = _fit(models.gmm, (x, 3), restarts=1, max_iter=5)
    b = _fit(models.gmm, (x, 3), chunk_size=7, restarts=1, max_iter=5)
    assert b.params["loc"].dtype == np.float32 and b.problem.chunks.layout is not None
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-3, atol=1e-3, err_msg=k)


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow runs it
def test_map_gmm_matches_unchunked():
    x = _blobs(seed=1)
    a, b = _same(models.gmm, (x, 3), dict(prior=True), restarts=1)
    assert a.log_prior != 0.0


def mixture_numeric(x, K):
    """A 1-D mixture whose scales go through exp: weights and locations in closed form, the
    log-scales by L-BFGS."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.linspace(-2.0, 2.0, K))
    log_s = numpyro.param("log_s", jnp.zeros(K))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], jnp.exp(log_s)[z]), obs=x)


def test_numeric_mstep_matches_unchunked():
    x = _blobs(n=41, d=1)[:, 0]
    a, b = _same(mixture_numeric, (x, 3), chunk_size=10, atol=1e-9, restarts=1)
    assert b.mstep_paths["log_s"] == "numeric"


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow runs it
def test_padded_hmm_sequences_match_unchunked():
    rng = np.random.default_rng(2)
    n, t_max, K, V = 11, 9, 2, 3
    lengths = rng.integers(3, t_max + 1, n)
    ys = rng.integers(0, V, (n, t_max))
    mask = np.arange(t_max)[None, :] < lengths[:, None]
    ys = np.where(mask, ys, 0)
    _same(padded_hmm_map, (ys, mask, K, V), chunk_size=4, restarts=1)


def global_latent(x):
    c = numpyro.sample("c", dist.Categorical(jnp.ones(2) / 2))
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(loc[c], 1.0), obs=x)


def test_latent_outside_the_data_plate_is_refused():
    with pytest.raises(ValueError, match=r"\['c'\] lie outside the data plate 'data'"):
        _fit(global_latent, (np.linspace(-2, 2, 20),), chunk_size=5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_chunk_size_is_validated(bad):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        EM(models.gmm, chunk_size=bad)


@pytest.mark.parametrize("option", [dict(hard=True), dict(accelerate=True)])
def test_hard_and_squarem_are_refused(option):
    with pytest.raises(ValueError, match="chunk_size does not combine"):
        EM(models.gmm, chunk_size=10, **option)


def test_chunk_size_at_least_n_is_unchunked():
    r = _fit(models.gmm, (_blobs(n=20), 3), chunk_size=20, restarts=1, max_iter=2)
    assert r.problem.chunks is None


def test_one_row_and_no_observed_factor_are_not_errors():
    """A data plate of one row has no dim (nothing to chunk: the fit runs unchunked), and a
    model whose observed sites are not among the factors has no data plate (None) — both
    raised a TypeError from the plate bookkeeping before."""
    from bayes_em.predict import _data_plate

    assert _data_plate([], ("y",), ("data",)) is None
    x = jnp.asarray([[0.5, -1.0]])
    result = EM(models.gmm, max_iter=2, progress_bar=False, chunk_size=1,
                init_values={"cov": jnp.eye(2)[None]}).run(jax.random.PRNGKey(0), x, K=1)
    assert result.problem.chunks is None and np.all(np.isfinite(result.params["loc"]))
