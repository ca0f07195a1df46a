"""Three coins (Li Hang, Statistical Learning Methods, Example 9.1) against the textbook updates."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

from bayes_em import EM

Y = np.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=float)


def three_coins(y):
    pi = numpyro.param("pi", 0.5, constraint=constraints.unit_interval)
    p = numpyro.param("p", 0.5, constraint=constraints.unit_interval)
    q = numpyro.param("q", 0.5, constraint=constraints.unit_interval)
    with numpyro.plate("tosses", y.shape[0]):
        a = numpyro.sample("a", dist.Bernoulli(pi))
        numpyro.sample("y", dist.Bernoulli(jnp.where(a == 1, p, q)), obs=y)


def textbook_step(pi, p, q, y):
    """One EM iteration written out as in the textbook."""
    b = pi * p**y * (1 - p) ** (1 - y)
    c = (1 - pi) * q**y * (1 - q) ** (1 - y)
    mu = b / (b + c)
    return mu.mean(), (mu * y).sum() / mu.sum(), ((1 - mu) * y).sum() / (1 - mu).sum()


def assert_monotone(result):
    for r in range(result.n_restarts):
        obj = result.trace(r)["objective"]
        assert np.all(np.diff(obj) >= -1e-12 * np.abs(obj[:-1]).max()), obj
    assert not result.n_decreases.any()


def test_from_half_stops_at_textbook_fixed_point():
    result = EM(three_coins, max_iter=50, tol=1e-10, progress_bar=False).run(
        jax.random.PRNGKey(0), Y
    )
    assert result.converged
    np.testing.assert_allclose(result.params["pi"], 0.5, atol=1e-8)
    np.testing.assert_allclose(result.params["p"], 0.6, atol=1e-8)
    np.testing.assert_allclose(result.params["q"], 0.6, atol=1e-8)
    # the first iteration lands on the fixed point; the second confirms it
    assert result.n_iter <= 2
    np.testing.assert_allclose(result.log_likelihood, 10 * np.log(0.6**0.6 * 0.4**0.4), rtol=1e-12)
    assert_monotone(result)


@pytest.mark.parametrize("start", [(0.4, 0.6, 0.7), (0.3, 0.2, 0.9), (0.46, 0.55, 0.67)])
def test_every_iteration_equals_textbook_updates(start):
    pi, p, q = start
    n_iter = 6
    em = EM(
        three_coins,
        max_iter=n_iter,
        tol=0.0,
        init_values=dict(pi=pi, p=p, q=q),
        progress_bar=False,
    )
    result = em.run(jax.random.PRNGKey(0), Y)
    assert result.n_iter == n_iter and result.status == "max_iter"
    expected = [(pi, p, q)]
    for _ in range(n_iter):
        expected.append(textbook_step(*expected[-1], Y))
    # the final parameters equal the textbook's after n_iter iterations
    np.testing.assert_allclose(
        [result.params[k] for k in ("pi", "p", "q")], expected[-1], atol=1e-7
    )
    # and each recorded log-likelihood equals the one at the textbook's iterate
    def loglik(pi, p, q):
        return np.log(pi * p**Y * (1 - p) ** (1 - Y) + (1 - pi) * q**Y * (1 - q) ** (1 - Y)).sum()

    np.testing.assert_allclose(
        result.trace()["log_likelihood"], [loglik(*e) for e in expected], rtol=1e-10
    )
    assert_monotone(result)


def test_li_hang_first_iteration_numbers():
    """Li Hang prints π=0.4064, p=0.5368, q=0.6432 after one iteration from (0.4, 0.6, 0.7)."""
    em = EM(three_coins, max_iter=1, tol=0.0, init_values=dict(pi=0.4, p=0.6, q=0.7),
            progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), Y)
    np.testing.assert_allclose(
        [result.params[k] for k in ("pi", "p", "q")], [0.4064, 0.5368, 0.6432], atol=5e-5
    )


def test_fixed_parameter_follows_textbook_updates_of_the_rest():
    """π held at 0.4: p and q follow the textbook M-step with π fixed."""
    em = EM(three_coins, max_iter=4, tol=0.0, fixed=dict(pi=0.4),
            init_values=dict(p=0.6, q=0.7), progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), Y)
    assert "pi" not in result.params
    p, q = 0.6, 0.7
    for _ in range(4):
        _, p, q = textbook_step(0.4, p, q, Y)
    np.testing.assert_allclose([result.params["p"], result.params["q"]], [p, q], atol=1e-8)


def test_recorded_parameters_are_the_textbook_iterates():
    em = EM(three_coins, max_iter=3, tol=0.0, init_values=dict(pi=0.4, p=0.6, q=0.7),
            record_params=True, progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), Y)
    expected = [(0.4, 0.6, 0.7)]
    for _ in range(3):
        expected.append(textbook_step(*expected[-1], Y))
    got = np.stack([result.trace()["params"][k] for k in ("pi", "p", "q")], 1)
    np.testing.assert_allclose(got, expected, atol=1e-8)
    from bayes_em.inference_data import _trace_dataset
    ds = _trace_dataset(result)
    np.testing.assert_allclose(ds["param_p"].values[0], np.array(expected)[:, 1], atol=1e-8)
