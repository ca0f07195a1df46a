"""The E-step: posterior weights of every log-factor, and what is read from them.

    w_f = ∂ log Z(θ_t) / ∂ log f

(one reverse-mode pass through the contraction of [`bayes_em.contraction`][bayes_em.contraction]):
the posterior marginal of the latents in factor f's scope, or 1 for factors without any. With the
max-product (`semiring="max"`, hard EM) the weights are the indicator of one most probable
configuration: for Markov chains from the back-pointers of a Viterbi recursion (`bayes_em.viterbi`),
on the vectorised trace (a homogeneous transition's weight is then the path's transition counts);
elsewhere from the gradient of the max-product and a tie-breaking second pass
(`_one_optimum`), on the step-by-step trace.
"""

from __future__ import annotations

from collections import OrderedDict

import funsor
import jax
import jax.numpy as jnp
from jax import Array, lax

from bayes_em import _numpyro as npi
from bayes_em.contraction import log_partition
from bayes_em.factors import FactorMeta, Factors
from bayes_em.problem import EMProblem, factors, log_prior

__all__ = ["e_step", "posterior_weights", "max_product_factors", "backpointers_suffice",
           "site_marginal", "chain_marginals", "latent_posterior", "most_probable",
           "symmetric_latents", "projections"]


def e_step(problem: EMProblem, params: dict, data: tuple,
           semiring: str | None = None) -> tuple[Array, Array, dict]:
    """`(log Z, log p(θ), weights)` at θ = `params`; log Z = log p(X|θ) + log p(θ)."""
    semiring = semiring or ("max" if problem.hard else "sum")
    if semiring == "max":
        fs = max_product_factors(problem, params, data)
    else:
        fs = factors(problem, params, data, vectorized=True)
    log_z, weights = posterior_weights(fs, semiring, problem.parallel_time)
    return log_z, log_prior(problem, fs), weights


def max_product_factors(problem: EMProblem, params: dict, data: tuple) -> Factors:
    """The trace the max-product E-step reads: the vectorised one (a homogeneous transition
    evaluated once) where back-pointers give one optimum
    ([`backpointers_suffice`][bayes_em.estep.backpointers_suffice]), else the step-by-step one,
    whose time-resolved factors `_one_optimum` needs. The choice depends on the model's structure
    only (decided while tracing)."""
    fs = factors(problem, params, data, vectorized=True)
    if not _collapsed_time(fs) or backpointers_suffice(fs, problem.parallel_time):
        return fs
    return factors(problem, params, data, vectorized=False)


def backpointers_suffice(factors: Factors, parallel_time: bool = False) -> bool:
    """Whether the gradient of the max-product of `factors` is by itself the indicator of one
    optimum, whatever the ties: every latent lies in a Markov chain maximised by the
    back-pointer recursion (`bayes_em.contraction._forward_chain`). Traced only (nothing
    runs)."""
    report = {}
    jax.eval_shape(lambda logs, weights: log_partition(
        factors.replace(logs=logs, plate_weights=weights), "max", parallel_time, report),
        factors.logs, factors.plate_weights)
    return bool(report.get("one_optimum", False))


def _collapsed_time(factors: Factors) -> bool:
    """Whether some factor is constant over the steps of a vectorised `scan` (time dim of
    size 1 in a longer chain)."""
    sizes = factors.time_sizes()
    return any(m.time is not None and m.shape[m.names[m.time]] == 1 < sizes[m.time]
               for m in factors.metas)


