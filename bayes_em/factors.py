"""The one enumerated trace: a model's log-factor arrays and their static description.

A model traced under NumPyro's parallel enumeration gives one log-factor array `log f` per
sample site, one entry per enumerated value and plate index; their sum-product is

    log Z(θ) = log Σ_Z Π_f f(Z; θ) = log p(X | θ) + log p(θ).

[`Factors`][bayes_em.factors.Factors] holds the arrays (a pytree: they can be differentiated, which
gives the E-step's weights) with one hashable [`FactorMeta`][bayes_em.factors.FactorMeta] each, and
the per-element weights of weighted plates as a field. NumPyro's naming of Markov dims (`_PREV_z`,
`_time_z`) is read here once, into the metas' `time` and `lags`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, NamedTuple

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
from bayes_em.vectorized_scan import TIME_NAME, vectorize_scan

__all__ = ["FactorMeta", "Factors", "enumerated_model", "log_factors", "is_plate_weight",
           "plates_of"]


class FactorMeta(NamedTuple):
    """Static description of one log-factor array (hashable, carries no arrays).

    `dim_to_name` maps the array's dims (negative, from the right) to funsor names: plates,
    enumerated latents, and for a `scan` its time dim `time` and the previous-step values
    `lags` (`(dim name, site, steps back)`). `site` is the model site (a `scan`'s first
    steps are separate factors of the same site, `step` > 0 of them before the stacked rest).
    """

    name: str
    dim_to_name: tuple  # ((dim, name), ...) as in NumPyro's packed trace
    is_observed: bool
    plates: frozenset  # names of the plates the site sits in
    shape: tuple
    time: str | None = None  # the Markov time dim it is stacked along (scan), if any
    lags: tuple = ()  # ((dim name, site, shift), ...): dims holding a previous step's value
    site: str = ""  # the model site ("" for factors that are not a site's: probes, anchors)
    step: int = 0  # first steps of a scan: how many steps before the time-stacked factor

    @property
    def names(self) -> dict:
        """{funsor name: dim}"""
        return {n: d for d, n in self.dim_to_name}


@dataclasses.dataclass(frozen=True)
class Factors:
    """Log-factor arrays `logs` (one per meta, by name) and plate weights `{plate: w}`
    (element n of the plate counts w_n times); `metas` is static."""

    logs: dict
    metas: tuple
    plate_weights: dict = dataclasses.field(default_factory=dict)

    def replace(self, **changes) -> "Factors":
        return dataclasses.replace(self, **changes)

    def extend(self, metas, logs) -> "Factors":
        """These factors and more (probes, evidence): `metas` and their `logs`."""
        return self.replace(metas=self.metas + tuple(metas), logs={**self.logs, **logs})

    def select(self, names) -> "Factors":
        """The factors named in `names` only (plate weights kept)."""
        names = set(names)
        keep = tuple(m for m in self.metas if m.name in names)
        return self.replace(metas=keep, logs={m.name: self.logs[m.name] for m in keep})

    @property
    def dtype(self):
        return jnp.result_type(*self.logs.values())

    def time_sizes(self) -> dict:
        """{time dim: number of steps}; a factor constant over the steps of a vectorised
        `scan` has a time dim of size 1, so the size is the largest among the factors."""
        return time_sizes(self.metas)


jax.tree_util.register_dataclass(Factors, data_fields=["logs", "plate_weights"],
                                 meta_fields=["metas"])


def time_sizes(metas) -> dict:
    sizes = {}
    for meta in metas:
        if meta.time is not None:
            dim = meta.names[meta.time]
            sizes[meta.time] = max(sizes.get(meta.time, 1), meta.shape[dim])
    return sizes


def enumerated_model(model: Callable, max_plate_nesting: int) -> Callable:
    """`model` with every enumerable discrete latent enumerated in parallel."""
    first_dim = -max_plate_nesting - 1
    return enum(config_enumerate(model), first_available_dim=first_dim)


def plates_of(site) -> set:
    return {f.name for f in site["cond_indep_stack"] if f.dim is not None}


def is_plate_weight(scale) -> bool:
    """A scale with more than one entry weights the elements of a plate (see
    [`log_factors`][bayes_em.factors.log_factors]); a single number scales one factor."""
    return scale is not None and jnp.size(scale) > 1


def log_factors(enum_model: Callable, params: dict, args: tuple, kwargs: dict,
                vectorized: bool = False, observed_values: bool = False):
    """Trace `enum_model` at `params` into [`Factors`][bayes_em.factors.Factors].

    `log f` is the site's (masked) log-density; parameters are substituted at their
    constrained values (no Jacobian enters). Scales (`numpyro.handlers.scale`): a single
    number multiplies `log f` of a site without enumerated latents; per-element weights of a
    plate (shared by every site in it) become `plate_weights`, applied when the contraction
    reduces the plate, after its local latents are summed out (`(Σ_z f)^w ≠ Σ_z f^w`).

    `vectorized`: `scan` bodies are evaluated for all steps at once (`vectorized_scan`);
    a factor constant over time then has a time dim of size 1 (sum-product only: the
    max-product weights of one optimal path need the time-resolved factors).
    `observed_values`: also return `{site: (value, event_dim)}` of the observed sites.
    """
    # NumPyro's argument validation only checks arguments built from constants, eagerly, one
    # small XLA compilation per check; the initial density check covers what it would catch
    with plate_to_enum_plate(), vectorize_scan(vectorized=vectorized), validation_enabled(False):
        tr = packed_trace(substitute(enum_model, data=params)).get_trace(*args, **kwargs)
    logs, metas, weights, values = {}, [], {}, {}
    for site in tr.values():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            values[site["name"]] = (site["value"], site["fn"].event_dim)
        log_prob = _site_log_prob(site)
        dim_to_name = _dims(site, log_prob)
        log_prob = _scaled(site, log_prob, dim_to_name, weights)
        if all(d == 1 for d in jnp.shape(log_prob)) and dim_to_name == OrderedDict():
            log_prob = jnp.squeeze(log_prob)
        logs[site["name"]] = log_prob
        metas.append(_meta(site, dim_to_name, jnp.shape(log_prob)))
    factors = Factors(logs, tuple(metas), _plate_weights(weights, metas))
    return (factors, values) if observed_values else factors


def _site_log_prob(site):
    """The site's log-density at its (enumerated) value: a MAP site's prior on its boundary
    face where it sits there, masked latents absent (`_absent_where_masked`)."""
    fn, value = site["fn"], site["value"]
    discrete = fn.support.is_discrete
    prior = None
    if not site["is_observed"] and not discrete:  # a MAP site's prior
        prior = boundary.prior_log_prob(fn, value)
    if prior is not None:
        log_prob = prior
    elif site["intermediates"]:
        log_prob = fn.log_prob(value, site["intermediates"])
    else:
        log_prob = gaussian.log_prob(fn, value)
    if not site["is_observed"] and discrete and fn.has_enumerate_support:
        log_prob = _absent_where_masked(fn, value, log_prob)
    return log_prob


def _dims(site, log_prob) -> OrderedDict:
    """The site's dim names; a factor constant over the steps of a vectorised scan gets a
    size-1 time dim, the leftmost (the packed trace does not name size-1 dims)."""
    dim_to_name = site["infer"]["dim_to_name"]
    time_name = site["infer"].get(TIME_NAME)
    if time_name is not None and time_name not in dim_to_name.values():
        dim_to_name = OrderedDict([(-jnp.ndim(log_prob), time_name), *dim_to_name.items()])
    return dim_to_name


def _meta(site, dim_to_name, shape) -> FactorMeta:
    names = tuple(dim_to_name.values())
    times = [n for n in names if npi.is_time_dim(n)]
    lags = tuple((n, *npi.markov_site(n)) for n in names if npi.markov_site(n)[1] > 0)
    own, step = npi.markov_site(site["name"])
    return FactorMeta(site["name"], tuple(dim_to_name.items()), bool(site["is_observed"]),
                      frozenset(plates_of(site)), tuple(shape), times[0] if times else None,
                      lags, own, step)


def _scaled(site, log_prob, dim_to_name, weights):
    """`log_prob` times a scalar scale; a per-element plate scale is recorded in `weights`
    (`{plate: (site, w)}`) instead."""
    scale = site["scale"]
    if is_plate_weight(scale):
        plate = _weighted_plate(site, scale, dim_to_name)
        weights.setdefault(plate, (site["name"], jnp.reshape(scale, (-1,)).astype(log_prob.dtype),
                                   set()))[2].add(site["name"])
        return log_prob
    if scale is None or is_identically_one(scale):
        return log_prob
    enumerated = [n for n in dim_to_name.values() if n not in plates_of(site)]
    if enumerated and jnp.ndim(scale) >= 1 and plates_of(site):
        raise NotImplementedError(
            f"Site '{site['name']}' has per-element weights (numpyro.handlers.scale) on a plate "
            "of one element: bayes_em weights the elements of plates with two or more (with one "
            "element, the weight only rescales the likelihood against the prior).")
    if enumerated:
        # (Σ_z f)^s ≠ Σ_z f^s: a scaled factor over an enumerated latent would silently
        # weight the wrong quantity
        raise NotImplementedError(
            f"Site '{site['name']}' is scaled (numpyro.handlers.scale) by one number and depends "
            f"on the enumerated latent(s) {enumerated}; bayes_em weights plate elements (a scale "
            "with one entry per element of a plate, around the whole plate body), not "
            "enumerated factors."
        )
    return scale * log_prob


def _plate_weights(weights, metas) -> dict:
    """`{plate: w}`, checked: every site in a weighted plate carries its weights."""
    for plate, (source, _, carriers) in weights.items():
        for meta in metas:
            if plate in meta.plates and meta.name not in carriers:
                raise ValueError(
                    f"Site '{meta.name}' lies in plate '{plate}', whose elements site '{source}' "
                    "weights (numpyro.handlers.scale), but it does not carry those weights: wrap "
                    f"the whole body of plate '{plate}' in numpyro.handlers.scale(scale=w)."
                )
    return {plate: w for plate, (_, w, _) in weights.items()}


def _weighted_plate(site, scale, dim_to_name):
    """The plate along which `scale` varies: its only dim of size > 1."""
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


def _absent_where_masked(fn, value, log_prob):
    """Make a latent masked out by `numpyro.handlers.mask` absent: a factor of 1.

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
