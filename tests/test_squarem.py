"""SQUAREM: far fewer EM maps on a slowly converging mixture, same optimum, never a decrease."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em import EM


def overlapping(x):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-0.5, 0.5]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def test_squarem_saves_iterations_and_reaches_the_optimum():
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-0.6, 1, 600), rng.normal(0.6, 1, 400)]))
    plain = EM(overlapping, max_iter=5000, tol=1e-8, progress_bar=False).run(
        jax.random.PRNGKey(0), x)
    fast = EM(overlapping, max_iter=5000, tol=1e-8, accelerate=True, progress_bar=False).run(
        jax.random.PRNGKey(0), x)
    assert plain.converged and fast.converged
    assert fast.n_evals[0] <= plain.n_evals[0] / 3, (fast.n_evals, plain.n_evals)
    assert fast.n_accepted[0] > 0
    # SQUAREM reaches (at least) plain EM's objective; plain EM's stop at tol is slightly early
    assert fast.objective >= plain.objective - 1e-8 * abs(plain.objective)
    # and a tightly converged plain EM lands on the same optimum
    exact = EM(overlapping, max_iter=20000, tol=0.0, progress_bar=False,
               init_values=fast.params).run(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(fast.objective, exact.objective, rtol=1e-7)
    obj = fast.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-12 * abs(obj).max())
