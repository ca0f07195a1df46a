"""Viterbi with back-pointers (issue 17): the max-product of a Markov chain records its argmax at
every step, and its gradient is the indicator of ONE optimal path, found by backtracking.

Independent oracles: brute force over all K^T paths (ties constructed on purpose: integer
log-factors, symmetric parameters, repeated equal observations, exact-zero transitions) and
hmmlearn's ``decode(algorithm="viterbi")`` with the same parameters.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from shared_models import categorical_hmm

from bayes_em import EM, models
from bayes_em.estep import backpointers_suffice, e_step, max_product_factors
from bayes_em.fit import Options, build
from bayes_em.problem import factors
from bayes_em.viterbi import max_first, viterbi_scan

jax.config.update("jax_enable_x64", True)


# -- the recursion on its own ----------------------------------------------------------------------


def brute_force(a0, const, m):
    """{path: score} over all paths z_0..z_T of a0(z_0) + Σ_t const(z_t, z_t+1) + m_t(z_t, z_t+1)
    (size-1 dims broadcast)."""
    T, K = m.shape[0], a0.shape[-1]
    c = np.broadcast_to(const, (K, K))
    mm = np.broadcast_to(m, (T, K, K))
    return {z: a0[z[0]] + sum(c[z[t], z[t + 1]] + mm[t, z[t], z[t + 1]] for t in range(T))
            for z in itertools.product(range(K), repeat=T + 1)}


def path_of(grad_a0, grad_m, grad_const, T, K):
    """The path encoded by the gradients, checked to be one-hot everywhere."""
    assert np.sort(grad_a0)[-1] == 1 and np.count_nonzero(grad_a0) == 1
    z = [int(np.argmax(grad_a0))]
    for t in range(T):
        g = np.broadcast_to(grad_m[t], (K, K)) if grad_m[t].shape == (K, K) else None
        if g is not None:
            assert np.count_nonzero(g) == 1 and g.sum() == 1
            i, j = np.unravel_index(np.argmax(g), g.shape)
            assert i == z[-1]
            z.append(int(j))
        else:  # emissions: a one-hot over the next state
            assert np.count_nonzero(grad_m[t]) == 1 and grad_m[t].sum() == 1
            z.append(int(np.argmax(grad_m[t])))
    counts = np.zeros((K, K))
    np.add.at(counts, (z[:-1], z[1:]), 1)
    np.testing.assert_array_equal(grad_const, counts)
    return tuple(z)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("emissions", [True, False])
def test_viterbi_scan_gradient_is_one_optimal_path(seed, emissions):
    """Integer log-factors: many tied optima. The value is the brute-force max; the gradient is
    one-hot (a0, every step) with the path's transition counts on the constant part, and the path
    it encodes is optimal; some entries are -inf (exact-zero transitions)."""
    rng = np.random.default_rng(seed)
    K, T = 3, 5
    a0 = rng.integers(-2, 1, K).astype(float)
    const = rng.integers(-2, 1, (K, K)).astype(float)
    const[rng.random((K, K)) < 0.2] = -np.inf
    const[:, 0] = np.maximum(const[:, 0], -1.0)  # every state can move somewhere
    m = rng.integers(-1, 1, (T, 1, K) if emissions else (T, K, K)).astype(float)
    scores = brute_force(a0, const, m)
    best = max(scores.values())
    optima = {z for z, s in scores.items() if s == best}

    def top(a0, const, m):
        return jnp.max(viterbi_scan(a0, const, m, T))

    value, grads = jax.jit(jax.value_and_grad(top, argnums=(0, 1, 2)))(
        jnp.asarray(a0), jnp.asarray(const), jnp.asarray(m))
    assert float(value) == best
    g_a0, g_const, g_m = map(np.asarray, grads)
    if emissions:
        g_m = g_m[:, 0, :]
    assert path_of(g_a0, g_m, g_const, T, K) in optima
    if seed == 0:
        assert len(optima) > 1  # the case under test


def test_viterbi_scan_batch_and_broadcast_dims():
    """A batch (plate) dim, shared by a0 and the emissions, broadcast on the transition: every
    batch element gets its own optimal path, weighted by its cotangent."""
    rng = np.random.default_rng(7)
    B, K, T = 4, 3, 4
    a0 = rng.integers(-2, 1, (B, K)).astype(float)
    const = rng.integers(-2, 1, (1, K, K)).astype(float)
    m = rng.integers(-1, 1, (T, B, 1, K)).astype(float)
    w = np.array([1.0, 2.0, 0.5, 3.0])

    def top(a0, const, m):
        return jnp.sum(w * jnp.max(viterbi_scan(a0, const, m, T), axis=-1))

    value, (g_a0, g_const, g_m) = jax.value_and_grad(top, argnums=(0, 1, 2))(
        jnp.asarray(a0), jnp.asarray(const), jnp.asarray(m))
    counts = np.zeros((K, K))
    total = 0.0
    for b in range(B):
        scores = brute_force(a0[b], const[0], m[:, b])
        best = max(scores.values())
        total += w[b] * best
        np.testing.assert_array_equal(np.sort(np.asarray(g_a0[b]))[-2:], [0, w[b]])
        z0 = int(np.argmax(g_a0[b]))
        z = (z0, *map(int, np.argmax(np.asarray(g_m[:, b, 0]), -1)))
        np.testing.assert_array_equal(np.asarray(g_m[:, b, 0]).sum(-1), w[b])
        assert scores[z] == best
        np.add.at(counts, (z[:-1], z[1:]), w[b])
    assert float(value) == total
    np.testing.assert_array_equal(np.asarray(g_const)[0], counts)


def test_max_first_gradient_is_first_maximiser():
    x = jnp.array([[1.0, 3.0, 3.0, 0.0], [-jnp.inf, 2.0, -1.0, 2.0]])
    g = jax.grad(lambda x: jnp.sum(jnp.array([1.0, 2.0]) * max_first(x)))(x)
    np.testing.assert_array_equal(g, [[0, 1, 0, 0], [0, 2, 0, 0]])


# -- models: brute force with ties -----------------------------------------------------------------


def all_paths(ys, p):
    """{path: log p(X, Z = path)} of ``categorical_hmm`` (z0 does not emit)."""
    K, T = len(p["init"]), len(ys)
    with np.errstate(divide="ignore"):
        li, lt, le = np.log(p["init"]), np.log(p["trans"]), np.log(p["emit"])
    return {z: li[z[0]] + sum(lt[z[t - 1], z[t]] + le[z[t], ys[t - 1]] for t in range(1, T + 1))
            for z in itertools.product(range(K), repeat=T + 1)}


TIED = [
    # symmetric states, repeated equal observations: every relabelling of a path ties
    (np.array([0, 0, 1, 1, 0, 0]), dict(init=np.array([0.5, 0.5]),
                                        trans=np.array([[0.5, 0.5], [0.5, 0.5]]),
                                        emit=np.array([[0.5, 0.5], [0.5, 0.5]]))),
    # an exact-zero transition and equal observations
    (np.array([1, 1, 1, 0, 2, 2]), dict(init=np.array([0.25, 0.25, 0.5]),
                                        trans=np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5],
                                                        [0.5, 0.0, 0.5]]),
                                        emit=np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25],
                                                       [0.25, 0.25, 0.5]]))),
    # the tie of tests/test_scan_hmm.py: a→b→a→a and a→a→b→a use the same factors
    (np.array([0, 1, 0, 0, 0, 0]), dict(init=np.array([0.12, 0.88]),
                                        trans=np.array([[0.4, 0.6], [0.7, 0.3]]),
                                        emit=np.array([[0.24, 0.76], [0.64, 0.36]]))),
]


@pytest.mark.parametrize("case", range(len(TIED)))
def test_most_probable_path_is_a_brute_force_optimum_with_ties(case):
    ys, p = TIED[case]
    K, V = p["emit"].shape
    scores = all_paths(ys, p)
    best = max(scores.values())
    optima = {z for z, s in scores.items() if np.isclose(s, best, rtol=0, atol=1e-12)}
    assert len(optima) > 1
    estep = EM(categorical_hmm, progress_bar=False).e_step(p, jnp.asarray(ys), K=K, V=V)
    path = (int(estep.most_probable["z0"]), *map(int, estep.most_probable["z"]))
    assert path in optima


@pytest.mark.parametrize("case", range(len(TIED)))
def test_hard_weights_are_one_path_with_ties(case):
    """The hard E-step's weights (vectorised trace): the transition factor's weight is the
    path's transition counts (K, K), the emissions' one-hots per step, and that path is a
    brute-force optimum whose log-density is the E-step's log Z."""
    ys, p = TIED[case]
    K, V = p["emit"].shape
    T = len(ys)
    problem, _, data = build(categorical_hmm, jnp.asarray(ys), K=K, V=V,
                             options=Options(hard=True))
    params = {k: jnp.asarray(v) for k, v in p.items()}
    assert backpointers_suffice(factors(problem, params, data, vectorized=True))
    log_z, _, w = jax.jit(lambda p, d: e_step(problem, p, d))(params, data)
    scores = all_paths(ys, p)
    best = max(scores.values())
    np.testing.assert_allclose(float(log_z), best, rtol=1e-13)
    assert w["z"].size == K * K  # counts, not one (K, K) slice per step
    counts = np.asarray(w["z"]).reshape(K, K).T  # dims (z, _PREV_z): to (prev, next)
    states = np.asarray(w["y"]).reshape(T - 1, K)  # steps 2..T of the scan (vectorised)
    assert set(np.unique(states)) <= {0.0, 1.0} and np.all(states.sum(-1) == 1)
    z1 = np.asarray(w["_PREV_y"]).reshape(K)  # the scan's first step
    z0 = np.asarray(w["z0"]).reshape(K)
    path = (int(np.argmax(z0)), int(np.argmax(z1)), *map(int, np.argmax(states, -1)))
    assert scores[path] == pytest.approx(best, abs=1e-12)
    expected = np.zeros((K, K))
    np.add.at(expected, (path[1:-1], path[2:]), 1)
    np.testing.assert_array_equal(counts, expected)


