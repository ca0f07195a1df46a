"""Classic EM models written as ordinary NumPyro programs, each against an independent reference:

- IBM Model 2 word alignment against nltk's ``IBMModel2``, from the same tables, with declared
  sentence lengths that no sentence pair has;
- the Dawid-Skene annotator model against a numpy EM written from the formulas of Dawid & Skene
  (1979), with one annotator who labelled nothing;
- mixtures whose Categorical / Poisson / Normal / Bernoulli tables are indexed by a group level that
  no row has, against the same fit with that level left out of the declaration.

All three have parameter entries with zero expected count: EM's update leaves such an entry where it
was (nothing in the likelihood depends on it), while the other entries of the same table are
updated as usual.
"""

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp

from bayes_em import EM

jax.config.update("jax_enable_x64", True)


def fit(model, init, *args, n_iter, **kwargs):
    em = EM(model, max_iter=n_iter, tol=0.0, init_values=init, progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), *args, **kwargs)
    assert result.n_iter == n_iter
    obj = result.trace()["objective"]
    assert np.all(np.diff(obj) >= -1e-10 * np.abs(obj).max())
    return result


# --- IBM Model 2 against nltk ---------------------------------------------------------------------
# a(i | j, l, m): target position j (1..m) of a pair with l source and m target words is aligned to
# source position i (0 = NULL, 1..l). Declared for l, m up to 5; the corpus has (l, m) in
# {(2, 2), (4, 4), (4, 5)} only, so most (j, l, m) cells are used by no sentence pair.
IBM2_PAIRS = [  # (source = English, target = German); no target word twice in a sentence
    ("the house is small", "klein ist das haus"),
    ("the house is big", "das haus ist ja groß"),
    ("the book is small", "das buch ist ja klein"),
    ("the house", "das haus"),
    ("the book", "das buch"),
    ("a book", "ein buch"),
]
L_MAX, M_MAX = 5, 5


def _log_zero():
    """A finite stand-in for log 0 (as bayes_em.models uses for padded source positions)."""
    return jnp.finfo(jnp.float64).min / 1e8


def ibm2(src, src_len, tgt, tgt_len, n_src_words, n_tgt_words, l_max, m_max):
    """IBM Model 2: a_sj ~ Categorical(a_table[j, l_s, m_s]) over source positions 0..l_max (a
    factor rules out the positions past the sentence, i > l_s), f_sj ~ Categorical(t[e_s,a_sj]).

    ``src`` (S, l_max + 1): source word ids, position 0 the NULL word (id 0); ``tgt`` (S, m_max)
    target word ids; ``src_len`` / ``tgt_len`` the lengths l_s, m_s. ``a_table[j - 1, l - 1, m - 1]``
    is the row a(. | j, l, m).
    """  # noqa: E501
    S = src.shape[0]
    t = numpyro.param("t", jnp.full((n_src_words, n_tgt_words), 1.0 / n_tgt_words),
                      constraint=constraints.simplex)
    a_table = numpyro.param("a_table",
                            jnp.full((m_max, l_max, m_max, l_max + 1), 1.0 / (l_max + 1)),
                            constraint=constraints.simplex)
    j = jnp.arange(m_max)
    rows = a_table[j, (src_len - 1)[:, None], (tgt_len - 1)[:, None]]  # (S, m_max, l_max + 1)
    pair = jnp.arange(S)[:, None]
    with numpyro.plate("pairs", S, dim=-2), numpyro.plate("positions", m_max, dim=-1):
        with numpyro.handlers.mask(mask=j < tgt_len[:, None]):
            a = numpyro.sample("a", dist.Categorical(rows))
            numpyro.factor("a_in_sentence", jnp.where(a <= src_len[:, None], 0.0, _log_zero()))
            numpyro.sample("f", dist.Categorical(t[src[pair, a]]), obs=tgt)


def ibm2_data():
    pairs = [(e.split(), f.split()) for e, f in IBM2_PAIRS]
    src_vocab = [None] + sorted({w for e, _ in pairs for w in e})
    tgt_vocab = sorted({w for _, f in pairs for w in f})
    s_id = {w: i for i, w in enumerate(src_vocab)}
    t_id = {w: i for i, w in enumerate(tgt_vocab)}
    S = len(pairs)
    src = np.zeros((S, L_MAX + 1), np.int32)
    tgt = np.zeros((S, M_MAX), np.int32)
    for n, (e, f) in enumerate(pairs):
        src[n, 1: 1 + len(e)] = [s_id[w] for w in e]
        tgt[n, : len(f)] = [t_id[w] for w in f]
    src_len = np.array([len(e) for e, _ in pairs], np.int32)
    tgt_len = np.array([len(f) for _, f in pairs], np.int32)
    return pairs, src_vocab, tgt_vocab, src, src_len, tgt, tgt_len


