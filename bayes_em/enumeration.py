"""Exact enumeration of discrete latents: log-factors, log-partition and posterior weights.

A model traced under NumPyro's parallel enumeration gives one log-factor array ``log f`` per
sample site. Their sum-product over enumerated, plate and Markov (time) dims is

    log Z(θ) = log Σ_Z Π_f f(Z; θ) = log p(X | θ) + log p(θ),

and the posterior weights of every factor are ``w_f = ∂ log Z / ∂ log f`` (one reverse-mode pass):
the posterior marginal of the latents in the factor's scope, or 1 for factors without any.

The contraction (:mod:`bayes_em.contraction`) mirrors NumPyro's ``_enum_log_density`` but takes
the log-factor arrays as inputs, so that they can be differentiated. It reuses helpers that NumPyro
keeps private; ``tests/test_enumeration.py`` checks it against brute-force enumeration.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import funsor
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions.util import is_identically_one
from numpyro.handlers import substitute

from bayes_em import _numpyro as npi
from bayes_em import boundary, gaussian
from bayes_em._numpyro import (
    config_enumerate,
    enum,
    packed_trace,
    plate_to_enum_plate,
    validation_enabled,
)
from bayes_em.contraction import (  # noqa: F401 (part of this module's interface)
    WEIGHT,
    _lazy_contraction,
    log_partition,
    pointwise_log_likelihood,
    time_sizes,
)
from bayes_em.vectorized_scan import TIME_NAME, vectorize_scan

__all__ = [
    "FactorMeta",
    "WEIGHT",
    "is_plate_weight",
    "enumerated_model",
    "log_factors",
    "log_partition",
    "posterior_weights",
    "site_marginal",
    "chain_marginals",
    "pointwise_log_likelihood",
    "time_sizes",
]


class FactorMeta(NamedTuple):
    """Static description of one log-factor array (hashable, carries no arrays)."""

    name: str
    dim_to_name: tuple  # ((dim, name), ...) as in NumPyro's packed trace
    is_observed: bool
    plates: frozenset  # names of the plates the site sits in
    shape: tuple


def enumerated_model(model, max_plate_nesting):
    """``model`` with every enumerable discrete latent enumerated in parallel."""
    first_dim = -max_plate_nesting - 1
    return enum(config_enumerate(model), first_available_dim=first_dim)


def _absent_where_masked(fn, value, log_prob):
    """Make a latent masked out by ``numpyro.handlers.mask`` absent: a factor of 1.

    NumPyro gives a masked site log-density 0 for every value, so summing out a masked latent
    multiplies Z by its number of values (log K per masked entry, e.g. per padded time step of a
    sequence). Here a masked latent is pinned to its first value instead (log 1 there, a huge
    negative number elsewhere): its factor then sums and maximises to 1, so log Z and the
    max-product (hard EM, most probable path) are both those of the model without the masked
    entries.
    """
    masks, base = [], fn
    while isinstance(base, (dist.MaskedDistribution, dist.ExpandedDistribution)):
        if isinstance(base, dist.MaskedDistribution) and npi.mask_of(base) is not True:
            masks.append(npi.mask_of(base))
        base = base.base_dist
    if not masks:
        return log_prob
    keep = jnp.ones((), bool)
    for m in masks:
        keep = keep & jnp.asarray(m, bool)
    first = fn.enumerate_support(expand=False)[0]
    is_first = value == first
    if fn.event_dim:
        is_first = jnp.all(is_first, axis=tuple(range(-fn.event_dim, 0)))
    # A finite stand-in for log 0: an all -inf slice would give NaN gradients (posterior weights).
    dtype = jnp.result_type(log_prob)
    absent = jnp.where(is_first, 0.0, jnp.finfo(dtype).min / 1e8).astype(dtype)
    return jnp.where(keep, log_prob, absent)


def plates_of(site):
    return {f.name for f in site["cond_indep_stack"] if f.dim is not None}


# key prefix, in the dict of log-factors, of a plate's per-element weights (not a factor)


def is_plate_weight(scale):
    """A scale with more than one entry weights the elements of a plate (see
    :func:`log_factors`); a single number scales one factor."""
    return scale is not None and jnp.size(scale) > 1


def _weighted_plate(site, scale, dim_to_name):
    """The plate along which ``scale`` varies: its only dim of size > 1."""
    shape = jnp.shape(scale)
    varying = [d - len(shape) for d, n in enumerate(shape) if n > 1]
    names = [dim_to_name.get(d) for d in varying]
    if len(names) != 1 or names[0] not in plates_of(site):
        raise NotImplementedError(
            f"Site '{site['name']}' has a scale of shape {shape} varying along {names}: bayes_em "
            "weights the elements of one plate (numpyro.handlers.scale(scale=w) around the "
            "plate's body, w with one entry per element)."
        )
    return names[0]


def log_factors(enum_model, params, args, kwargs, vectorized=False, observed_values=False):
    """Trace ``enum_model`` at ``params``; return ``({site: log f}, (FactorMeta, ...))``.

    ``log f`` is the site's (masked) log-density, one entry per enumerated value and plate
    index. Parameters are substituted at their constrained values: no Jacobian enters.

    Scales (``numpyro.handlers.scale``): a single number multiplies ``log f`` of a site without
    enumerated latents. Per-element weights ``w`` of a plate (a scale varying along it, shared by
    every site in the plate) count element n ``w_n`` times, latents and all, as if repeated:
    they are returned as ``{WEIGHT + plate: w}`` and applied when the contraction reduces the
    plate, after the latents local to it are summed out (``(Σ_z f)^w ≠ Σ_z f^w``).

    ``vectorized``: ``scan`` bodies are evaluated for all steps at once (``vectorized_scan``);
    a factor that does not vary over time then has a time dim of size 1, and its posterior
    weight is summed over time. Sum-product only: the max-product weights of one optimal path
    need the time-resolved factors.

    ``observed_values``: also return ``{site: (value, event_dim)}`` of the observed sites, the
    value's batch dims aligned (from the right) with those of its log-factor.
    """
    # NumPyro's argument validation only checks arguments built from constants, eagerly, one
    # small XLA compilation per check; the initial density check covers what it would catch
    with plate_to_enum_plate(), vectorize_scan(vectorized=vectorized), validation_enabled(False):
        tr = packed_trace(substitute(enum_model, data=params)).get_trace(*args, **kwargs)
    arrays, metas, weights, scales, values = {}, [], {}, {}, {}
    for site in tr.values():
        if site["type"] != "sample":
            continue
        fn, value = site["fn"], site["value"]
        if site["is_observed"]:
            values[site["name"]] = (value, fn.event_dim)
        prior = None
        if not site["is_observed"] and not fn.support.is_discrete:  # a MAP site's prior
            prior = boundary.prior_log_prob(fn, value)
        if prior is not None:
            log_prob = prior
        elif site["intermediates"]:
            log_prob = fn.log_prob(value, site["intermediates"])
        else:
            log_prob = gaussian.log_prob(fn, value)
        if not site["is_observed"] and fn.support.is_discrete and fn.has_enumerate_support:
            log_prob = _absent_where_masked(fn, value, log_prob)
        scale = site["scale"]
        dim_to_name = site["infer"]["dim_to_name"]
        time_name = site["infer"].get(TIME_NAME)
        if time_name is not None and time_name not in dim_to_name.values():
            # constant over the steps of a vectorised scan: a size-1 time dim, the leftmost
            dim_to_name = OrderedDict([(-jnp.ndim(log_prob), time_name), *dim_to_name.items()])
        if is_plate_weight(scale):
            plate = _weighted_plate(site, scale, dim_to_name)
            scales[site["name"]] = plate
            if plate not in weights:
                weights[plate] = (site["name"], jnp.reshape(scale, (-1,)).astype(log_prob.dtype))
        elif scale is not None and not is_identically_one(scale):
            enumerated = [n for n in dim_to_name.values() if n not in plates_of(site)]
            if enumerated:
                # (Σ_z f)^s ≠ Σ_z f^s: a scaled factor over an enumerated latent would silently
                # weight the wrong quantity
                raise NotImplementedError(
                    f"Site '{site['name']}' is scaled (numpyro.handlers.scale) by one number and "
                    f"depends on the enumerated latent(s) {enumerated}; bayes_em weights plate "
                    "elements (a scale with one entry per element of a plate, around the whole "
                    "plate body), not enumerated factors."
                )
            log_prob = scale * log_prob
        if all(d == 1 for d in jnp.shape(log_prob)) and dim_to_name == OrderedDict():
            log_prob = jnp.squeeze(log_prob)
        arrays[site["name"]] = log_prob
        plates = frozenset(plates_of(site))
        metas.append(
            FactorMeta(
                site["name"],
                tuple(dim_to_name.items()),
                bool(site["is_observed"]),
                plates,
                tuple(jnp.shape(log_prob)),
            )
        )
    for plate, (source, w) in weights.items():
        for meta in metas:
            if plate in meta.plates and scales.get(meta.name) != plate:
                raise ValueError(
                    f"Site '{meta.name}' lies in plate '{plate}', whose elements site '{source}' "
                    "weights (numpyro.handlers.scale), but it does not carry those weights: wrap "
                    f"the whole body of plate '{plate}' in numpyro.handlers.scale(scale=w)."
                )
        arrays[WEIGHT + plate] = w
    if observed_values:
        return arrays, tuple(metas), values
    return arrays, tuple(metas)


def posterior_weights(arrays, metas, semiring="sum", parallel_time=False):
    """``(log Z, {site: ∂ log Z / ∂ log f})``; the weights are posterior marginals of the
    factors' scopes (``"sum"``) or the indicator of one most probable configuration (``"max"``)."""
    plate_weights = {k: v for k, v in arrays.items() if k.startswith(WEIGHT)}
    factors = {k: v for k, v in arrays.items() if k not in plate_weights}
    if semiring == "max":
        factors = _snap(factors, metas)
    log_z, weights = jax.value_and_grad(
        lambda a: log_partition({**a, **plate_weights}, metas, semiring, parallel_time))(factors)
    if semiring == "max":
        weights = _one_optimum(weights, metas, plate_weights, parallel_time)
    return log_z, weights