def posterior_weights(factors: Factors, semiring: str = "sum",
                      parallel_time: bool = False) -> tuple[Array, dict]:
    """`(log Z, {factor: ∂ log Z / ∂ log f})`; the weights are posterior marginals of the
    factors' scopes (`"sum"`) or the indicator of one most probable configuration (`"max"`:
    by back-pointers where they suffice, see
    [`backpointers_suffice`][bayes_em.estep.backpointers_suffice]; else by a second, tie-breaking
    pass, which needs the step-by-step trace)."""
    tie_break = semiring == "max" and not backpointers_suffice(factors, parallel_time)
    if tie_break:
        if _collapsed_time(factors):
            raise ValueError("The max-product weights of this model need the step-by-step trace "
                             "(bayes_em.estep.max_product_factors), not the vectorised one.")
        factors = factors.replace(logs=_snap(factors))

    def log_z(logs):
        return log_partition(factors.replace(logs=logs), semiring, parallel_time)

    value, weights = jax.value_and_grad(log_z)(factors.logs)
    if tie_break:
        weights = _one_optimum(factors, weights, parallel_time)
    return value, weights


def _one_optimum(factors, weights, parallel_time=False):
    """Max-product weights that sit on ONE most probable configuration.

    With ties, the gradient of the max-product spreads its weight over the tied optima, and the
    argmax of each site's weights taken on its own can splice them into a configuration that is
    not optimal (in an HMM, equally probable paths arise whenever two equal observations follow
    each other: a→b→a→a and a→a→b→a use the same factors). A second max-product restricted to
    the entries with positive weight, plus a fixed random score in [0, 1) on every entry of the
    latents' own factors, has a single maximiser: one of the optima (exact for chains and trees,
    where every configuration built of such entries is optimal); its gradient is the indicator.
    """
    key = jax.random.PRNGKey(0)
    restricted = {}
    for i, meta in enumerate(factors.metas):
        w = weights[meta.name]
        dtype = jnp.result_type(w)
        a = jnp.where(w > 0, 0.0, jnp.finfo(dtype).min / 1e8).astype(dtype)
        if not meta.is_observed and meta.name in meta.names:
            a = a + jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(a), dtype)
        restricted[meta.name] = a
    restricted = factors.replace(logs=restricted)
    restricted = restricted.replace(logs=_snap(restricted))
    return jax.grad(lambda logs: log_partition(restricted.replace(logs=logs), "max",
                                               parallel_time))(restricted.logs)


def _snap(factors):
    """The log-factors rounded to multiples of a power of two so small that every sum along a
    configuration is exact in floating point.

    The gradient of a max goes to the entries EQUAL to it. Under jit, XLA may add the same terms
    in another order or fusion than the forward pass did; with inexact sums no entry then equals
    the max and the weights vanish (seen on a Poisson HMM of 107 steps: a broken Viterbi path).
    With exact sums every order gives the same bits. The grid is 2^-(mantissa bits - 2) of a
    bound on |any configuration's log-density|: in float64 an error of ~1e-16 relative; in
    float32 ~1e-7 relative, the precision that float32 sums have anyway.
    """
    finfo = jnp.finfo(factors.dtype)
    # below: stand-ins for log 0 (see factors._absent_where_masked; users write e.g. -1e30),
    # kept as is; no real log-density of one configuration is that small
    cut = -1e15
    bound = jnp.ones((), factors.dtype)
    for meta in factors.metas:
        a = jnp.asarray(factors.logs[meta.name])
        a = jnp.where(jnp.isfinite(a) & (a > cut), jnp.abs(a), 0.0)
        enumerated = tuple(d for d, n in meta.dim_to_name
                           if n not in meta.plates and n != meta.time and -d <= a.ndim)
        if enumerated:
            a = jnp.max(a, axis=enumerated)
        bound = bound + jnp.sum(a)
    q = 2.0 ** (jnp.ceil(jnp.log2(bound)) - (finfo.nmant - 2)).astype(factors.dtype)
    snapped = {k: jnp.where(jnp.isfinite(a) & (a > cut), jnp.round(a / q) * q, a)
               for k, a in factors.logs.items()}
    # one materialisation: every consumer sees the same bits
    return jax.lax.optimization_barrier(snapped)