def test_ibm2_matches_nltk_and_keeps_unused_alignment_cells():
    nltk_translate = pytest.importorskip("nltk.translate")
    pairs, src_vocab, tgt_vocab, src, src_len, tgt, tgt_len = ibm2_data()
    assert all(len(set(f)) == len(f) for _, f in pairs)  # nltk normalises per target word
    n_iter = 4
    rng = np.random.default_rng(0)
    # random positive starting tables (rows sum to one); ours puts mass on the positions i > l too,
    # which the factor rules out: the posterior over i <= l is that of the row renormalised over
    # i <= l, which is what nltk starts from
    t0 = rng.uniform(0.5, 1.5, size=(len(src_vocab), len(tgt_vocab)))
    t0 /= t0.sum(1, keepdims=True)
    a0 = rng.uniform(0.5, 1.5, size=(M_MAX, L_MAX, M_MAX, L_MAX + 1))
    a0 /= a0.sum(-1, keepdims=True)

    result = fit(ibm2, dict(t=t0, a_table=a0), jnp.asarray(src), jnp.asarray(src_len),
                 jnp.asarray(tgt), jnp.asarray(tgt_len), n_iter=n_iter,
                 n_src_words=len(src_vocab), n_tgt_words=len(tgt_vocab), l_max=L_MAX, m_max=M_MAX)
    assert result.mstep_paths == {"t": "closed-form categorical",
                                  "a_table": "closed-form categorical"}

    # nltk, from the same tables: translation_table[f][e], alignment_table[i][j][l][m]
    min_prob = nltk_translate.IBMModel.MIN_PROB
    translation = defaultdict(lambda: defaultdict(lambda: min_prob))
    for e, e_word in enumerate(src_vocab):
        for f, f_word in enumerate(tgt_vocab):
            translation[f_word][e_word] = t0[e, f]
    alignment = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(
        lambda: min_prob))))
    for l in range(1, L_MAX + 1):  # noqa: E741
        for m in range(1, M_MAX + 1):
            for j in range(1, m + 1):
                row = a0[j - 1, l - 1, m - 1, : l + 1]
                for i in range(l + 1):
                    alignment[i][j][l][m] = row[i] / row.sum()
    # AlignedSent(words, mots) translates mots (source) -> words (target)
    bitext = [nltk_translate.AlignedSent(f, e) for e, f in pairs]
    ibm = nltk_translate.IBMModel2(bitext, n_iter, probability_tables=dict(
        translation_table=translation, alignment_table=alignment))

    # alignment probabilities of the used cells (j, l, m), positions i = 0..l
    a = np.asarray(result.params["a_table"])
    used = sorted({(j, len(e), len(f)) for e, f in pairs for j in range(1, len(f) + 1)})
    ours = np.concatenate([a[j - 1, l - 1, m - 1, : l + 1] for j, l, m in used])  # noqa: E741
    theirs = np.array([ibm.alignment_table[i][j][l][m]
                       for j, l, m in used for i in range(l + 1)])  # noqa: E741
    assert theirs.min() > 1e-9
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    for j, l, m in used:  # no mass on the positions past the sentence  # noqa: E741
        assert np.all(a[j - 1, l - 1, m - 1, l + 1:] < 1e-12), (j, l, m)

    # the cells no sentence pair uses keep their initial rows
    unused = np.ones(a.shape[:3], bool)
    for j, l, m in used:  # noqa: E741
        unused[j - 1, l - 1, m - 1] = False
    assert unused.sum() == M_MAX * L_MAX * M_MAX - len(used)
    np.testing.assert_allclose(a[unused], a0[unused], rtol=1e-10, atol=0)

    # translation probabilities of the (f, e) pairs that co-occur (the others are in no likelihood
    # term: nltk leaves them at their start, EM sends them to 0)
    t = np.asarray(result.params["t"])
    e_id = {w: i for i, w in enumerate(src_vocab)}
    f_id = {w: i for i, w in enumerate(tgt_vocab)}
    cooccur = sorted({(f, e) for e_words, f_words in pairs for f in f_words
                      for e in [None, *e_words]}, key=str)
    ours = np.array([t[e_id[e], f_id[f]] for f, e in cooccur])
    theirs = np.array([ibm.translation_table[f][e] for f, e in cooccur])
    assert theirs.min() > 1e-9  # nowhere near nltk's floor
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(t.sum(1), 1.0)

    # the final log-likelihood, evaluated on nltk's final tables
    ll = 0.0
    for e_words, f_words in pairs:
        l, m = len(e_words), len(f_words)  # noqa: E741
        for j, f in enumerate(f_words, 1):
            ll += np.log(sum(ibm.translation_table[f][e] * ibm.alignment_table[i][j][l][m]
                             for i, e in enumerate([None, *e_words])))
    np.testing.assert_allclose(result.trace()["log_likelihood"][-1], ll, rtol=1e-7)


