"""Fits from two threads at once, and a model whose structure follows the data's shape
(issue 13): each gives the result it gives alone; cached traces never go stale or leak."""

import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from bayes_em import EM


def mixture(x):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def hmm(y):
    trans = numpyro.param("trans", jnp.array([[0.8, 0.2], [0.3, 0.7]]),
                          constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-0.5, 0.5]))

    def step(z_prev, y_t):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Normal(loc[z], 1.0), obs=y_t)
        return z, None

    scan(step, 0, y)


def test_two_threads_fit_different_models():
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-2, 1, 100), rng.normal(2, 1, 100)]))
    y = jnp.asarray(np.repeat([-2.0, 2.0, -2.0, 2.0], 50) + rng.normal(size=200))
    fits = [(mixture, x), (hmm, y)]
    alone = [EM(m, max_iter=50, progress_bar=False).run(jax.random.PRNGKey(0), d).params
             for m, d in fits]
    results = [None, None]
    errors = []

    def work(i):
        try:
            m, d = fits[i]
            results[i] = EM(m, max_iter=50, progress_bar=False).run(jax.random.PRNGKey(0), d).params
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    for _ in range(3):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for got, want in zip(results, alone):
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-12)


def shape_dependent(x):
    """One component per 50 rows: the structure follows the data's length."""
    K = max(1, x.shape[0] // 50)
    loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
    if K > 1:
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    else:
        w = jnp.ones(1)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def test_structure_that_follows_the_data_shape():
    em = EM(shape_dependent, max_iter=5, progress_bar=False)
    a = em.run(jax.random.PRNGKey(0), jnp.linspace(-2, 2, 100))
    b = em.run(jax.random.PRNGKey(0), jnp.linspace(-2, 2, 150))
    c = em.run(jax.random.PRNGKey(0), jnp.linspace(-2, 2, 100))
    assert a.params["loc"].shape == (2,) and b.params["loc"].shape == (3,)
    assert c.params["loc"].shape == (2,) and set(c.sites.param_names) == {"loc", "w"}
    np.testing.assert_allclose(a.params["loc"], c.params["loc"])


def test_model_functions_are_not_kept_alive():
    refs = []
    for i in range(2):
        def model(x):
            mixture(x)
        EM(model, max_iter=2, tol=0.0, progress_bar=False).run(jax.random.PRNGKey(0), jnp.ones(10))
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    assert all(r() is None for r in refs)
