"""Per-observation weights (numpyro.handlers.scale around a plate's body): a fit with integer
weights equals the fit of the dataset with each row repeated that many times."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from scipy.special import logsumexp

from bayes_em import EM

W = np.array([2, 1, 1, 3, 1, 2, 1, 1, 4, 1, 1, 2, 1, 3, 1, 1, 2, 1, 1, 2], float)
X = np.concatenate([np.linspace(-3.0, -1.0, 10), np.linspace(0.5, 2.5, 10)])


def mixture(x, w, emission="normal"):
    mix = numpyro.param("mix", jnp.array([0.3, 0.7]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-0.5, 0.5]))
    scale = numpyro.param("scale", jnp.array([1.0, 2.0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=w):
        z = numpyro.sample("z", dist.Categorical(mix))
        if emission == "normal":  # closed-form M-step
            numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)
        else:  # numeric M-step (L-BFGS)
            numpyro.sample("x", dist.StudentT(4.0, loc[z], scale[z]), obs=x)


def fit(model, *args, **kwargs):
    em = EM(model, max_iter=40, tol=0.0, progress_bar=False, **kwargs)
    return em.run(jax.random.PRNGKey(0), *args)


@pytest.mark.parametrize("emission", ["normal", "studentt"])
def test_weighted_mixture_equals_repeated_rows(emission):
    weighted = fit(lambda x, w: mixture(x, w, emission), X, W)
    x_rep = np.repeat(X, W.astype(int))
    repeated = fit(lambda x, w: mixture(x, w, emission), x_rep, np.ones_like(x_rep))
    np.testing.assert_allclose(weighted.log_likelihood, repeated.log_likelihood, rtol=1e-10)
    for k in ("mix", "loc", "scale"):
        np.testing.assert_allclose(weighted.params[k], repeated.params[k], atol=1e-6)
    # the posterior of each row is that of (the first of) its copies in the repeated data
    post = np.asarray(weighted.posterior["z"])
    first = np.cumsum(W.astype(int)) - W.astype(int)
    np.testing.assert_allclose(post, np.asarray(repeated.posterior["z"])[first], atol=1e-8)
    p = np.asarray(weighted.params["mix"]) * np.exp(
        -0.5 * ((X[:, None] - weighted.params["loc"]) / weighted.params["scale"]) ** 2
    ) / weighted.params["scale"]
    if emission == "normal":  # p(z | x_n, θ) by Bayes' rule
        np.testing.assert_allclose(post, p / p.sum(1, keepdims=True), atol=1e-8)
    assert post.shape == (20, 2)


def test_weights_of_a_plate_around_a_global_latent_by_brute_force():
    """log Z = log Σ_c p(c) Π_n p(x_n | c)^{w_n}: the weights apply inside the sum over c."""

    def coin(y, w):
        prior = numpyro.param("prior", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
        bias = numpyro.param("bias", jnp.array([0.3, 0.6]), constraint=constraints.unit_interval)
        c = numpyro.sample("c", dist.Categorical(prior))
        with numpyro.plate("tosses", y.shape[0]), numpyro.handlers.scale(scale=w):
            numpyro.sample("y", dist.Bernoulli(bias[c]), obs=y)

    y = np.array([1, 0, 1, 1, 0, 1, 1, 1], float)
    w = np.array([0.5, 2.0, 1.5, 0.1, 3.0, 1.0, 0.25, 2.0])
    prior, bias = np.array([0.5, 0.5]), np.array([0.3, 0.6])
    log_joint = np.log(prior) + (w[:, None] * (y[:, None] * np.log(bias)
                                              + (1 - y[:, None]) * np.log1p(-bias))).sum(0)
    estep = EM(coin, progress_bar=False).e_step(dict(prior=prior, bias=bias), y, w)
    np.testing.assert_allclose(estep.log_likelihood, logsumexp(log_joint), rtol=1e-12)
    np.testing.assert_allclose(estep.posterior["c"], np.exp(log_joint - logsumexp(log_joint)),
                               atol=1e-12)


def hmm(ys, w):
    """Categorical HMM over a plate of sequences (time along axis 0 of ``ys``)."""
    init = numpyro.param("init", jnp.array([0.6, 0.4]), constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.array([[0.7, 0.3], [0.2, 0.8]]),
                          constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]]),
                         constraint=constraints.simplex)
    def weighted_sequences():  # the plate sits inside scan's body (NumPyro's rule)
        return numpyro.plate("sequences", ys.shape[1]), numpyro.handlers.scale(scale=w)

    plate, scale = weighted_sequences()
    with plate, scale:
        z0 = numpyro.sample("z0", dist.Categorical(init))
        numpyro.sample("y0", dist.Categorical(emit[z0]), obs=ys[0])

    def step(z_prev, y):
        plate, scale = weighted_sequences()
        with plate, scale:
            z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
            numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    scan(step, z0, ys[1:])


def test_weighted_sequences_equal_repeated_sequences():
    rng = np.random.default_rng(0)
    ys = rng.integers(0, 3, size=(6, 4))
    w = np.array([2.0, 1.0, 1.0, 3.0])
    weighted = fit(hmm, ys, w)
    ys_rep = np.repeat(ys, w.astype(int), axis=1)
    repeated = fit(hmm, ys_rep, np.ones(ys_rep.shape[1]))
    np.testing.assert_allclose(weighted.log_likelihood, repeated.log_likelihood, rtol=1e-10)
    for k in ("init", "trans", "emit"):
        np.testing.assert_allclose(weighted.params[k], repeated.params[k], atol=1e-6)


def test_weights_on_part_of_a_plate_are_refused():
    def partly(x, w):
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            with numpyro.handlers.scale(scale=w):
                numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    with pytest.raises(ValueError, match="'z' lies in plate 'data'.*'x'"):
        fit(partly, X, W)


def test_one_number_scaling_an_enumerated_factor_is_refused():
    def scaled(x):
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
        with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=2.0):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    with pytest.raises(NotImplementedError, match="'z' is scaled.*one number"):
        fit(scaled, X)


def test_weights_on_a_single_row_are_refused_by_name():
    """A data set of one weighted row: NumPyro gives the plate no dim, so the weight would
    reach the factor as one number; refused with a message that says why."""
    with pytest.raises(NotImplementedError, match="plate of one element"):
        fit(mixture, X[:1], W[:1])