def site_marginal(weight: Array, meta: FactorMeta, plate_order: tuple) -> Array:
    """Posterior marginal of latent site `meta.name` from the weights of its own factor.

    Sums out the other enumerated dims (parents) and normalises over the site's values (weights
    of weighted plates scale the factor's weights); returns an array with the site's time dim
    (for sites inside `scan`), then its plates in `plate_order` (outermost first), then its
    values.
    """
    w = funsor.to_funsor(weight, output=funsor.Real, dim_to_name=OrderedDict(meta.dim_to_name))
    times = [meta.time] if meta.time in w.inputs else []
    own = times + [n for n in plate_order if n in w.inputs] + [meta.name]
    others = frozenset(w.inputs) - frozenset(own)
    if others:
        w = w.reduce(npi.add, others)
    w = w.align(tuple(n for n in own if n in w.inputs)).data
    total = jnp.sum(w, axis=-1, keepdims=True)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1), w)


def chain_marginals(weights: dict, metas: tuple, name: str, plate_order: tuple) -> Array:
    """Marginals of latent `name` over its whole chain: the factors of the first steps of a
    `scan` (`meta.step` > 0) are stacked before the time-stacked factor `name`."""
    by_name = {m.name: m for m in metas}
    firsts = sorted((m for m in metas if m.site == name and m.step > 0), key=lambda m: -m.step)
    parts = [site_marginal(weights[m.name], m, plate_order)[None] for m in firsts]
    if name not in by_name:  # a chain of one step: its first step only
        return jnp.concatenate(parts, axis=0)
    own = site_marginal(weights[name], by_name[name], plate_order)
    if not parts:
        return own
    if own.ndim < parts[0].ndim:  # one step after the first: no time dim
        own = own[None]
    return jnp.concatenate(parts + [own], axis=0)


def latent_posterior(problem: EMProblem, params: dict, data: tuple) -> dict:
    """Posterior marginal of every latent site: plates first, then the site's values.

    A latent whose factor is constant over the steps of a vectorised `scan` has weights summed
    over time; its marginal at each step comes from a zero "probe" factor over (time, plates,
    latent), whose weight is exactly that marginal.
    """
    fs = factors(problem, params, data, vectorized=True)
    # impossible configurations (log f = −∞, a zero transition) as a finite log-density whose
    # exp is exactly 0: the marginals are the same, and their gradients free of ∞ · 0 = NaN
    fs = fs.replace(logs={k: jnp.where(a == -jnp.inf, 4 * jnp.log(jnp.finfo(a.dtype).tiny), a)
                          if jnp.issubdtype(a.dtype, jnp.floating) else a
                          for k, a in fs.logs.items()})
    weights, metas = _probed_weights(problem, fs, "sum")
    order = problem.sites.plate_order
    return {n: chain_marginals(weights, metas, n, order) for n in problem.sites.latents}


def _probed_weights(problem: EMProblem, fs: Factors, semiring: str):
    """`(weights, metas)`: the weights of `fs` with, for every latent whose factor is
    constant over time, the time-resolved weight of its probe (`_time_probes`) in place of
    its own, and the probes' metas in place of the latents'."""
    probes = _time_probes(fs, set(problem.sites.latents))
    probed = fs.extend([m._replace(name="probe:" + m.name) for m, _ in probes.values()],
                       {"probe:" + n: a for n, (_, a) in probes.items()})
    _, weights = posterior_weights(probed, semiring, problem.parallel_time)
    for name in probes:
        weights[name] = weights["probe:" + name]
    metas = tuple(probes[m.name][0] if m.name in probes else m for m in fs.metas)
    return weights, metas