# -- a latent local to each step: the general path (tie-break pass) is kept ------------------------


def mixture_emission_hmm(ys, K, V):
    """Each state emits from a mix of two categorical distributions: a latent c_t per step,
    maximised inside the step, so back-pointers alone do not give one optimum."""
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    mix = numpyro.param("mix", jnp.ones((K, 2)) / 2, constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.ones((K, 2, V)) / V, constraint=constraints.simplex)

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        c = numpyro.sample("c", dist.Categorical(mix[z]))
        numpyro.sample("y", dist.Categorical(emit[z, c]), obs=y)
        return z, None

    z0 = numpyro.sample("z0", dist.Categorical(init))
    scan(step, z0, ys)


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow runs it
def test_step_local_latent_keeps_the_tie_break_pass():
    K, V = 2, 2
    ys = np.array([0, 0, 1, 1])
    T = len(ys)
    p = dict(init=np.array([0.5, 0.5]), trans=np.array([[0.5, 0.5], [0.5, 0.5]]),
             mix=np.array([[0.5, 0.5], [0.5, 0.5]]),
             emit=np.array([[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]))
    problem, _, data = build(mixture_emission_hmm, jnp.asarray(ys), K=K, V=V,
                             options=Options(hard=True))
    params = {k: jnp.asarray(v) for k, v in p.items()}
    assert not backpointers_suffice(factors(problem, params, data, vectorized=True))
    fs = max_product_factors(problem, params, data)
    assert fs.logs["z"].shape[0] == T - 1  # the step-by-step trace
    estep = EM(mixture_emission_hmm, progress_bar=False).e_step(p, jnp.asarray(ys), K=K, V=V)
    z = (int(estep.most_probable["z0"]), *map(int, estep.most_probable["z"]))
    c = tuple(map(int, estep.most_probable["c"]))
    assert len(z) == T + 1 and len(c) == T  # every configuration ties: any is optimal
    _, _, w = e_step(problem, params, data)
    for name in ("z", "c"):
        assert set(np.unique(np.asarray(w[name]))) <= {0.0, 1.0}


def test_mixture_keeps_the_general_path():
    x = jnp.asarray(np.r_[np.zeros(3), np.ones(3)][:, None])
    problem, params, data = build(models.kmeans, x, K=2,
                                  options=Options(hard=True))
    assert not backpointers_suffice(factors(problem, params, data, vectorized=True))


# -- hmmlearn's decode -----------------------------------------------------------------------------

hl = pytest.importorskip("hmmlearn.hmm")


def emitting_hmm(ys, K, V=None):
    """z0 emits ys[0] (hmmlearn's convention); categorical (V) or 1-D Gaussian emissions."""
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    if V is not None:
        emit = numpyro.param("emit", jnp.ones((K, V)) / V, constraint=constraints.simplex)

        def emission(z):
            return dist.Categorical(emit[z])
    else:
        loc = numpyro.param("loc", jnp.zeros(K))
        scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)

        def emission(z):
            return dist.Normal(loc[z], scale[z])

    z0 = numpyro.sample("z0", dist.Categorical(init))
    numpyro.sample("y0", emission(z0), obs=ys[0])

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", emission(z), obs=y)
        return z, None

    scan(step, z0, ys[1:])