def _one_optimum(weights, metas, plate_weights, parallel_time=False):
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
    for i, meta in enumerate(metas):
        w = weights[meta.name]
        dtype = jnp.result_type(w)
        a = jnp.where(w > 0, 0.0, jnp.finfo(dtype).min / 1e8).astype(dtype)
        if not meta.is_observed and meta.name in dict(meta.dim_to_name).values():
            a = a + jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(a), dtype)
        restricted[meta.name] = a
    return jax.grad(lambda a: log_partition({**a, **plate_weights}, metas, "max", parallel_time))(
        _snap(restricted, metas))


def _snap(arrays, metas):
    """Round the log-factors to multiples of a power of two so small that every sum along a
    configuration is exact in floating point.

    The gradient of a max goes to the entries EQUAL to it. Under jit, XLA may add the same terms
    in another order or fusion than the forward pass did; with inexact sums no entry then equals
    the max and the weights vanish (seen on a Poisson HMM of 107 steps: a broken Viterbi path).
    With exact sums every order gives the same bits. The grid is 2^-(mantissa bits - 2) of a
    bound on |any configuration's log-density|: in float64 an error of ~1e-16 relative; in
    float32 ~1e-7 relative, the precision that float32 sums have anyway.
    """
    dtype = jnp.result_type(*arrays.values())
    finfo = jnp.finfo(dtype)
    # below: stand-ins for log 0 (see _absent_where_masked; users write e.g. -1e30), kept as is;
    # no real log-density of one configuration is that small
    cut = -1e15
    bound = jnp.ones((), dtype)
    for meta in metas:
        a = jnp.asarray(arrays[meta.name])
        a = jnp.where(jnp.isfinite(a) & (a > cut), jnp.abs(a), 0.0)
        enumerated = tuple(d for d, n in meta.dim_to_name
                           if n not in meta.plates and not n.startswith("_time") and -d <= a.ndim)
        if enumerated:
            a = jnp.max(a, axis=enumerated)
        bound = bound + jnp.sum(a)
    q = 2.0 ** (jnp.ceil(jnp.log2(bound)) - (finfo.nmant - 2)).astype(dtype)
    snapped = {k: jnp.where(jnp.isfinite(a) & (a > cut), jnp.round(a / q) * q, a)
               for k, a in arrays.items()}
    # one materialisation: every consumer sees the same bits
    return jax.lax.optimization_barrier(snapped)


