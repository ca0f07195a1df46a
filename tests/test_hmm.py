"""Hidden Markov models through the generic engine (Baum-Welch = EM on a ``scan`` model).

Every fit is checked against an independent reference: hmmlearn (fitted from the same initial
parameters for the same number of iterations), or a numpy loop written here. Parameters without
a closed-form update take the numeric M-step, run here to full precision
(``LBFGS(max_steps=1000, gtol=1e-13)``), so that each EM iteration is the exact Baum-Welch update.

hmmlearn's ``startprob_`` is the distribution of the state that emits the FIRST observation, so
the models below draw ``z0 ~ Categorical(init)``, let it emit ``ys[0]``, and scan over ``ys[1:]``.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import markov
from numpyro.distributions import constraints
from scipy.stats import dirichlet, invgamma, norm, poisson

from bayes_em import EM, LBFGS, ModelError

hl = pytest.importorskip("hmmlearn.hmm")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
EXACT = LBFGS(max_steps=1000, gtol=1e-13)  # a fully maximised numeric M-step


def em(model, n_iter, init_values, **kw):
    return EM(model, max_iter=n_iter, tol=0.0, init_values=init_values, mstep=EXACT,
              progress_bar=False, **kw)


def assert_ascent(result):
    obj = result.trace()["objective"]
    assert np.all(np.isfinite(obj))
    assert np.all(np.diff(obj) >= -1e-12 * np.abs(obj).max()), np.diff(obj)


def assert_params(result, expected, atol=1e-6):
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(result.params[name]), value, atol=atol, err_msg=name)


# -- models ----------------------------------------------------------------------------------------


def categorical_hmm(ys, K, V):
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.ones((K, V)) / V, constraint=constraints.simplex)
    z0 = numpyro.sample("z0", dist.Categorical(init))
    numpyro.sample("y0", dist.Categorical(emit[z0]), obs=ys[0])

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    scan(step, z0, ys[1:])


def gaussian_hmm(ys, K, covariance_type, var_prior=None):
    """Gaussian emissions: diagonal or full covariance; ``var_prior=(a, b)`` puts an
    InverseGamma(a, b) prior on every diagonal variance and Dirichlet(2) priors on ``init`` and
    the transition rows (MAP), else everything is maximum likelihood."""
    D = ys.shape[-1]
    if var_prior is None:
        init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
        trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    else:
        init = numpyro.sample("init", dist.Dirichlet(jnp.full(K, 2.0)))
        with numpyro.plate("states", K):
            trans = numpyro.sample("trans", dist.Dirichlet(jnp.full(K, 2.0)))
    means = numpyro.param("means", jnp.zeros((K, D)))
    if covariance_type == "full":
        covars = numpyro.param("covars", jnp.broadcast_to(jnp.eye(D), (K, D, D)),
                               constraint=constraints.positive_definite)

        def emission(z):
            return dist.MultivariateNormal(means[z], covariance_matrix=covars[z])
    else:
        if var_prior is None:
            covars = numpyro.param("covars", jnp.ones((K, D)), constraint=constraints.positive)
        else:
            covars = numpyro.sample("covars",
                                    dist.InverseGamma(*var_prior).expand([K, D]).to_event(2))

        def emission(z):
            return dist.Normal(means[z], jnp.sqrt(covars[z])).to_event(1)

    z0 = numpyro.sample("z0", dist.Categorical(init))
    numpyro.sample("y0", emission(z0), obs=ys[0])

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", emission(z), obs=y)
        return z, None

    scan(step, z0, ys[1:])


def padded_hmm_map(ys, mask, K, V, a_init, a_trans, a_emit):
    """Many sequences of different lengths, padded to one array ``ys`` of shape (N, T_max):
    a plate over sequences, and ``numpyro.handlers.mask`` with the per-time mask inside the scan
    step, so that one compiled program serves every set of lengths."""
    init = numpyro.sample("init", dist.Dirichlet(jnp.full(K, a_init)))
    with numpyro.plate("states", K):
        trans = numpyro.sample("trans", dist.Dirichlet(jnp.full(K, a_trans)))
        emit = numpyro.sample("emit", dist.Dirichlet(jnp.full(V, a_emit)))
    n_seq = ys.shape[0]
    with numpyro.plate("sequences", n_seq, dim=-1):
        z0 = numpyro.sample("z0", dist.Categorical(init))
        numpyro.sample("y0", dist.Categorical(emit[z0]), obs=ys[:, 0])

    def step(z_prev, y_m):
        y, m = y_m
        with numpyro.plate("sequences", n_seq, dim=-1), numpyro.handlers.mask(mask=m):
            z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
            numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    scan(step, z0, (ys[:, 1:].T, mask[:, 1:].T))


def markov_hmm(ys, K, V):
    """The same chain as ``categorical_hmm``, unrolled with ``markov`` in a Python loop."""
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.ones((K, V)) / V, constraint=constraints.simplex)
    z = numpyro.sample("z_0", dist.Categorical(init))
    numpyro.sample("y_0", dist.Categorical(emit[z]), obs=ys[0])
    for t in markov(range(1, ys.shape[0])):
        z = numpyro.sample(f"z_{t}", dist.Categorical(trans[z]))
        numpyro.sample(f"y_{t}", dist.Categorical(emit[z]), obs=ys[t])


# -- data ------------------------------------------------------------------------------------------


def sample_chain(rng, T, trans, init):
    z = np.empty(T, int)
    z[0] = rng.choice(len(init), p=init)
    for t in range(1, T):
        z[t] = rng.choice(len(init), p=trans[z[t - 1]])
    return z


def categorical_data(seed, T, K, V):
    rng = np.random.default_rng(seed)
    true_trans = 0.7 * np.eye(K) + 0.3 * rng.dirichlet(np.ones(K), size=K)
    true_emit = rng.dirichlet(0.5 * np.ones(V), size=K)
    z = sample_chain(rng, T, true_trans, np.ones(K) / K)
    ys = np.array([rng.choice(V, p=true_emit[k]) for k in z])
    start = dict(init=rng.dirichlet(5 * np.ones(K)), trans=rng.dirichlet(5 * np.ones(K), size=K),
                 emit=rng.dirichlet(5 * np.ones(V), size=K))
    return ys, start


def categorical_hmmlearn(start, n_iter, priors=(1.0, 1.0, 1.0)):
    K, V = start["emit"].shape
    m = hl.CategoricalHMM(n_components=K, n_features=V, init_params="", params="ste",
                          n_iter=n_iter, tol=-np.inf, implementation="log",
                          startprob_prior=priors[0], transmat_prior=priors[1],
                          emissionprob_prior=priors[2])
    m.startprob_, m.transmat_, m.emissionprob_ = start["init"], start["trans"], start["emit"]
    return m


def path_log_prob(ys, path, p):
    """log p(X, Z = path) of a categorical HMM (numpy)."""
    return (np.log(p["init"][path[0]]) + np.log(p["trans"][path[:-1], path[1:]]).sum()
            + np.log(p["emit"][path, ys]).sum())


# -- hmmlearn: maximum likelihood ------------------------------------------------------------------


def test_categorical_hmm_matches_hmmlearn():
    K, V, T, n_iter = 3, 4, 150, 8
    ys, start = categorical_data(0, T, K, V)
    ref = categorical_hmmlearn(start, n_iter).fit(ys[:, None])
    result = em(categorical_hmm, n_iter, start).run(jax.random.PRNGKey(0), jnp.asarray(ys),
                                                    K=K, V=V)
    # hmmlearn's monitor records log p(X | θ_t) before each of its updates t = 0 .. n_iter - 1
    np.testing.assert_allclose(result.trace()["log_likelihood"][:-1], ref.monitor_.history,
                               rtol=1e-8)
    np.testing.assert_allclose(result.log_likelihood, ref.score(ys[:, None]), rtol=1e-8)
    assert_params(result, dict(init=ref.startprob_, trans=ref.transmat_, emit=ref.emissionprob_))
    assert_ascent(result)
    np.testing.assert_allclose(result.posterior["z"], ref.predict_proba(ys[:, None])[1:],
                               atol=1e-8)
    # Viterbi: equally probable paths exist here (equal consecutive symbols), so compare scores
    ours = np.concatenate([[int(result.most_probable["z0"])], result.most_probable["z"]])
    p = dict(init=ref.startprob_, trans=ref.transmat_, emit=ref.emissionprob_)
    best_ref = ref.decode(ys[:, None], algorithm="viterbi")[0]
    np.testing.assert_allclose(path_log_prob(ys, ours, p), best_ref, rtol=1e-12)


def gaussian_data(seed, T, K, D, covariance_type):
    rng = np.random.default_rng(seed)
    true_trans = 0.8 * np.eye(K) + 0.2 * rng.dirichlet(np.ones(K), size=K)
    z = sample_chain(rng, T, true_trans, np.ones(K) / K)
    ys = rng.normal(size=(T, D)) + 2.0 * rng.normal(size=(K, D))[z]
    start = dict(init=rng.dirichlet(5 * np.ones(K)), trans=rng.dirichlet(5 * np.ones(K), size=K),
                 means=rng.normal(size=(K, D)))
    if covariance_type == "full":
        A = 0.4 * rng.normal(size=(K, D, D))
        start["covars"] = np.eye(D) + A @ A.transpose(0, 2, 1)
    else:
        start["covars"] = rng.uniform(0.5, 2.0, size=(K, D))
    return ys, start


@pytest.mark.parametrize("covariance_type", ["diag", pytest.param("full", marks=pytest.mark.slow)])
def test_gaussian_hmm_matches_hmmlearn(covariance_type):
    K, D, T, n_iter = 3, 2, 120, 6
    ys, start = gaussian_data(1, T, K, D, covariance_type)
    # covars_prior=0 turns off hmmlearn's default 0.01 added to the covariances: plain ML.
    ref = hl.GaussianHMM(n_components=K, covariance_type=covariance_type, init_params="",
                         params="stmc", n_iter=n_iter, tol=-np.inf, covars_prior=0.0,
                         implementation="log")
    ref.startprob_, ref.transmat_, ref.means_ = start["init"], start["trans"], start["means"]
    ref.covars_ = start["covars"]
    ref.fit(ys)
    result = em(gaussian_hmm, n_iter, start).run(
        jax.random.PRNGKey(0), jnp.asarray(ys), K=K, covariance_type=covariance_type)
    np.testing.assert_allclose(result.trace()["log_likelihood"][:-1], ref.monitor_.history,
                               rtol=1e-8)
    np.testing.assert_allclose(result.log_likelihood, ref.score(ys), rtol=1e-8)
    assert_params(result, dict(init=ref.startprob_, trans=ref.transmat_, means=ref.means_,
                               covars=ref._covars_))  # _covars_: (K, D) for diag, (K, D, D) full
    assert_ascent(result)


# -- hmmlearn: MAP ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_gaussian_hmm_map_matches_hmmlearn_priors():
    """Dirichlet(2) priors on ``init`` and the transition rows, InverseGamma(a, b) on each
    diagonal variance, means by ML.

    hmmlearn's Dirichlet updates max(α - 1 + n, 0), normalised, are the mode of the Dirichlet
    posterior in the simplex parametrisation, as here (no Jacobian), for α ≥ 1; for α < 1 they
    differ (hmmlearn clips at 0, the MAP is on the boundary). hmmlearn's diagonal variance
    update with means_weight=0 is (covars_prior + S) / (max(covars_weight - 1, 0) + n); the mode
    of an InverseGamma(a, b) prior times the Gaussian likelihood in σ² is (2b + S) / (2a + 2 + n):
    the same for covars_prior = 2b and covars_weight = 2a + 3.
    """
    K, D, T, n_iter, a, b = 3, 2, 120, 6, 1.5, 0.5
    ys, start = gaussian_data(2, T, K, D, "diag")
    ref = hl.GaussianHMM(n_components=K, covariance_type="diag", init_params="", params="stmc",
                         n_iter=n_iter, tol=-np.inf, startprob_prior=2.0, transmat_prior=2.0,
                         covars_prior=2 * b, covars_weight=2 * a + 3, implementation="log")
    ref.startprob_, ref.transmat_, ref.means_ = start["init"], start["trans"], start["means"]
    ref.covars_ = start["covars"]
    ref.fit(ys)
    result = em(gaussian_hmm, n_iter, start).run(
        jax.random.PRNGKey(0), jnp.asarray(ys), K=K, covariance_type="diag", var_prior=(a, b))
    np.testing.assert_allclose(result.trace()["log_likelihood"][:-1], ref.monitor_.history,
                               rtol=1e-8)
    np.testing.assert_allclose(result.log_likelihood, ref.score(ys), rtol=1e-8)
    assert_params(result, dict(init=ref.startprob_, trans=ref.transmat_, means=ref.means_,
                               covars=ref._covars_))
    log_prior = (dirichlet.logpdf(ref.startprob_, 2 * np.ones(K))
                 + sum(dirichlet.logpdf(row, 2 * np.ones(K)) for row in ref.transmat_)
                 + invgamma.logpdf(ref._covars_, a, scale=b).sum())
    np.testing.assert_allclose(result.log_prior, log_prior, rtol=1e-8)
    assert_ascent(result)


# -- many sequences: padding and a mask ------------------------------------------------------------


def padded(seqs):
    n, t_max = len(seqs), max(len(s) for s in seqs)
    ys, mask = np.zeros((n, t_max), int), np.zeros((n, t_max), bool)
    for i, s in enumerate(seqs):
        ys[i, : len(s)], mask[i, : len(s)] = s, True
    return jnp.asarray(ys), jnp.asarray(mask)


def test_padded_sequences_match_hmmlearn_lengths():
    """A batch of sequences of different lengths, padded and masked, with Dirichlet priors:
    log-likelihood = Σ of the sequences' own (hmmlearn, one by one), and the fit equals
    hmmlearn's on the concatenated sequences with ``lengths`` (MAP updates, priors α ≥ 1)."""
    K, V, n_iter = 3, 4, 6
    priors = (2.0, 1.5, 3.0)
    lengths = [30, 7, 19, 1, 24]
    ys_all, start = categorical_data(3, sum(lengths), K, V)
    seqs = np.split(ys_all, np.cumsum(lengths)[:-1])
    ys, mask = padded(seqs)
    fit = em(padded_hmm_map, n_iter, start)
    kw = dict(K=K, V=V, a_init=priors[0], a_trans=priors[1], a_emit=priors[2])

    # E-step at the start: every sequence on its own, by hmmlearn
    first = categorical_hmmlearn(start, n_iter, priors)
    estep = fit.e_step(start, ys, mask, **kw)
    np.testing.assert_allclose(estep.log_likelihood, sum(first.score(s[:, None]) for s in seqs),
                               rtol=1e-10)
    for i, s in enumerate(seqs):
        post = first.predict_proba(s[:, None])
        np.testing.assert_allclose(estep.posterior["z0"][i], post[0], atol=1e-10)
        np.testing.assert_allclose(estep.posterior["z"][: len(s) - 1, i], post[1:], atol=1e-10)
        ours = np.concatenate([[int(estep.most_probable["z0"][i])],
                               estep.most_probable["z"][: len(s) - 1, i]])
        np.testing.assert_allclose(path_log_prob(s, ours, start), first.decode(s[:, None])[0],
                                   rtol=1e-12)

    # the fit, against hmmlearn on all sequences at once
    ref = categorical_hmmlearn(start, n_iter, priors).fit(ys_all[:, None], lengths)
    result = fit.run(jax.random.PRNGKey(0), ys, mask, **kw)
    np.testing.assert_allclose(result.trace()["log_likelihood"][:-1], ref.monitor_.history,
                               rtol=1e-8)
    np.testing.assert_allclose(result.log_likelihood, ref.score(ys_all[:, None], lengths),
                               rtol=1e-8)
    assert_params(result, dict(init=ref.startprob_, trans=ref.transmat_, emit=ref.emissionprob_))
    assert_ascent(result)

    # other lengths, same padded shape: the compiled E-step is reused (no new compilation; the
    # eager trace of the model that finds its sites still re-traces its small scan)
    other = [s[: max(1, len(s) // 2)] for s in seqs]
    ys2, mask2 = padded(other)
    ys2 = jnp.pad(ys2, ((0, 0), (0, ys.shape[1] - ys2.shape[1])))
    mask2 = jnp.pad(mask2, ((0, 0), (0, mask.shape[1] - mask2.shape[1])))

    def jitted(obj):  # the jit-compiled functions that EM keeps, wherever it keeps them
        if hasattr(obj, "_cache_size"):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from jitted(v)
        elif isinstance(obj, (tuple, list)):
            for v in obj:
                yield from jitted(v)

    def compiled():
        return [f._cache_size() for f in jitted(fit._compiled)]

    before = compiled()
    estep2 = fit.e_step(start, ys2, mask2, **kw)
    assert len(before) >= 2 and compiled() == before
    np.testing.assert_allclose(estep2.log_likelihood, sum(first.score(s[:, None]) for s in other),
                               rtol=1e-10)


# -- hard EM (Viterbi training) --------------------------------------------------------------------


def gaussian_hmm_map(ys, K, prior_scale):
    """Unit-variance Gaussian emissions with Normal(0, prior_scale) priors on the means and
    Dirichlet(2) priors on ``init`` and the transition rows: every MAP update is defined even for
    a state that the path never visits."""
    init = numpyro.sample("init", dist.Dirichlet(jnp.full(K, 2.0)))
    with numpyro.plate("states", K):
        trans = numpyro.sample("trans", dist.Dirichlet(jnp.full(K, 2.0)))
        means = numpyro.sample("means", dist.Normal(0.0, prior_scale))
    z0 = numpyro.sample("z0", dist.Categorical(init))
    numpyro.sample("y0", dist.Normal(means[z0], 1.0), obs=ys[0])

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Normal(means[z], 1.0), obs=y)
        return z, None

    scan(step, z0, ys[1:])


def viterbi(log_init, log_trans, log_emit):
    """Most probable path and its log p(X, Z); ``log_emit`` is (T, K) (numpy)."""
    T, K = log_emit.shape
    score, back = log_init + log_emit[0], np.zeros((T, K), int)
    for t in range(1, T):
        s = score[:, None] + log_trans
        back[t] = s.argmax(0)
        score = s.max(0) + log_emit[t]
    path = [int(score.argmax())]
    for t in range(T - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return np.array(path[::-1]), float(score.max())


def test_hard_em_is_viterbi_training():
    """EM(hard=True) against Viterbi training written in numpy: decode the most probable path,
    then the MAP update from the counts and sums along it. Continuous observations, so the most
    probable path is unique."""
    K, T, n_iter, prior_scale = 3, 40, 5, 3.0
    rng = np.random.default_rng(4)
    z = sample_chain(rng, T, 0.8 * np.eye(K) + 0.2 / K, np.ones(K) / K)
    ys = rng.normal(size=T) + np.array([-2.0, 0.5, 3.0])[z]
    start = dict(init=rng.dirichlet(5 * np.ones(K)), trans=rng.dirichlet(5 * np.ones(K), size=K),
                 means=rng.normal(size=K))

    def log_prior(p):
        return (dirichlet.logpdf(p["init"], np.full(K, 2.0))
                + sum(dirichlet.logpdf(r, np.full(K, 2.0)) for r in p["trans"])
                + norm.logpdf(p["means"], 0.0, prior_scale).sum())

    p, objectives = dict(start), []
    for _ in range(n_iter + 1):
        log_emit = norm.logpdf(ys[:, None], p["means"][None, :], 1.0)
        path, score = viterbi(np.log(p["init"]), np.log(p["trans"]), log_emit)
        objectives.append(score + log_prior(p))
        n_trans = np.zeros((K, K))
        np.add.at(n_trans, (path[:-1], path[1:]), 1)
        n_state = np.bincount(path, minlength=K)
        sums = np.bincount(path, weights=ys, minlength=K)
        last, p = p, dict(
            init=(np.eye(K)[path[0]] + 1) / (1 + K),
            trans=(n_trans + 1) / (n_trans + 1).sum(1, keepdims=True),
            means=sums / (n_state + 1 / prior_scale**2),
        )

    result = em(gaussian_hmm_map, n_iter, start, hard=True).run(
        jax.random.PRNGKey(0), jnp.asarray(ys), K=K, prior_scale=prior_scale)
    np.testing.assert_allclose(result.trace()["objective"], objectives, rtol=1e-10)
    assert_params(result, last)
    assert_ascent(result)
    assert int(result.most_probable["z0"]) == path[0]
    np.testing.assert_array_equal(result.most_probable["z"], path[1:])


def test_viterbi_path_of_poisson_hmm_on_earthquakes_matches_numpy():
    """The most probable path of the Poisson HMM of examples/poisson_hmm.py (107 years) against
    numpy's Viterbi. Regression: under jit the max-product's gradient lost its weight at some
    steps (the sums of the forward pass and of its gradient were rounded differently) and the
    decoded path fell back to state 0 there."""
    spec = importlib.util.spec_from_file_location("poisson_hmm", EXAMPLES / "poisson_hmm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    counts = example.EARTHQUAKES
    p = dict(init=np.array([0.2, 0.3, 0.5]), rates=np.array([13.1, 19.7, 29.7]),
             trans=np.array([[0.94, 0.03, 0.03], [0.04, 0.9, 0.06], [0.01, 0.19, 0.8]]))
    estep = EM(example.poisson_hmm, progress_bar=False).e_step(p, jnp.asarray(counts, float), K=3)
    path, score = viterbi(np.log(p["init"]), np.log(p["trans"]),
                          poisson.logpmf(counts[:, None], p["rates"][None, :]))
    assert int(estep.most_probable["z0"]) == path[0]
    np.testing.assert_array_equal(estep.most_probable["z"], path[1:])


# -- markov in a Python loop -----------------------------------------------------------------------


def test_markov_loop_matches_hmmlearn():
    """The chain unrolled with ``markov`` in a Python loop (the ``scan`` form of the same chain is
    checked against hmmlearn above): log-likelihood, state marginals and the Viterbi path."""
    K, V, T = 3, 4, 6
    ys, start = categorical_data(5, T, K, V)
    by_markov = EM(markov_hmm, progress_bar=False).e_step(start, jnp.asarray(ys), K=K, V=V)
    ref = categorical_hmmlearn(start, 1)
    np.testing.assert_allclose(by_markov.log_likelihood, ref.score(ys[:, None]), rtol=1e-10)
    post = np.stack([by_markov.posterior[f"z_{t}"] for t in range(T)])
    np.testing.assert_allclose(post, ref.predict_proba(ys[:, None]), atol=1e-10)
    path = np.array([by_markov.most_probable[f"z_{t}"] for t in range(T)])
    np.testing.assert_allclose(path_log_prob(ys, path, start), ref.decode(ys[:, None])[0],
                               rtol=1e-12)


# -- errors ----------------------------------------------------------------------------------------


def test_param_inside_scan_body_is_a_model_error():
    def model(ys, K=2, V=3):
        init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
        trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)

        def step(z_prev, y):
            emit = numpyro.param("emit", jnp.ones((K, V)) / V, constraint=constraints.simplex)
            z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
            numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
            return z, None

        scan(step, numpyro.sample("z0", dist.Categorical(init)), ys)

    with pytest.raises(ModelError, match="'emit'.*scan"):
        EM(model, progress_bar=False).run(jax.random.PRNGKey(0), jnp.zeros(5, int))