@pytest.mark.parametrize("T", [300, 3000])
def test_categorical_path_matches_hmmlearn_decode(T):
    rng = np.random.default_rng(T)
    K, V = 4, 5
    p = dict(init=rng.dirichlet(np.ones(K)), trans=0.6 * np.eye(K) + 0.4 * rng.dirichlet(
        np.ones(K), size=K), emit=rng.dirichlet(np.ones(V), size=K))
    p["trans"][0, 1] = 0.0  # an exact-zero transition
    p["trans"] /= p["trans"].sum(1, keepdims=True)
    ys = rng.integers(V, size=T)
    ref = hl.CategoricalHMM(K, n_features=V)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = p["init"], p["trans"], p["emit"]
    logprob, path = ref.decode(ys[:, None], algorithm="viterbi")
    estep = EM(emitting_hmm, progress_bar=False).e_step(p, jnp.asarray(ys), K=K, V=V)
    ours = np.r_[int(estep.most_probable["z0"]), estep.most_probable["z"]]
    np.testing.assert_array_equal(ours, path)
    # hard EM's objective at θ_0 is the Viterbi path's log-density
    fit = EM(emitting_hmm, hard=True, max_iter=1, tol=0.0, init_values=p,
             progress_bar=False).run(jax.random.PRNGKey(0), jnp.asarray(ys), K=K, V=V)
    np.testing.assert_allclose(fit.trace()["objective"][0], logprob, rtol=1e-12)


