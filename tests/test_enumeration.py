"""log p(X|θ) and every posterior marginal against an explicit sum over all configurations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import norm

from bayes_em import EM


def chained(x):
    """A global latent g, and per point a, b | a, c."""
    pg = numpyro.param("pg", 0.3, constraint=constraints.unit_interval)
    pa = numpyro.param("pa", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    pb = numpyro.param("pb", jnp.ones((2, 3)) / 3, constraint=constraints.simplex)
    pc = numpyro.param("pc", 0.5, constraint=constraints.unit_interval)
    loc = numpyro.param("loc", jnp.zeros((2, 3)))
    g = numpyro.sample("g", dist.Bernoulli(pg))
    with numpyro.plate("data", x.shape[0]):
        a = numpyro.sample("a", dist.Categorical(pa))
        b = numpyro.sample("b", dist.Categorical(pb[a]))
        c = numpyro.sample("c", dist.Bernoulli(pc))
        numpyro.sample("x", dist.Normal(loc[a, b] + 2.0 * c - g, 1.0), obs=x)


def random_chained_params(rng):
    return dict(
        pg=rng.uniform(0.1, 0.9),
        pa=rng.dirichlet(np.ones(2)),
        pb=rng.dirichlet(np.ones(3), size=2),
        pc=rng.uniform(0.1, 0.9),
        loc=rng.normal(size=(2, 3)),
    )


def brute_force_chained(x, p):
    n = len(x)
    configs, logps = [], []
    for g in range(2):
        per_point = list(itertools.product(range(2), range(3), range(2)))
        for assignment in itertools.product(per_point, repeat=n):
            lp = np.log(p["pg"] if g else 1 - p["pg"])
            for xi, (a, b, c) in zip(x, assignment):
                lp += np.log(p["pa"][a]) + np.log(p["pb"][a, b])
                lp += np.log(p["pc"] if c else 1 - p["pc"])
                lp += norm.logpdf(xi, p["loc"][a, b] + 2.0 * c - g, 1.0)
            configs.append((g, assignment))
            logps.append(lp)
    logps = np.array(logps)
    log_z = logsumexp(logps)
    post = np.exp(logps - log_z)
    marg = {"g": np.zeros(2), "a": np.zeros((n, 2)), "b": np.zeros((n, 3)), "c": np.zeros((n, 2))}
    for (g, assignment), pr in zip(configs, post):
        marg["g"][g] += pr
        for i, (a, b, c) in enumerate(assignment):
            marg["a"][i, a] += pr
            marg["b"][i, b] += pr
            marg["c"][i, c] += pr
    best_g, best_assignment = configs[int(np.argmax(logps))]
    mode = {
        "g": best_g,
        "a": np.array([t[0] for t in best_assignment]),
        "b": np.array([t[1] for t in best_assignment]),
        "c": np.array([t[2] for t in best_assignment]),
    }
    return log_z, marg, mode


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_chained_latents_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=4) * 2
    params = random_chained_params(rng)
    estep = EM(chained, progress_bar=False).e_step(params, jnp.asarray(x))
    log_z, marg, mode = brute_force_chained(x, params)
    np.testing.assert_allclose(estep.log_likelihood, log_z, rtol=1e-10)
    assert estep.log_prior == 0.0
    for site in marg:
        np.testing.assert_allclose(estep.posterior[site], marg[site], atol=1e-10)
        np.testing.assert_array_equal(estep.most_probable[site], mode[site])


def nested(x):
    """A latent per group (outer plate) and a latent per item that depends on it (inner plate)."""
    ph = numpyro.param("ph", 0.4, constraint=constraints.unit_interval)
    py = numpyro.param("py", jnp.ones((2, 3)) / 3, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros(3))
    with numpyro.plate("groups", x.shape[0], dim=-2):
        h = numpyro.sample("h", dist.Bernoulli(ph))
        with numpyro.plate("items", x.shape[1], dim=-1):
            y = numpyro.sample("y", dist.Categorical(py[h]))
            numpyro.sample("x", dist.Normal(loc[y] + h, 1.0), obs=x)


def test_nested_plates_match_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3))
    p = dict(ph=0.35, py=rng.dirichlet(np.ones(3), size=2), loc=rng.normal(size=3))
    estep = EM(nested, progress_bar=False).e_step(p, jnp.asarray(x))
    logps, configs = [], []
    for h in itertools.product(range(2), repeat=2):
        for y in itertools.product(range(3), repeat=6):
            y = np.array(y).reshape(2, 3)
            lp = sum(np.log(p["ph"] if h[g] else 1 - p["ph"]) for g in range(2))
            for g in range(2):
                for i in range(3):
                    lp += np.log(p["py"][h[g], y[g, i]])
                    lp += norm.logpdf(x[g, i], p["loc"][y[g, i]] + h[g], 1.0)
            logps.append(lp)
            configs.append((h, y))
    logps = np.array(logps)
    post = np.exp(logps - logsumexp(logps))
    mh, my = np.zeros((2, 2)), np.zeros((2, 3, 3))
    for (h, y), pr in zip(configs, post):
        for g in range(2):
            mh[g, h[g]] += pr
            for i in range(3):
                my[g, i, y[g, i]] += pr
    np.testing.assert_allclose(estep.log_likelihood, logsumexp(logps), rtol=1e-10)
    np.testing.assert_allclose(estep.posterior["h"], mh, atol=1e-10)
    np.testing.assert_allclose(estep.posterior["y"], my, atol=1e-10)


@pytest.mark.parametrize("model,shape", [(chained, (5,)), (nested, (3, 4))])
def test_em_on_small_models_never_decreases(model, shape):
    x = jnp.asarray(np.random.default_rng(4).normal(size=shape) * 2)
    result = EM(model, restarts=3, max_iter=30, tol=0.0, progress_bar=False, strict=True).run(
        jax.random.PRNGKey(1), x
    )
    for r in range(3):
        obj = result.trace(r)["objective"]
        assert np.all(np.isfinite(obj))
        assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())
    assert result.restart_objective[result.best_restart] == result.restart_objective.max()


def test_most_probable_with_large_negative_log_factors():
    """A finite stand-in for log 0 (−1e30) must not coarsen the max-product's exact sums."""

    def model(x, impossible):
        loc = numpyro.param("loc", jnp.array([0.0, 5.0, 9.0]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(logits=jnp.array([0.0, 0.0, impossible])))
            numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    x = jnp.array([0.1, 4.9, 0.2, 5.1])
    estep = EM(model, progress_bar=False).e_step({}, x, -1e30)
    np.testing.assert_array_equal(estep.most_probable["z"], [0, 1, 0, 1])
    np.testing.assert_array_equal(np.argmax(estep.posterior["z"], -1), [0, 1, 0, 1])


def hmm_with_zeros(ys):
    init = numpyro.param("init", jnp.ones(4) / 4, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((4, 4)) / 4, constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.ones((4, 2)) / 2, constraint=constraints.simplex)

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    z0 = numpyro.sample("z0", dist.Categorical(init))
    numpyro.contrib.control_flow.scan(step, z0, ys)


def brute_force_hmm(ys, p):
    """log Z and the marginals of z0 and z_1..z_T by summing over all K^(T+1) paths."""
    K, T = len(p["init"]), len(ys)
    with np.errstate(divide="ignore"):
        li, lt, le = np.log(p["init"]), np.log(p["trans"]), np.log(p["emit"])
    paths = np.array(list(itertools.product(range(K), repeat=T + 1)))
    lp = li[paths[:, 0]] + sum(lt[paths[:, t], paths[:, t + 1]] + le[paths[:, t + 1], ys[t]]
                               for t in range(T))
    log_z = logsumexp(lp)
    w = np.exp(lp - log_z)
    marg = np.stack([np.bincount(paths[:, t], weights=w, minlength=K) for t in range(T + 1)])
    return log_z, marg[0], marg[1:]


@pytest.mark.parametrize("ys", [[0, 1, 1, 1, 1, 1], [1, 0], [0]])
def test_chain_with_unreachable_states_matches_brute_force(ys):
    """Zero transitions and an initial probability 0 make states unreachable: the marginals are
    exact zeros there, never NaN (log's derivative at an underflowed 0 once poisoned them all)."""
    jax.config.update("jax_enable_x64", True)
    params = dict(init=np.array([0.0, 3e-14, 1.0, 0.0]),
                  trans=np.array([[0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]]),
                  emit=np.array([[1, 0], [1 / 6, 5 / 6], [1, 0], [0, 1.0]]))
    ys = np.asarray(ys)
    estep = EM(hmm_with_zeros, progress_bar=False).e_step(params, jnp.asarray(ys))
    log_z, m0, m = brute_force_hmm(ys, params)
    np.testing.assert_allclose(estep.log_likelihood, log_z, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(estep.posterior["z0"], m0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(estep.posterior["z"]).reshape(m.shape), m, atol=1e-12)
