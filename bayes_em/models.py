"""Ready NumPyro models for the classic EM systems: call them with `EM(model).run(...)` or copy
them as a starting point.

Every model is an ordinary NumPyro program: `numpyro.param` sites are fitted by maximum
likelihood, continuous `numpyro.sample` sites without `obs` by MAP under their prior, and the
discrete latents are enumerated exactly. The default initial values are deterministic functions of
the data (override them with `EM(..., init_values=...)`, or use `restarts=`).

| model | |
|---|---|
| `gmm` | Gaussian mixture, full / diagonal / spherical / tied covariance: ML, floored ML or MAP |
| `kmeans` | K-means: equal weights, one fixed spherical variance; use `hard=True` |
| `bernoulli_mixture` | latent class analysis on binary items |
| `categorical_mixture` | latent class analysis on categorical items |
| `ibm1` | IBM Model 1 word alignment, with the NULL word (`ibm1_corpus` pads) |
| `bayesian_network` | discrete Bayesian network, missing entries summed out |
| `mixture_of_regressions` | mixture of linear regressions (numeric M-step for coefficients) |

The sites are written so that the closed-form M-steps of [`bayes_em.conjugate`][bayes_em.conjugate]
apply where the family has one (check `result.mstep_paths`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em.constraints import positive_definite_floor

__all__ = [
    "gmm",
    "gmm_prior",
    "kmeans",
    "bernoulli_mixture",
    "categorical_mixture",
    "ibm1",
    "ibm1_corpus",
    "bayesian_network",
    "mixture_of_regressions",
]

COVARIANCES = ("full", "diag", "spherical", "tied")


def _log_zero(dtype):
    """A finite stand-in for log 0, as bayes_em.factors uses for masked latents: far below any
    real log-density, so that the max-product (hard EM, `most_probable`) treats it as
    impossible rather than as one more log-density to resolve (-1e30 would be)."""
    return jnp.finfo(dtype).min / 1e8


def _spread(x, K, rows=1 << 16):
    """K distinct starting centres: the per-coordinate quantiles at levels (k + ½)/K, of at
    most about `rows` rows (every ⌈N / rows⌉-th: sorting 1e6 × 8 values takes seconds)."""
    levels = (jnp.arange(K, dtype=x.dtype) + 0.5) / K
    return jnp.quantile(x[:: max(1, -(-x.shape[0] // rows))], levels, axis=0)


def _weights(K, prior, dtype):
    if prior is None:
        return numpyro.param("weights", jnp.ones(K, dtype) / K, constraint=constraints.simplex)
    return numpyro.sample("weights", dist.Dirichlet(jnp.full(K, prior["alpha"], dtype)))


def gmm_prior(x, K, covariance="full", **overrides):
    """The weak default prior of [`gmm`][bayes_em.models.gmm] for data `x` (N, D), as a dict of
    hyperparameters.

    Following Fraley & Raftery (2007): weights ~ Dirichlet(alpha = 2) (one pseudo-count per
    component); full / tied covariance ~ InverseWishart(df = D + 2, psi = diag(var x) / K^(2/D)),
    whose mode is psi / (df + D + 1) and mean psi; diagonal / spherical scales (standard deviations)
    ~ InverseGamma(a = 2, b = 3 s0) on the scale, s0 = sd(x) / K^(1/D) (mode s0, mean 3 s0).
    Keyword arguments override any entry (`alpha`, `df`, `psi`, `a`, `b`).
    """
    x = jnp.asarray(x)
    _, D = x.shape
    var = jnp.var(x, axis=0)
    shrink = float(K) ** (2.0 / D)
    hyper = dict(alpha=2.0)
    if covariance in ("full", "tied"):
        hyper.update(df=D + 2.0, psi=jnp.diag(var) / shrink)
    elif covariance == "diag":
        hyper.update(a=2.0, b=3.0 * jnp.sqrt(var / shrink))
    elif covariance == "spherical":
        hyper.update(a=2.0, b=3.0 * jnp.sqrt(jnp.mean(var) / shrink))
    else:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}.")
    unknown = set(overrides) - set(hyper)
    if unknown:
        raise ValueError(f"Unknown prior hyperparameters for covariance={covariance!r}: "
                         f"{sorted(unknown)}.")
    hyper.update(overrides)
    return hyper


def gmm(x, K, covariance="full", prior=None, variance_floor=None):
    """Gaussian mixture: z_n ~ Categorical(weights), x_n | z_n ~ Normal(loc[z_n], Σ[z_n]).

    `covariance`: `"full"` (`cov`, K×D×D), `"diag"` (`scale`, K×D standard deviations),
    `"spherical"` (`scale`, K standard deviations) or `"tied"` (one `cov`, D×D).
    `prior=None` is maximum likelihood; `prior=True` puts the weak priors of
    [`gmm_prior`][bayes_em.models.gmm_prior] on the weights and covariances (MAP; they keep a
    component from collapsing onto one point), and a dict overrides some of them
    (`prior=dict(alpha=1.0)`). The means `loc` (K×D) are always maximum likelihood (the flat limit
    of a normal-inverse-Wishart prior). Every site takes a closed-form M-step, the
    InverseWishart-MAP covariance included (its mode, (Ψ + S_k) / (ν + D + 1 + N_k)).

    `variance_floor=c` (maximum likelihood only) bounds the likelihood instead: every
    covariance eigenvalue (`"full"` / `"tied"`) or variance (`"diag"` / `"spherical"`)
    stays at least `c`, and the M-step is the exact constrained maximiser (eigenvalues of the
    weighted scatter clipped at `c`; scikit-learn's `reg_covar` adds `c` instead, which
    maximises nothing). A component on a single point then keeps variance `c`.

    `x` has shape (N, D); for 1-D data pass `x[:, None]`.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"gmm expects data of shape (N, D), got {x.shape}; use x[:, None] for "
                         "1-D data.")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}.")
    N, D = x.shape
    hyper = None
    if prior is not None and prior is not False:
        if variance_floor is not None:
            raise ValueError("gmm: variance_floor applies to maximum likelihood (prior=None); the "
                             "prior already keeps the covariances away from 0.")
        hyper = gmm_prior(x, K, covariance, **({} if prior is True else dict(prior)))
    floor = None
    if variance_floor is not None:
        floor = float(variance_floor)
        if not floor > 0:
            raise ValueError(f"gmm: variance_floor must be a positive number, got "
                             f"{variance_floor!r}.")
    w = _weights(K, hyper, x.dtype)
    loc = numpyro.param("loc", _spread(x, K))
    spread = _gmm_spread(x, K, covariance, hyper, floor)
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        if covariance == "full":
            obs = dist.MultivariateNormal(loc[z], covariance_matrix=spread[z])
        elif covariance == "tied":
            obs = dist.MultivariateNormal(loc[z], covariance_matrix=spread)
        elif covariance == "diag":
            obs = dist.Normal(loc[z], spread[z]).to_event(1)
        else:
            obs = dist.Normal(loc[z], spread[z][..., None]).to_event(1)
        numpyro.sample("x", obs, obs=x)