def test_gaussian_path_matches_hmmlearn_decode():
    rng = np.random.default_rng(3)
    K, T = 3, 2000
    p = dict(init=rng.dirichlet(np.ones(K)), trans=0.8 * np.eye(K) + 0.2 * rng.dirichlet(
        np.ones(K), size=K), loc=np.array([-1.0, 0.5, 2.0]), scale=np.array([1.0, 0.7, 1.5]))
    ys = rng.normal(size=T) * 1.5
    ref = hl.GaussianHMM(K, covariance_type="diag")
    ref.startprob_, ref.transmat_ = p["init"], p["trans"]
    ref.means_, ref.covars_ = p["loc"][:, None], (p["scale"] ** 2)[:, None]
    logprob, path = ref.decode(ys[:, None], algorithm="viterbi")
    estep = EM(emitting_hmm, progress_bar=False).e_step(p, jnp.asarray(ys), K=K)
    ours = np.r_[int(estep.most_probable["z0"]), estep.most_probable["z"]]
    np.testing.assert_array_equal(ours, path)


# -- a plate of padded sequences -------------------------------------------------------------------


def padded_hmm(ys, mask, K, V):
    """Sequences of different lengths in one padded (N, T_max) array; z0 emits ys[:, 0]."""
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.ones((K, V)) / V, constraint=constraints.simplex)
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


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow runs it
def test_padded_sequences_each_get_an_optimal_path():
    """A plate of sequences (the chain's batch dim) with masked padding and tied optima: each
    sequence's decoded path is one of its own brute-force optima, and hard EM's log Z is the sum
    of the sequences' best scores."""
    K, V = 2, 2
    # switching to follow an observation costs what staying and missing it does: ties
    p = dict(init=np.array([0.5, 0.5]), trans=np.array([[0.6, 0.4], [0.4, 0.6]]),
             emit=np.array([[0.6, 0.4], [0.4, 0.6]]))
    seqs = [np.array([0, 1, 1, 0, 0, 1]), np.array([1, 1, 0]), np.array([0, 1, 0, 1, 0])]
    T = max(map(len, seqs))
    ys = np.zeros((len(seqs), T), int)
    mask = np.zeros((len(seqs), T), bool)
    for i, s in enumerate(seqs):
        ys[i, :len(s)], mask[i, :len(s)] = s, True
    li, lt, le = np.log(p["init"]), np.log(p["trans"]), np.log(p["emit"])
    estep = EM(padded_hmm, progress_bar=False).e_step(p, jnp.asarray(ys), jnp.asarray(mask),
                                                        K=K, V=V)
    total = 0.0
    for i, s in enumerate(seqs):
        scores = {z: li[z[0]] + le[z[0], s[0]] + sum(lt[z[t - 1], z[t]] + le[z[t], s[t]]
                                                       for t in range(1, len(s)))
                  for z in itertools.product(range(K), repeat=len(s))}
        best = max(scores.values())
        total += best
        optima = {z for z, v in scores.items() if np.isclose(v, best, rtol=0, atol=1e-12)}
        path = (int(estep.most_probable["z0"][i]),
                *map(int, np.asarray(estep.most_probable["z"])[: len(s) - 1, i]))
        assert path in optima
        assert len(optima) == (8, 2, 1)[i]  # the cases under test
    problem, _, data = build(padded_hmm, jnp.asarray(ys), jnp.asarray(mask), K=K, V=V,
                             options=Options(hard=True))
    log_z, _, _ = e_step(problem, {k: jnp.asarray(v) for k, v in p.items()}, data)
    np.testing.assert_allclose(float(log_z), total, rtol=1e-12)
