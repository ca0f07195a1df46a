"""Label switching across restarts: restarts at one optimum under permuted component labels are
relabelled to the best restart's labels (only where that is a symmetry of the model), so that
summaries pooled over restarts (R-hat) see one optimum."""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em import EM, models
from bayes_em.relabel import align_restarts, symmetries

jax.config.update("jax_enable_x64", True)

X = np.concatenate([np.random.default_rng(0).normal(m, 0.5, size=(150, 2))
                    for m in ([-3.0, 0.0], [0.0, 3.0], [3.0, 0.0])])
STARTS = np.array([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])


def permuted_starts(rng_key, params):
    """Restart r starts at the true centres, rolled by r (and the covariances with them)."""
    shift = jax.random.randint(rng_key, (), 1, 3)
    return {"loc": jnp.roll(jnp.asarray(STARTS), shift, axis=0)}


def fit():
    em = EM(models.gmm, restarts=4, init=permuted_starts, init_values={"loc": STARTS},
            max_iter=200, tol=1e-10, progress_bar=False)
    return em.run(jax.random.PRNGKey(1), jnp.asarray(X), 3)


def test_restarts_at_permuted_labels_are_aligned_to_the_best():
    result = fit()
    locs = np.asarray(result.restart_params["loc"])
    best = result.best_restart
    # the restarts found one optimum (same objective) under different labels
    np.testing.assert_allclose(result.restart_objective, result.restart_objective[best],
                               rtol=1e-9)
    assert any(not np.allclose(locs[r], locs[best], atol=1e-3) for r in range(4))
    axes = symmetries(result)
    assert axes == {"z": {"weights": (0,), "loc": (0,), "cov": (0,)}}
    aligned = align_restarts(result)
    for name in ("weights", "loc", "cov"):
        for r in range(4):  # every restart now equals the best one, row by row
            np.testing.assert_allclose(aligned.restart_params[name][r],
                                       result.restart_params[name][best], atol=1e-6)


def test_inference_data_over_restarts_has_rhat_near_one():
    result = fit()
    idata = result.to_inference_data(restarts="all", num_samples=200)
    rhat = az.rhat(idata)["loc"].values
    assert np.all(rhat < 1.05), rhat
    raw = result.to_inference_data(restarts="all", num_samples=200, align=False)
    assert np.max(az.rhat(raw)["loc"].values) > 1.5  # label switching, unaligned


def test_no_symmetry_no_relabelling():
    """A mixture whose components are not exchangeable (a fixed, unequal weight vector and
    component-specific priors would break it; here: component 0's scale is fixed at 1 and
    component 1's fitted): no permutation leaves the objective unchanged."""
    def model(x):
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
        s1 = numpyro.param("s1", 2.0, constraint=constraints.positive)
        scale = jnp.stack([jnp.ones(()), s1])
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.3, 0.7])))
            numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    x = jnp.asarray(np.random.default_rng(2).normal(size=200))
    result = EM(model, restarts=2, max_iter=500, tol=1e-6, progress_bar=False).run(
        jax.random.PRNGKey(0), x)
    assert symmetries(result) == {}
    assert align_restarts(result) is result


def test_relabel_by_location_orders_every_restart_and_the_posterior():
    result = fit()
    ordered = result.relabel(by="loc")
    loc = np.asarray(ordered.params["loc"])
    assert np.all(np.diff(loc[:, 0]) > 0)  # ascending first coordinate
    order = np.argsort(np.asarray(result.params["loc"])[:, 0])
    for name in ("weights", "loc", "cov"):
        np.testing.assert_allclose(ordered.params[name], np.asarray(result.params[name])[order])
        for r in range(result.n_restarts):  # every restart in the same canonical order
            np.testing.assert_allclose(ordered.restart_params[name][r], ordered.params[name],
                                       atol=1e-6)
    np.testing.assert_allclose(ordered.posterior["z"], np.asarray(result.posterior["z"])[:, order])
    np.testing.assert_array_equal(np.asarray(result.params["loc"])[order][
        np.asarray(ordered.most_probable["z"])][:, 0],
        np.asarray(result.params["loc"])[np.asarray(result.most_probable["z"])][:, 0])
    assert ordered.objective == result.objective