def _gmm_spread(x, K, covariance, hyper, floor):
    """The covariance site `cov` ("full" / "tied") or the standard deviations `scale`
    ("diag" / "spherical") of [`gmm`][bayes_em.models.gmm]: a param (ML, optionally floored) or a
    sampled site under the prior `hyper` (MAP)."""
    D = x.shape[1]
    var = jnp.var(x, axis=0)
    if covariance in ("full", "tied"):
        shape = (K, D, D) if covariance == "full" else (D, D)
        if hyper is None:
            constraint = (constraints.positive_definite if floor is None
                          else positive_definite_floor(floor))
            start = jnp.diag(var if floor is None else jnp.maximum(var, 2 * floor))
            return numpyro.param("cov", jnp.broadcast_to(start, shape), constraint=constraint)
        prior_cov = dist.InverseWishart(hyper["df"], scale_matrix=hyper["psi"])
        if covariance == "full":
            with numpyro.plate("components", K):
                return numpyro.sample("cov", prior_cov)
        return numpyro.sample("cov", prior_cov)
    shape = (K, D) if covariance == "diag" else (K,)
    init = jnp.broadcast_to(
        jnp.sqrt(var) if covariance == "diag" else jnp.sqrt(jnp.mean(var)), shape)
    if hyper is None and floor is None:
        return numpyro.param("scale", init, constraint=constraints.positive)
    if hyper is None:
        return numpyro.param("scale", jnp.maximum(init, jnp.sqrt(2 * floor)),
                             constraint=constraints.greater_than_eq(math.sqrt(floor)))
    # plates rather than .to_event(): the closed-form MAP update needs the prior's own support
    # (positive) on the site
    with numpyro.plate("components", K, dim=-len(shape)):
        if covariance == "diag":
            with numpyro.plate("coordinates", D, dim=-1):
                return numpyro.sample("scale", dist.InverseGamma(hyper["a"], hyper["b"]))
        return numpyro.sample("scale", dist.InverseGamma(hyper["a"], hyper["b"]))

