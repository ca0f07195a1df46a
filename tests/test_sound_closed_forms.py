"""Closed forms chosen soundly: valid at every θ, not only at the start (issue 12, defect 1).

A location ``mu[k] + beta * x`` is a selection of ``mu`` only while ``beta`` is 0; a closed form
chosen at such a start stayed wrong for the whole fit. Each case is compared with the fit from a
start where the other term is non-zero and with the numeric M-step (``closed_form=False``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from bayes_em import EM, LBFGS
from bayes_em.dependence import dependence

PRECISE = LBFGS(max_steps=500, gtol=1e-12)


def fit(model, *args, init=None, **options):
    options = {"max_iter": 2000, "tol": 1e-12, "progress_bar": False, **options}
    return EM(model, init_values=init or {}, **options).run(jax.random.PRNGKey(0), *args)


# --- the dependence analysis itself ------------------------------------------------------------
def test_dependence_reads_structure_not_values():
    x, k = jnp.linspace(-1, 1, 3), jnp.array([0, 1, 1])

    def f(g):
        mu, beta = g["mu"], g["beta"]
        return {
            "selection": mu[k],
            "plus_zero_term": mu[k] + beta * x,  # beta is 0 below: still a dependence
            "where_on_data": jnp.where(x > 0, mu[k], 0.0),
            "broadcast": jnp.broadcast_to(mu[:, None], (2, 3)),
            "scaled": 2.0 * mu,
            "clipped": jnp.maximum(mu, 0.0),
            "where_on_param": jnp.where(mu > 0, mu, beta),
            "scan_stack": jax.lax.scan(lambda c, _: (c, c), mu, x)[1],
            "scan_product": jax.lax.scan(lambda c, xi: (c, c * xi), mu, x)[1],
            "constant": x * 2.0,
        }

    d = dependence(f, {"mu": jnp.ones(2), "beta": jnp.zeros(())})
    mu, beta = 1, 2  # bits in the order of the groups
    assert d["selection"] == (mu, mu)
    assert d["plus_zero_term"] == (mu | beta, 0)
    assert d["where_on_data"] == (mu, mu)
    assert d["broadcast"] == (mu, mu)
    assert d["scaled"] == (mu, 0) and d["clipped"] == (mu, 0)
    assert d["where_on_param"] == (mu | beta, beta)
    assert d["scan_stack"] == (mu, mu) and d["scan_product"] == (mu, 0)
    assert d["constant"] == (0, 0)


# --- a regression slope started at 0 ------------------------------------------------------------
def switching_regression(x, y):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    beta = numpyro.param("beta", 0.0)
    sd = numpyro.param("sd", 1.0, constraint=constraints.positive)
    with numpyro.plate("n", x.shape[0]):
        k = numpyro.sample("k", dist.Categorical(w))
        numpyro.sample("y", dist.Normal(mu[k] + beta * x, sd), obs=y)


def regression_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = np.array([-4.0, 4.0])[rng.integers(0, 2, n)] + 2.0 * x + 0.5 * rng.normal(size=n)
    return x, y


def test_slope_started_at_zero_matches_other_starts():
    x, y = regression_data()
    at_zero = fit(switching_regression, x, y)
    at_point_one = fit(switching_regression, x, y, init={"beta": 0.1})
    numeric = fit(switching_regression, x, y, closed_form=False, mstep=PRECISE)
    assert at_zero.mstep_paths["mu"] == "numeric"
    assert "'beta'" in at_zero.mstep_paths(explain=True)["mu"], at_zero.mstep_paths(explain=True)
    np.testing.assert_allclose(at_zero.log_likelihood, at_point_one.log_likelihood, rtol=1e-6)
    np.testing.assert_allclose(at_zero.log_likelihood, numeric.log_likelihood, rtol=1e-6)
    np.testing.assert_allclose(at_zero.params["beta"], 2.0, atol=0.1)  # the slope is found
    assert at_zero.log_likelihood > -500  # the wrong fit of the bug sat at about -847


# --- Markov-switching AR(1): coefficient started at 0 -------------------------------------------
def switching_ar(y):
    init = numpyro.param("init", jnp.ones(2) / 2, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.array([[0.9, 0.1], [0.1, 0.9]]),
                          constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-0.5, 0.5]))
    phi = numpyro.param("phi", 0.0)
    sd = numpyro.param("sd", 1.0, constraint=constraints.positive)

    def step(z_prev, ys):
        y_prev, y_t = ys
        z = numpyro.sample("z", dist.Categorical(jnp.where(z_prev < 0, init, trans[z_prev])))
        numpyro.sample("y", dist.Normal(mu[z] + phi * y_prev, sd), obs=y_t)
        return z, None

    scan(step, -1, (jnp.concatenate([jnp.zeros(1), y[:-1]]), y))


def test_autoregressive_coefficient_started_at_zero():
    rng = np.random.default_rng(1)
    T, z, y = 200, 0, [0.0]
    for _ in range(T):
        z = z if rng.uniform() < 0.95 else 1 - z
        y.append([-2.0, 2.0][z] + 0.6 * y[-1] + 0.3 * rng.normal())
    y = np.asarray(y[1:])
    at_zero = fit(switching_ar, y)
    at_half = fit(switching_ar, y, init={"phi": 0.5})
    assert at_zero.mstep_paths["mu"] == "numeric"
    assert at_zero.mstep_paths["trans"].startswith("closed-form categorical")
    np.testing.assert_allclose(at_zero.log_likelihood, at_half.log_likelihood, rtol=1e-6)
    np.testing.assert_allclose(at_zero.params["phi"], 0.6, atol=0.05)


# --- factorial mean mu1[a] + mu2[b] ---------------------------------------------------------------
def factorial(y):
    wa = numpyro.param("wa", jnp.ones(2) / 2, constraint=constraints.simplex)
    wb = numpyro.param("wb", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu1 = numpyro.param("mu1", jnp.array([-1.0, 1.0]))
    mu2 = numpyro.param("mu2", jnp.zeros(2))  # zero at the start: mu1 looks like a selection
    with numpyro.plate("n", y.shape[0]):
        a = numpyro.sample("a", dist.Categorical(wa))
        b = numpyro.sample("b", dist.Categorical(wb))
        numpyro.sample("y", dist.Normal(mu1[a] + mu2[b], 0.5), obs=y)


@pytest.mark.filterwarnings("ignore::bayes_em.ConvergenceWarning")
def test_factorial_mean_matches_numeric_path():
    rng = np.random.default_rng(2)
    n = 400
    y = (np.array([-3.0, 3.0])[rng.integers(0, 2, n)] + np.array([0.0, 1.5])[rng.integers(0, 2, n)]
         + 0.5 * rng.normal(size=n))
    default = fit(factorial, y)
    numeric = fit(factorial, y, closed_form=False, mstep=PRECISE)
    assert default.mstep_paths["mu1"] == default.mstep_paths["mu2"] == "numeric"
    np.testing.assert_allclose(default.objective, numeric.objective, rtol=1e-6)
    assert default.status == "saddle"  # mu2 starts symmetric (0, 0): b's values are alike


# --- a random effect started at its prior mean (the engine's own default start) -----------------
def random_effect(g, y):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    with numpyro.plate("groups", 3):
        u = numpyro.sample("u", dist.Normal(0.0, 2.0))  # MAP, started at its mean 0
    with numpyro.plate("n", y.shape[0]):
        k = numpyro.sample("k", dist.Categorical(w))
        numpyro.sample("y", dist.Normal(mu[k] + u[g], 0.5), obs=y)


def test_random_effect_at_prior_mean_matches_numeric_path():
    rng = np.random.default_rng(3)
    n = 300
    g = rng.integers(0, 3, n)
    y = (np.array([-3.0, 3.0])[rng.integers(0, 2, n)] + np.array([-1.0, 0.0, 1.5])[g]
         + 0.5 * rng.normal(size=n))
    default = fit(random_effect, g, y)
    numeric = fit(random_effect, g, y, closed_form=False, mstep=PRECISE)
    assert default.mstep_paths["mu"] == default.mstep_paths["u"] == "numeric"
    np.testing.assert_allclose(default.objective, numeric.objective, rtol=1e-6)
    # a sum of two selections is not identified up to a shift: compare fitted locations
    np.testing.assert_allclose(np.sort(default.params["mu"])[:, None] + default.params["u"],
                               np.sort(numeric.params["mu"])[:, None] + numeric.params["u"],
                               atol=1e-4)


# --- the runtime guard ----------------------------------------------------------------------------
def test_guard_rejects_a_wrong_closed_form_and_recovers(monkeypatch):
    """A plan that detection would never make (mu's closed form although loc = mu[k] + beta x),
    forced in: the guard sees Q fall, warns, and the numeric M-step finds the optimum."""
    import bayes_em.conjugate as conjugate
    from bayes_em import ClosedFormWarning

    sound = conjugate.detect_closed_forms

    def unsound(problem, params, args, kwargs):
        plans, refused = sound(problem, params, args, kwargs)
        return plans + (conjugate.ClosedForm("mu", ("y",), "normal_loc", None),), refused

    x, y = regression_data()
    reference = fit(switching_regression, x, y, closed_form=False, mstep=PRECISE)
    monkeypatch.setattr(conjugate, "detect_closed_forms", unsound)
    with pytest.warns(ClosedFormWarning, match="lowered the objective"):
        guarded = fit(switching_regression, x, y)
    assert guarded.mstep_paths["mu"] == "closed-form normal_loc"  # the unsound plan ran
    assert guarded.n_fallbacks[0] > 0 and guarded.status == "converged"
    assert not guarded.n_decreases.any()
    np.testing.assert_allclose(guarded.log_likelihood, reference.log_likelihood, rtol=1e-6)
