"""Online (stepwise) EM: step size 1 on the whole data is batch EM iterate by iterate; a stream
of batches from a memory-mapped file reaches batch EM's fit; what it cannot do is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from shared_models import padded_hmm_map

from bayes_em import EM, OnlineEM, models
from bayes_em import em as core
from bayes_em.fit import Options, build
from bayes_em.online import step_sizes


@pytest.fixture(autouse=True)
def x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _blobs(n=301, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(-3.0, 1.0, (n // 2, 2)),
                           rng.normal(2.0, 0.5, (n - n // 2, 2)) + [0.0, 3.0]])


def normal_mixture(x, K):
    """1-D: Dirichlet weights (MAP), ML locations, inverse-gamma scales (MAP)."""
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
        scale = numpyro.sample("scale", dist.InverseGamma(2.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def poisson_categorical(counts, cats, K, V):
    """Two observed sites per row: a Poisson count and a categorical label."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.linspace(1.0, 5.0, K), constraint=constraints.positive)
    probs = numpyro.param("probs", jnp.full((K, V), 1.0 / V) + 0.05 * jnp.arange(K)[:, None]
                          * jnp.linspace(-1, 1, V), constraint=constraints.simplex)
    with numpyro.plate("data", counts.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("n", dist.Poisson(rate[z]), obs=counts)
        numpyro.sample("c", dist.Categorical(probs[z]), obs=cats)


def _hmm_data():
    rng = np.random.default_rng(2)
    n, t_max, V = 11, 9, 3
    lengths = rng.integers(3, t_max + 1, n)
    ys = rng.integers(0, V, (n, t_max))
    mask = np.arange(t_max)[None, :] < lengths[:, None]
    return np.where(mask, ys, 0), mask


def _counts_and_labels(n=200, seed=3):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, n)
    return rng.poisson(np.where(z == 0, 1.5, 7.0)), rng.integers(0, 4, n) * z


CASES = {
    "gmm_full_ml": (models.gmm, lambda: (_blobs(), 2), {}),
    "gmm_full_map": pytest.param(models.gmm, lambda: (_blobs(), 3), dict(prior=True),
                                 marks=pytest.mark.slow),
    "gmm_diag": (models.gmm, lambda: (_blobs(), 3), dict(covariance="diag")),
    "gmm_spherical_map": (models.gmm, lambda: (_blobs(), 3),
                          dict(covariance="spherical", prior=True)),
    "gmm_tied": (models.gmm, lambda: (_blobs(), 2), dict(covariance="tied")),
    "normal_1d": (normal_mixture, lambda: (_blobs()[:, 1], 3), {}),
    "kmeans": (models.kmeans, lambda: (_blobs(), 3), {}),
    "poisson_categorical": (poisson_categorical, lambda: (*_counts_and_labels(), 2, 4), {}),
    "hmm_sequences": (padded_hmm_map, lambda: (*_hmm_data(), 2, 3), {}),
}
SLOW_CASES = {"hmm_sequences"}  # ~11 s; pytest -m slow runs it


@pytest.mark.parametrize("model,make_args,kwargs", [
    pytest.param(*case, marks=pytest.mark.slow) if name in SLOW_CASES else case
    for name, case in CASES.items()], ids=list(CASES))
def test_step_size_one_on_the_whole_data_is_batch_em(model, make_args, kwargs):
    args = make_args()
    online = OnlineEM(model, step_size=1)
    state = online.init(jax.random.PRNGKey(0), *args, **kwargs)
    problem, params0, data = build(model, *args, options=Options(max_iter=10, tol=0), **kwargs)
    assert not problem.refused
    step = jax.jit(lambda s, d: core.step(problem, s, d)[0])
    batch = jax.jit(lambda p, d: core.init(problem, p, d))(params0, data)
    for t in range(6):
        state = online.update(state, *args, **kwargs)
        batch = step(batch, data)
        for k, v in batch.params.items():
            np.testing.assert_allclose(state.params[k], v, rtol=0, atol=1e-10, err_msg=f"{k} {t}")
    # the batch's log-likelihood per row at θ_5 (the last update's start) is batch EM's
    assert int(state.t) == 6 and np.isfinite(float(state.log_likelihood))


@pytest.mark.parametrize("covariance", ["full", "diag", "tied"])
def test_step_size_one_is_batch_em_in_float32(covariance):
    """The same in float32, where the online Gaussian statistics take the expansion about the
    batch's mean where `gaussian.expansion_fits` (this small batch fit keeps the exact two-pass
    statistics): the iterates agree within the expansion's round-off, at most about
    eps · 4096 of a covariance (5e-4 relative; 3e-5 here, against 7e-7 with the exact form)."""
    x = np.asarray(_blobs(), np.float32)
    with jax.enable_x64(False):
        online = OnlineEM(models.gmm, step_size=1)
        state = online.init(jax.random.PRNGKey(0), x, 2, covariance=covariance)
        problem, params0, data = build(models.gmm, x, 2, options=Options(max_iter=10, tol=0),
                                       covariance=covariance)
        step = jax.jit(lambda s, d: core.step(problem, s, d)[0])
        batch = jax.jit(lambda p, d: core.init(problem, p, d))(params0, data)
        for t in range(6):
            state = online.update(state, x, 2, covariance=covariance)
            batch = step(batch, data)
            for k, v in batch.params.items():
                assert np.asarray(v).dtype == np.float32
                np.testing.assert_allclose(state.params[k], v, rtol=2e-4, atol=2e-4,
                                           err_msg=f"{k} {t}")