# --- Dawid-Skene against a numpy EM ---------------------------------------------------------------
def dawid_skene(labels, labelled, K):
    """Dawid & Skene (1979): item i has true class z_i ~ Categorical(pi); annotator r's label of
    item i (where ``labelled[i, r]``) is y_ir ~ Categorical(theta[r, z_i])."""
    N, R = labels.shape
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    theta = numpyro.param("theta", jnp.full((R, K, K), 1.0 / K), constraint=constraints.simplex)
    with numpyro.plate("items", N, dim=-2):
        z = numpyro.sample("z", dist.Categorical(pi))
        with numpyro.plate("annotators", R, dim=-1), numpyro.handlers.mask(mask=labelled):
            numpyro.sample("y", dist.Categorical(theta[jnp.arange(R), z]), obs=labels)


def dawid_skene_em(labels, labelled, pi, theta, n_iter):
    """The EM of Dawid & Skene (1979), section 3: T_ik ∝ pi_k Π_r theta[r, k, y_ir] over the labels
    given; pi_k = mean_i T_ik, theta[r, k, l] = Σ_i T_ik [y_ir = l] / Σ_i T_ik over the items that
    r labelled. Returns the final tables, the posterior T at them and the log-likelihoods."""
    K = len(pi)
    onehot = np.eye(K)[labels] * labelled[..., None]  # (N, R, L)
    lls = []
    for it in range(n_iter + 1):
        log_joint = np.log(pi) + np.einsum("nrl,rkl->nk", onehot, np.log(theta))
        lse = logsumexp(log_joint, axis=1, keepdims=True)
        post = np.exp(log_joint - lse)
        lls.append(lse.sum())
        if it == n_iter:
            return pi, theta, post, np.array(lls)
        pi = post.mean(0)
        counts = np.einsum("nk,nrl->rkl", post, onehot)
        total = counts.sum(-1, keepdims=True)
        theta = np.where(total > 0, counts / np.where(total > 0, total, 1.0), theta)


def test_dawid_skene_with_an_idle_annotator_matches_numpy_em():
    rng = np.random.default_rng(1)
    N, R, K, idle = 40, 4, 3, 2
    z = rng.choice(K, size=N, p=[0.5, 0.3, 0.2])
    true_theta = np.stack([0.6 * np.eye(K) + 0.4 * rng.dirichlet(np.ones(K), size=K)
                           for _ in range(R)])
    labels = np.array([[rng.choice(K, p=true_theta[r, z[i]]) for r in range(R)] for i in range(N)])
    labelled = rng.uniform(size=(N, R)) < 0.8
    labelled[:, idle] = False
    labels[~labelled] = 0  # any filler
    for r in range(R):  # every active annotator gives every label (no zero in the fitted tables)
        assert r == idle or set(labels[labelled[:, r], r]) == set(range(K)), r
    pi0 = np.array([0.4, 0.35, 0.25])
    theta0 = 0.5 * np.eye(K) + 0.5 * rng.dirichlet(np.ones(K), size=(R, K))
    n_iter = 5

    result = fit(dawid_skene, dict(pi=pi0, theta=theta0), jnp.asarray(labels),
                 jnp.asarray(labelled), n_iter=n_iter, K=K)
    assert result.mstep_paths == {"pi": "closed-form categorical",
                                  "theta": "closed-form categorical"}
    pi, theta, post, lls = dawid_skene_em(labels, labelled, pi0, theta0, n_iter)
    active = np.arange(R) != idle
    np.testing.assert_allclose(result.params["pi"], pi, atol=1e-8, rtol=0)
    np.testing.assert_allclose(np.asarray(result.params["theta"])[active], theta[active],
                               atol=1e-8, rtol=0)
    np.testing.assert_allclose(np.asarray(result.params["theta"])[idle], theta0[idle],
                               atol=1e-12, rtol=0)
    np.testing.assert_allclose(result.trace()["log_likelihood"], lls, atol=1e-8, rtol=0)
    np.testing.assert_allclose(np.asarray(result.posterior["z"]).reshape(N, K), post, atol=1e-8)


# --- a declared group level with no rows ----------------------------------------------------------
# x_n | g_n, z_n in a K = 2 mixture whose tables are indexed by the observed group g_n of row n; the
# group level EMPTY = 1 of G = 3 has no rows. Nothing in the likelihood depends on its entries, so
# the fit equals that of the same model declared with G = 2 (level 1 removed, the rows of level 2
# relabelled 1), from the same start for the other levels, and the empty entries stay at their
# start.
EMPTY = 1


