"""Bad input raises a clear error that names the site or argument."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

from bayes_em import EM, ModelError

KEY = jax.random.PRNGKey(0)


def mixture(x):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def fit(model, *args, **em_kwargs):
    return EM(model, progress_bar=False, max_iter=3, **em_kwargs).run(KEY, *args)


def test_nan_in_data_names_site():
    x = jnp.array([0.1, jnp.nan, 0.3])
    with pytest.raises(ModelError, match="'x'.*NaN"):
        fit(mixture, x)


def test_inf_in_data_names_site():
    with pytest.raises(ModelError, match="'x'"):
        fit(mixture, jnp.array([0.1, jnp.inf]))


def test_wrongly_shaped_data_is_refused():
    def model(x):
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
        with numpyro.plate("data", 5):
            z = numpyro.sample("z", dist.Bernoulli(0.5))
            numpyro.sample("x", dist.Normal(loc[z.astype(int)], 1.0), obs=x)

    with pytest.raises(ValueError):
        fit(model, jnp.ones(3))


def test_no_discrete_latent():
    def model(x):
        loc = numpyro.param("loc", 0.0)
        numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(ModelError, match="no discrete latent"):
        fit(model, jnp.ones(3))


def test_latent_without_enumerable_support_names_site():
    def model(x):
        rate = numpyro.param("rate", 1.0, constraint=constraints.positive)
        n = numpyro.sample("n", dist.Poisson(rate))
        numpyro.sample("x", dist.Normal(n, 1.0), obs=x)

    with pytest.raises(ModelError, match="'n'.*Poisson"):
        fit(model, jnp.ones(3))


def test_enumeration_over_memory_limit_names_sites_before_allocating():
    def model(x):
        loc = numpyro.param("loc", jnp.linspace(-1, 1, 10))
        total = 0.0
        for i in range(8):  # 10**8 joint configurations times 1000 points
            total = total + loc[numpyro.sample(f"z{i}", dist.Categorical(jnp.ones(10) / 10))]
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(total, 1.0), obs=x)

    with pytest.raises(MemoryError, match="'x'.*z0=10"):
        fit(model, jnp.zeros(1000))


def test_too_many_latents_outside_plates():
    def model(x):
        loc = numpyro.param("loc", 0.0)
        total = loc
        for i in range(40):
            total = total + numpyro.sample(f"z{i}", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(total, 1.0), obs=x)

    with pytest.raises(ModelError, match="plate"):
        fit(model, jnp.zeros(()), memory_limit=float("inf"))


def test_nonfinite_density_at_initial_values_names_site():
    def model(x):
        rate = numpyro.param("rate", jnp.array([1.0, 2.0]), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Bernoulli(0.5))
            numpyro.sample("x", dist.Exponential(rate[z.astype(int)]), obs=x)

    with pytest.raises(ModelError, match="'x'.*outside the support"):  # data: checked first
        fit(model, jnp.array([1.0, -2.0]))

    def bounded(x):  # data outside a support that the parameters set
        high = numpyro.param("high", jnp.array([1.0, 2.0]), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Bernoulli(0.5))
            numpyro.sample("x", dist.Uniform(0.0, high[z.astype(int)]), obs=x)

    with pytest.raises(ModelError, match="not finite.*'x'"):
        fit(bounded, jnp.array([0.5, 3.0]))


def test_initial_value_outside_support_names_site():
    with pytest.raises(ModelError, match="'w'.*support"):
        fit(mixture, jnp.ones(3), init_values=dict(w=jnp.array([0.7, 0.7])))


def test_init_values_for_unknown_site():
    with pytest.raises(ModelError, match="nope"):
        fit(mixture, jnp.ones(3), init_values=dict(nope=1.0))


def test_continuous_site_without_prior():
    def model(x):
        loc = numpyro.sample("loc", dist.ImproperUniform(constraints.real, (), ()))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Bernoulli(0.5))
            numpyro.sample("x", dist.Normal(loc + z, 1.0), obs=x)

    with pytest.raises(ModelError, match="'loc'.*no prior"):
        fit(model, jnp.ones(3))


def test_continuous_site_depending_on_latent():
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Bernoulli(0.5))
            u = numpyro.sample("u", dist.Normal(z, 1.0))
            numpyro.sample("x", dist.Normal(u, 1.0), obs=x)

    with pytest.raises(ModelError, match="'u'.*depends on.*'z'"):
        fit(model, jnp.ones(3))


@pytest.mark.parametrize("kwargs,name", [
    (dict(restarts=0), "restarts"),
    (dict(max_iter=0), "max_iter"),
    (dict(tol=-1.0), "tol"),
])
def test_invalid_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EM(mixture, **kwargs)


def test_collapsing_ml_mixture_returns_finite_parameters():
    """ML is unbounded when a component shrinks onto one point; the fit must not return NaN."""

    def model(x):
        loc = numpyro.param("loc", jnp.array([0.0, 10.0]))
        scale = numpyro.param("scale", jnp.array([1.0, 1e-3]), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    x = jnp.array([-0.5, 0.0, 0.3, 0.7, 10.0])
    result = EM(model, max_iter=50, progress_bar=False).run(KEY, x)
    for v in result.params.values():
        assert np.all(np.isfinite(np.asarray(v)))
    assert np.isfinite(result.objective)
    # the component on the point 10.0 gets zero scatter: no finite ML scale, reported
    assert result.status == "collapsed" and "site 'scale'[1]" in result.message