def test_stream_from_a_memory_mapped_file_reaches_batch_em(tmp_path):
    rng = np.random.default_rng(7)
    n, b = 200_000, 2_000
    centres = np.array([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    x = centres[rng.integers(0, 3, n)] + rng.normal(size=(n, 2)) * [0.8, 1.2]
    np.save(tmp_path / "x.npy", x)
    held_out = centres[rng.integers(0, 3, 20_000)] + rng.normal(size=(20_000, 2)) * [0.8, 1.2]
    init = dict(loc=np.array([[-2.0, -1.0], [0.5, 2.0], [2.0, -1.0]]))
    stream = np.load(tmp_path / "x.npy", mmap_mode="r")
    batches = (np.asarray(stream[i:i + b]) for epoch in range(2) for i in range(0, n, b))
    online = OnlineEM(models.gmm, init_values=init)
    state = online.run(jax.random.PRNGKey(0), batches, n_total=n, progress_bar=False, K=3)
    assert int(state.t) == 2 * n // b

    batch = EM(models.gmm, init_values=init, max_iter=300, tol=1e-10, progress_bar=False)
    result = batch.run(jax.random.PRNGKey(0), x, 3)
    for k in ("weights", "loc", "cov"):
        np.testing.assert_allclose(state.params[k], result.params[k], rtol=0, atol=1e-2,
                                   err_msg=k)
    ours = online.log_likelihood(state, held_out, K=3)
    theirs = batch.e_step(result.params, held_out, 3).log_likelihood / len(held_out)
    assert abs(ours - theirs) < 1e-2
    assert abs(online.log_likelihood(_state_at(state, result.params), held_out,
                                 K=3) - theirs) < 1e-9


def _state_at(state, params):
    return state._replace(params={k: jnp.asarray(v) for k, v in params.items()})


def test_map_uses_n_total_and_the_prior_once():
    """Batches of 1/4 of the data scaled to n_total, with ρ ≡ 1: each update is the batch
    M-step on 4 copies of the batch (the prior counted once)."""
    x = _blobs(n=200)
    online = OnlineEM(models.gmm, step_size=1, n_total=200)
    state = online.init(jax.random.PRNGKey(0), x[:50], 2, prior=True)
    state = online.update(state, x[:50], 2, prior=True)
    x4 = np.concatenate([x[:50]] * 4)
    problem, p0, data = build(models.gmm, x4, 2, options=Options(max_iter=2, tol=0), prior=True,
                              init_values=online.params(online.init(jax.random.PRNGKey(0),
                                                                    x[:50], 2, prior=True)))
    # the prior's hyperparameters come from the init batch (x[:50]); x4 has the same variance
    batch = jax.jit(lambda p, d: core.step(problem, core.init(problem, p, d), d)[0])(p0, data)
    for k, v in batch.params.items():
        np.testing.assert_allclose(state.params[k], v, rtol=0, atol=1e-10, err_msg=k)


def mixture_numeric(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.linspace(-2.0, 2.0, K))
    log_s = numpyro.param("log_s", jnp.zeros(K))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], jnp.exp(log_s)[z]), obs=x)


def global_latent(x):
    c = numpyro.sample("c", dist.Categorical(jnp.ones(2) / 2))
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(loc[c], 1.0), obs=x)


def mvn_fixed_cov(x, K):
    loc = numpyro.param("loc", jnp.zeros((K, 2)) + jnp.arange(K)[:, None])
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], jnp.eye(2)), obs=x)


@pytest.mark.parametrize("model,args,match", [
    (mixture_numeric, (np.linspace(-3, 3, 30), 2), r"numeric one — 'log_s'"),
    (global_latent, (np.linspace(-2, 2, 20),), r"\['c'\] lie outside the data plate 'data'"),
    (mvn_fixed_cov, (_blobs(n=40), 2), r"site 'x' has its location 'loc' fitted"),
])
def test_what_online_em_cannot_do_is_refused(model, args, match):
    with pytest.raises(ValueError, match=match):
        OnlineEM(model).init(jax.random.PRNGKey(0), *args)


def test_step_sizes():
    rho = step_sizes(None, 0.6)
    assert rho(0) == pytest.approx(2.0 ** -0.6) and rho(8) == pytest.approx(10.0 ** -0.6)
    assert step_sizes(1)(5) == 1.0 and step_sizes(lambda t: 0.5)(3) == 0.5
    for bad in (dict(kappa=0.5), dict(kappa=1.5), dict(step_size=0), dict(step_size="x")):
        with pytest.raises(ValueError):
            step_sizes(**{"step_size": None, **bad})
    with pytest.raises(ValueError, match="init"):
        OnlineEM(models.gmm).update(None, _blobs(n=10), 2)