def site_marginal(weight, meta, plate_order):
    """Posterior marginal of latent site ``meta.name`` from the weights of its own factor.

    Sums out the other enumerated dims (parents) and normalises over the site's values (weights
    of weighted plates scale the factor's weights); returns an array with the site's time dim
    (for sites inside ``scan``), then its plates in ``plate_order`` (outermost first), then its
    values.
    """
    w = funsor.to_funsor(weight, output=funsor.Real, dim_to_name=OrderedDict(meta.dim_to_name))
    times = sorted(n for n in w.inputs if n.startswith("_time"))
    own = times + [n for n in plate_order if n in w.inputs] + [meta.name]
    others = frozenset(w.inputs) - frozenset(own)
    if others:
        w = w.reduce(npi.add, others)
    w = w.align(tuple(n for n in own if n in w.inputs)).data
    total = jnp.sum(w, axis=-1, keepdims=True)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1), w)


def chain_marginals(weights, metas, name, plate_order):
    """Marginals of latent ``name`` over its whole chain: the factors of the first steps of a
    ``scan`` (``_PREV_name``, ...) are stacked before the time-stacked factor ``name``."""
    by_name = {m.name: m for m in metas}
    parts = []
    for k in range(8, 0, -1):
        prev = "_PREV_" * k + name
        if prev in by_name:
            meta = by_name[prev]._replace(name=prev)
            parts.append(site_marginal(weights[prev], meta, plate_order)[None])
    if name not in by_name:  # a chain of one step: its first step only
        return jnp.concatenate(parts, axis=0)
    own = site_marginal(weights[name], by_name[name], plate_order)
    if not parts:
        return own
    if own.ndim < parts[0].ndim:  # one step after the first: no time dim
        own = own[None]
    return jnp.concatenate(parts + [own], axis=0)