def grouped_mixture(x, g, G, family):
    K = 2
    if family == "categorical":  # class weights per group
        w = numpyro.param("w", jnp.ones((G, K)) / K, constraint=constraints.simplex)[g]
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    else:
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    if family == "poisson":
        rate = numpyro.param("rate", jnp.ones((G, K)), constraint=constraints.positive)
    if family == "normal":
        loc = numpyro.param("loc", jnp.zeros((G, K)))
        scale = numpyro.param("scale", jnp.ones((G, K)), constraint=constraints.positive)
    if family == "bernoulli":
        p = numpyro.param("p", jnp.full((G, K, x.shape[-1]), 0.5),
                          constraint=constraints.unit_interval)
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        if family == "categorical":
            numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)
        elif family == "poisson":
            numpyro.sample("x", dist.Poisson(rate[g, z]), obs=x)
        elif family == "normal":
            numpyro.sample("x", dist.Normal(loc[g, z], scale[g, z]), obs=x)
        else:
            numpyro.sample("x", dist.Bernoulli(p[g, z]).to_event(1), obs=x)


def grouped_data(family, rng):
    N = 60
    g = np.where(np.arange(N) < 25, 0, 2)  # levels 0 and 2 only
    z = rng.integers(2, size=N)
    if family == "categorical":
        x = np.where(z == 1, 1.5, -1.5) + rng.normal(size=N) + 0.5 * g
    elif family == "poisson":
        x = rng.poisson(np.where(z == 1, 6.0, 1.5) * (1 + 0.5 * g)).astype(float)
    elif family == "normal":
        x = np.where(z == 1, 2.0, -2.0) + g + rng.normal(size=N) * (1 + 0.3 * g)
    else:
        x = (rng.uniform(size=(N, 4)) < np.where(z[:, None] == 1, 0.8, 0.25)).astype(float)
    return x, g


GROUP_INITS = {  # initial values with G = 3; the group axis is the first axis of the tables
    "categorical": (dict(w=np.array([[0.3, 0.7], [0.9, 0.1], [0.55, 0.45]]),
                         loc=np.array([-1.0, 1.2])), ("w",)),
    "poisson": (dict(w=np.array([0.4, 0.6]), rate=np.array([[1.0, 4.0], [7.0, 0.3], [2.0, 8.0]])),
                ("rate",)),
    "normal": (dict(w=np.array([0.45, 0.55]), loc=np.array([[-1.0, 1.0], [5.0, -5.0], [0.0, 3.0]]),
                    scale=np.array([[1.0, 1.5], [0.2, 3.0], [2.0, 1.0]])), ("loc", "scale")),
    "bernoulli": (dict(w=np.array([0.5, 0.5]),
                       p=np.array([[[0.3, 0.4, 0.35, 0.3], [0.6, 0.7, 0.65, 0.6]],
                                   [[0.05, 0.9, 0.5, 0.1], [0.95, 0.2, 0.5, 0.8]],
                                   [[0.2, 0.3, 0.4, 0.5], [0.7, 0.6, 0.8, 0.75]]])), ("p",)),
}
PATHS = {"categorical": {"w": "categorical", "loc": "normal_loc"},
         "poisson": {"w": "categorical", "rate": "poisson"},
         "normal": {"w": "categorical", "loc": "normal_loc", "scale": "normal_scale"},
         "bernoulli": {"w": "categorical", "p": "bernoulli"}}


@pytest.mark.parametrize("family", ["categorical", "poisson", "normal", "bernoulli"])
def test_empty_group_level_changes_nothing(family):
    x, g = grouped_data(family, np.random.default_rng(2))
    assert not np.any(g == EMPTY)
    init, grouped = GROUP_INITS[family]
    reduced_init = {k: np.delete(v, EMPTY, axis=0) if k in grouped else v for k, v in init.items()}
    n_iter = 5
    full = fit(grouped_mixture, init, jnp.asarray(x), jnp.asarray(g), n_iter=n_iter, G=3,
               family=family)
    reduced = fit(grouped_mixture, reduced_init, jnp.asarray(x),
                  jnp.asarray(np.where(g == 2, 1, g)), n_iter=n_iter, G=2, family=family)
    for fit_ in (full, reduced):
        assert fit_.mstep_paths == {k: f"closed-form {v}" for k, v in PATHS[family].items()}

    np.testing.assert_allclose(full.trace()["log_likelihood"], reduced.trace()["log_likelihood"],
                               atol=1e-8, rtol=0)
    for name, value in full.params.items():
        value = np.asarray(value)
        if name in grouped:
            np.testing.assert_allclose(value[EMPTY], init[name][EMPTY], atol=1e-12, rtol=0,
                                       err_msg=name)
            value = np.delete(value, EMPTY, axis=0)
        np.testing.assert_allclose(value, reduced.params[name], atol=1e-8, rtol=0, err_msg=name)
        # the fit is not trivial: the tables moved away from their start
        assert np.abs(np.asarray(reduced.params[name]) - reduced_init[name]).max() > 1e-3, name