def _time_probes(fs, latents):
    """{site: (meta, zeros)} for every latent whose factor has a size-1 time dim: a zero factor
    over the site's time dim (full length), plates and own values (observed: not summed)."""
    sizes = fs.time_sizes()
    probes = {}
    for m in fs.metas:
        if m.name not in latents or m.time is None:
            continue
        time = m.names[m.time]
        if m.shape[time] != 1 or sizes[m.time] == 1:
            continue
        keep = {d for d, n in m.dim_to_name if n == m.name or n in m.plates}
        nd = len(m.shape)
        shape = tuple(sizes[m.time] if i - nd == time else (s if i - nd in keep else 1)
                      for i, s in enumerate(m.shape))
        dim_to_name = tuple((d, n) for d, n in m.dim_to_name if d == time or d in keep)
        meta = m._replace(dim_to_name=dim_to_name, is_observed=True, shape=shape,
                          lags=tuple(lag for lag in m.lags if lag[0] in dict(dim_to_name).values()))
        probes[m.name] = (meta, jnp.zeros(shape, jnp.result_type(fs.logs[m.name])))
    return probes


def most_probable(problem: EMProblem, params: dict, data: tuple) -> dict:
    """The jointly most probable value of every latent site (max-product; among tied optima one
    is chosen: by the back-pointers' first-index rule in Markov chains, else by a fixed random
    tie-break, see `_one_optimum`)."""
    fs = max_product_factors(problem, params, data)
    weights, metas = _probed_weights(problem, fs, "max")
    order = problem.sites.plate_order
    return {n: jnp.argmax(chain_marginals(weights, metas, n, order), axis=-1)
            for n in problem.sites.latents}


def symmetric_latents(problem: EMProblem, weights: dict, params: dict, data: tuple,
                      rtol: float = 1e-6, metas: tuple | None = None) -> Array:
    """Whether two values of some latent have the same posterior (within `rtol`) wherever it
    has mass: their parameters cannot be told apart, the symmetric point EM cannot leave (a
    saddle of the objective, e.g. two mixture components with equal parameters). Compared by
    two fixed pseudo-random projections of each value's posterior weights. `metas`: those of the
    E-step's factors, if known (else traced again)."""
    if metas is None:
        metas = (max_product_factors(problem, params, data) if problem.hard  # shapes only
                 else factors(problem, params, data, vectorized=True)).metas
    latents = set(problem.sites.latents)
    found = jnp.zeros((), bool)
    for m in metas:
        own = [d for d, n in m.dim_to_name if n == m.name]
        w = weights.get(m.name)
        if m.name not in latents or not own or w is None or jnp.ndim(w) != len(m.shape):
            continue
        w = jnp.moveaxis(w, len(m.shape) + own[0], 0).reshape(m.shape[own[0]], -1)
        if w.shape[0] < 2:
            continue
        sig = w @ projections(w.shape[1], w.dtype).T  # (K, 2): positive where a value has mass
        close = jnp.abs(sig[:, None, :] - sig[None, :, :]) <= rtol * jnp.maximum(
            sig[:, None, :], sig[None, :, :])
        pair = jnp.all(close, -1) & (sig[:, None, 0] > 0) & (sig[None, :, 0] > 0)
        pair = pair & ~jnp.eye(w.shape[0], dtype=bool)
        found = found | jnp.any(pair)
    return found


def projections(n: int, dtype, offset=0) -> Array:
    """Two fixed pseudo-random vectors of length `n` with entries in [0.5, 1): an integer hash
    of (projection, `offset` + entry) (a Weyl step and a 32-bit finaliser), so that a compiled
    fit holds no random-number generator (JAX's Threefry is a loop of its own on CPU)."""
    entry = lax.iota(jnp.uint32, n) + jnp.asarray(offset).astype(jnp.uint32)
    u = (entry[None, :] * jnp.uint32(0x9E3779B9)
         + (jnp.arange(1, 3, dtype=jnp.uint32) * jnp.uint32(0x85EBCA6B))[:, None])
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        u = (u ^ (u >> shift)) * jnp.uint32(factor)
    u = u ^ (u >> 16)
    return 0.5 + (u >> 9).astype(dtype) * (0.5 / 2**23)  # 23 bits: exact in float32 too