def kmeans(x, K, scale=1.0):
    """K-means as a mixture: z_n ~ Categorical(1/K), x_n | z_n ~ Normal(loc[z_n], scale² I).

    With `EM(kmeans, hard=True)` each iteration assigns every point to its nearest centre and
    moves each centre to the mean of its points: Lloyd's algorithm. `scale` is fixed (it does not
    change the assignments); with soft EM it is the bandwidth of "soft k-means".
    """
    x = jnp.asarray(x)
    N, D = x.shape
    loc = numpyro.param("loc", _spread(x, K))
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K, x.dtype) / K))
        numpyro.sample("x", dist.Normal(loc[z], scale).to_event(1), obs=x)


def bernoulli_mixture(x, K):
    """Latent class analysis on binary items: z_n ~ Categorical(weights),
    x_nd | z_n ~ Bernoulli(probs[z_n, d]) independently over the D items.

    `x` has shape (N, D) with entries 0 / 1; `probs` (K×D) starts at fixed pseudo-random
    values in (0.25, 0.75).
    """
    x = jnp.asarray(x)
    N, D = x.shape
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    w = numpyro.param("weights", jnp.ones(K, dtype) / K, constraint=constraints.simplex)
    init = jax.random.uniform(jax.random.PRNGKey(0), (K, D), dtype, 0.25, 0.75)
    probs = numpyro.param("probs", init, constraint=constraints.unit_interval)
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=x)


def categorical_mixture(x, K, V):
    """Latent class analysis on categorical items: z_n ~ Categorical(weights),
    x_nd | z_n ~ Categorical(probs[z_n, d]) independently over the D items.

    `x` has shape (N, D) with integer entries in 0..V−1 (items with fewer categories simply
    never use the last ones); `probs` (K×D×V) starts at fixed pseudo-random rows.
    """
    x = jnp.asarray(x)
    N, D = x.shape
    dtype = jnp.result_type(float)
    w = numpyro.param("weights", jnp.ones(K, dtype) / K, constraint=constraints.simplex)
    init = jax.random.dirichlet(jax.random.PRNGKey(0), jnp.full(V, 5.0, dtype), (K, D))
    probs = numpyro.param("probs", init, constraint=constraints.simplex)
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Categorical(probs[z]).to_event(1), obs=x)


# --- IBM Model 1 ---------------------------------------------------------------------------------
def ibm1_corpus(pairs):
    """Pad a list of `(source_words, target_words)` sentence pairs for
    [`ibm1`][bayes_em.models.ibm1].

    Returns a dict with `src` (S, I+1) source word ids, position 0 being the NULL word (id 0);
    `tgt` (S, J) target word ids; `src_mask` and `tgt_mask` marking real positions;
    `src_vocab` (`src_vocab[0] is None`, the NULL word) and `tgt_vocab`, lists of words in
    id order. Padding uses id 0 and is masked out.
    """
    src_vocab = [None] + sorted({w for s, _ in pairs for w in s})
    tgt_vocab = sorted({w for _, t in pairs for w in t})
    s_id = {w: i for i, w in enumerate(src_vocab)}
    t_id = {w: i for i, w in enumerate(tgt_vocab)}
    I = 1 + max(len(s) for s, _ in pairs)  # noqa: E741 (the I of IBM Model 1)
    J = max(len(t) for _, t in pairs)
    src = np.zeros((len(pairs), I), np.int32)
    tgt = np.zeros((len(pairs), J), np.int32)
    src_mask = np.zeros((len(pairs), I), bool)
    tgt_mask = np.zeros((len(pairs), J), bool)
    for n, (s, t) in enumerate(pairs):
        src[n, 1: 1 + len(s)] = [s_id[w] for w in s]
        src_mask[n, : 1 + len(s)] = True
        tgt[n, : len(t)] = [t_id[w] for w in t]
        tgt_mask[n, : len(t)] = True
    return dict(src=jnp.asarray(src), tgt=jnp.asarray(tgt), src_mask=jnp.asarray(src_mask),
                tgt_mask=jnp.asarray(tgt_mask), src_vocab=src_vocab, tgt_vocab=tgt_vocab)


