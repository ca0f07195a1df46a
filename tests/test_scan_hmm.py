"""A scan HMM through the generic engine, against an explicit sum over all K^T paths."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp
from shared_models import categorical_hmm as hmm

from bayes_em import EM


def test_scan_hmm_matches_brute_force():
    rng = np.random.default_rng(0)
    K, V, T = 3, 4, 5
    ys = rng.integers(V, size=T)
    p = dict(init=rng.dirichlet(np.ones(K)), trans=rng.dirichlet(np.ones(K), size=K),
             emit=rng.dirichlet(np.ones(V), size=K))
    estep = EM(hmm, progress_bar=False).e_step(p, jnp.asarray(ys), K=K, V=V)
    logps, paths = [], list(itertools.product(range(K), repeat=T + 1))
    for path in paths:  # path[0] is z0, path[t] emits ys[t-1]
        lp = np.log(p["init"][path[0]])
        for t in range(1, T + 1):
            lp += np.log(p["trans"][path[t - 1], path[t]]) + np.log(p["emit"][path[t], ys[t - 1]])
        logps.append(lp)
    logps = np.array(logps)
    post = np.exp(logps - logsumexp(logps))
    marg = np.zeros((T + 1, K))
    for path, pr in zip(paths, post):
        marg[np.arange(T + 1), path] += pr
    np.testing.assert_allclose(estep.log_likelihood, logsumexp(logps), rtol=1e-10)
    np.testing.assert_allclose(estep.posterior["z0"], marg[0], atol=1e-10)
    np.testing.assert_allclose(estep.posterior["z"], marg[1:], atol=1e-10)
    best = paths[int(np.argmax(logps))]
    assert int(estep.most_probable["z0"]) == best[0]
    np.testing.assert_array_equal(estep.most_probable["z"], best[1:])


def test_scan_hmm_fit_never_decreases():
    ys = jnp.asarray(np.random.default_rng(1).integers(3, size=60))
    result = EM(hmm, restarts=3, max_iter=40, tol=0.0, progress_bar=False, strict=True).run(
        jax.random.PRNGKey(0), ys, K=2, V=3)
    for r in range(3):
        obj = result.trace(r)["objective"]
        assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())
    assert result.posterior["z"].shape == (60, 2)


def test_scan_hmm_most_probable_path_with_ties():
    """Equal consecutive observations make equally probable paths (a→b→a→a and a→a→b→a use the
    same factors); the path returned must still be one of the brute-force optima, not a splice
    of several."""
    K, V = 2, 2
    ys = np.array([0, 1, 0, 0, 0, 0])
    T = len(ys)
    p = dict(init=np.array([0.12, 0.88]), trans=np.array([[0.4, 0.6], [0.7, 0.3]]),
             emit=np.array([[0.24, 0.76], [0.64, 0.36]]))
    paths = list(itertools.product(range(K), repeat=T + 1))
    logps = np.array([
        np.log(p["init"][z[0]]) + sum(np.log(p["trans"][z[t - 1], z[t]])
                                      + np.log(p["emit"][z[t], ys[t - 1]])
                                      for t in range(1, T + 1))
        for z in paths
    ])
    optima = {paths[i] for i in np.flatnonzero(np.isclose(logps, logps.max(), rtol=0, atol=1e-12))}
    assert len(optima) > 1  # the case under test
    estep = EM(hmm, progress_bar=False).e_step(p, jnp.asarray(ys), K=K, V=V)
    path = (int(estep.most_probable["z0"]), *map(int, estep.most_probable["z"]))
    assert path in optima
