"""Random restarts that find the optimum (issue 13): starts anchored on data rows drawn by
k-means++ break the symmetry that random posterior weights average away on many rows."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from shared_models import full_gmm

from bayes_em import EM


def readme_mixture(x, K):  # the README's model
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
        scale = numpyro.sample("scale", dist.InverseGamma(2.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def three_clusters(n, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    return jnp.asarray(np.array([-3.0, 2.0, 6.0])[z]
                       + np.array([0.6, 0.3, 0.3])[z] * rng.normal(size=n))


def reached(result, rtol=1e-6):
    """Random restarts (all but the declared start) whose objective is the best's."""
    best = result.restart_objective.max()
    return int(np.sum(np.abs(result.restart_objective[1:] - best) <= rtol * abs(best)))


def assert_no_false_convergence(result):
    best = result.restart_objective.max()
    for obj, status in zip(result.restart_objective, result.restart_status):
        if best - obj > 1e-3 * abs(best):
            assert status != "converged", (obj, status)


@pytest.mark.parametrize("n", [20_000, 400_000])
def test_random_restarts_reach_the_optimum(n):
    result = EM(readme_mixture, restarts=7, max_iter=500, progress_bar=False).run(
        jax.random.PRNGKey(0), three_clusters(n), K=3)
    assert reached(result) >= 5, (result.restart_objective, result.restart_status)
    assert_no_false_convergence(result)
    np.testing.assert_allclose(np.sort(result.params["loc"]), [-3.0, 2.0, 6.0], atol=0.05)


def test_random_restarts_full_covariance_five_components():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0], [3.0, 12.0]])
    z = rng.integers(5, size=3000)
    x = jnp.asarray(centres[z] + rng.normal(size=(3000, 2)) @ np.array([[1.0, 0.3], [0.0, 0.7]]))
    result = EM(full_gmm, restarts=7, max_iter=500, progress_bar=False).run(
        jax.random.PRNGKey(2), x, K=5)
    assert reached(result) >= 5, (result.restart_objective, result.restart_status)
    assert_no_false_convergence(result)
    found = np.asarray(result.params["loc"])
    assert max(np.min(np.linalg.norm(found - c, axis=1)) for c in centres) < 0.2


def gaussian_hmm(y, K):
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros(K))
    scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)

    def step(z_prev, y_t):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Normal(loc[z], scale[z]), obs=y_t)
        return z, None

    z0 = numpyro.sample("z0", dist.Categorical(init))
    scan(step, z0, y)


def test_anchored_restarts_break_the_symmetry_of_an_hmm():
    """Every declared parameter symmetric (uniform transitions, equal locations): the declared
    start is a fixed point; anchored restarts find the two regimes."""
    rng = np.random.default_rng(3)
    z, states = 0, []
    for _ in range(400):
        z = z if rng.uniform() < 0.95 else 1 - z
        states.append(z)
    y = jnp.asarray(np.array([-2.0, 2.0])[states] + 0.5 * rng.normal(size=400))
    result = EM(gaussian_hmm, restarts=4, max_iter=300, progress_bar=False).run(
        jax.random.PRNGKey(0), y, K=2)
    assert result.best_restart != 0
    assert reached(result, 1e-6) == 3
    np.testing.assert_allclose(np.sort(result.params["loc"]), [-2.0, 2.0], atol=0.1)
    assert np.all(np.diag(result.params["trans"]) > 0.9)


def test_init_options():
    x = three_clusters(500)
    noise = EM(readme_mixture, restarts=3, init="noise", max_iter=50,
               progress_bar=False).run(jax.random.PRNGKey(0), x, K=3)
    assert noise.n_restarts == 3

    def spread(rng_key, params):  # a callable init: locations drawn around the data
        return {"loc": jnp.sort(jax.random.uniform(rng_key, (3,), minval=-4.0, maxval=7.0))}

    custom = EM(readme_mixture, restarts=4, init=spread, max_iter=300,
                progress_bar=False).run(jax.random.PRNGKey(0), x, K=3)
    assert reached(custom) >= 2
    with pytest.raises(ValueError, match="init must be one of"):
        EM(readme_mixture, init="kmeans")

    def wrong_site(rng_key, params):
        return {"mean": jnp.zeros(3)}

    with pytest.raises(ValueError, match="'mean'"):
        EM(readme_mixture, restarts=2, init=wrong_site, progress_bar=False).run(
            jax.random.PRNGKey(0), x, K=3)