def ibm1(src, tgt, src_mask, tgt_mask, n_src_words, n_tgt_words):
    """IBM Model 1: for target position j of sentence pair s, the alignment
    a_sj ~ Uniform{0 (NULL), 1..I_s} and f_sj | a_sj ~ Categorical(t[e_s,a_sj]).

    `t` (`n_src_words` × `n_tgt_words`, row 0 the NULL word) is the translation table
    t(f | e), started uniform. Arrays as built by [`ibm1_corpus`][bayes_em.models.ibm1_corpus]. The
    E-step gives the alignment posteriors p(a_sj = i | e_s, f_s), the M-step normalised expected
    counts.
    """
    S, I = src.shape  # noqa: E741 (the I of IBM Model 1)
    J = tgt.shape[1]
    dtype = jnp.result_type(float)
    t = numpyro.param("t", jnp.full((n_src_words, n_tgt_words), 1.0 / n_tgt_words, dtype),
                      constraint=constraints.simplex)
    # uniform over the real source positions (NULL included); padded positions get probability 0,
    # as a finite stand-in for log 0 (the engine's own: far below any real log-density)
    logits = jnp.where(src_mask, 0.0, _log_zero(dtype)).astype(dtype)
    pair = jnp.arange(S)[:, None]
    with numpyro.plate("pairs", S, dim=-2), numpyro.plate("positions", J, dim=-1):
        with numpyro.handlers.mask(mask=tgt_mask):
            a = numpyro.sample("a", dist.Categorical(logits=logits[:, None, :]))
            numpyro.sample("f", dist.Categorical(t[src[pair, a]]), obs=tgt)


# --- Bayesian network with missing values ------------------------------------------------------
def bayesian_network(values, observed, nodes):
    """A discrete Bayesian network, each row an independent draw; missing entries are latent.

    `nodes` lists `(name, cardinality, parents)` in topological order (`parents` a tuple of
    earlier names); `values` (N, len(nodes)) holds integer states, anything (e.g. −1) where
    `observed` (N, len(nodes), bool) is False. For every node,
    x_v | parents ~ Categorical(cpt_v[x_parents]), with `cpt_<name>` of shape
    (*parent cardinalities, cardinality), started uniform; the M-step is the classic
    normalised expected counts.

    Every entry is a latent site `<name>` (so `result.posterior[name]` imputes the missing
    ones), pinned to the data where observed by a factor `<name>_seen` (log 1 at the observed
    state, a huge negative number elsewhere): each CPT then enters one site only, and takes the
    closed-form categorical update. NumPyro's `obs_mask=` gives the same fit, but splits a node
    into `<name>_observed` and `<name>_unobserved`, and a CPT used by two sites is maximised
    numerically.
    """
    observed = jnp.asarray(observed, bool)
    values = jnp.where(observed, jnp.asarray(values), 0)  # any filler where missing (e.g. -1)
    card = {name: k for name, k, _ in nodes}
    dtype = jnp.result_type(float)
    cpts = {}
    for name, k, parents in nodes:
        shape = tuple(card[p] for p in parents) + (k,)
        cpts[name] = numpyro.param(f"cpt_{name}", jnp.full(shape, 1.0 / k, dtype),
                                   constraint=constraints.simplex)
    # a finite stand-in for log 0 (an all -inf slice would give NaN posterior weights)
    impossible = jnp.asarray(_log_zero(dtype), dtype)
    state = {}
    with numpyro.plate("rows", values.shape[0]):
        for j, (name, k, parents) in enumerate(nodes):
            probs = cpts[name][tuple(state[p] for p in parents)]
            x = numpyro.sample(name, dist.Categorical(probs))
            clash = observed[:, j] & (x != values[:, j])
            numpyro.factor(f"{name}_seen", jnp.where(clash, impossible, jnp.zeros((), dtype)))
            state[name] = x


# --- Mixture of linear regressions -------------------------------------------------------------
def mixture_of_regressions(X, y, K):
    """Mixture of linear regressions: z_n ~ Categorical(weights),
    y_n | z_n ~ Normal(X_n · coef[z_n], var[z_n]).

    `X` (N, P) is the design matrix (add a column of ones for intercepts). The weights have a
    closed-form update; `coef` (through a dot product) and the variances `var` (through a
    square root) have none and are maximised numerically, jointly, at each M-step (weighted least
    squares and the weighted residual variance, per component). `coef` starts at the least-squares
    fit plus fixed pseudo-random offsets.
    """
    X, y = jnp.asarray(X), jnp.asarray(y)
    N, P = X.shape
    ols = jnp.linalg.lstsq(X, y)[0]
    spread = jnp.std(y) / (jnp.std(X, axis=0) + 1.0)
    coef0 = ols + spread * jax.random.normal(jax.random.PRNGKey(0), (K, P), X.dtype)
    w = numpyro.param("weights", jnp.ones(K, X.dtype) / K, constraint=constraints.simplex)
    coef = numpyro.param("coef", coef0)
    var = numpyro.param("var", jnp.full(K, jnp.var(y)), constraint=constraints.positive)
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        mean = jnp.sum(X * coef[z], axis=-1)
        numpyro.sample("y", dist.Normal(mean, jnp.sqrt(var[z])), obs=y)
