"""Site roles: trace the model once and sort its sites into parameters, latents and data.

- ``numpyro.param``                                  → ML parameter (no prior)
- continuous ``numpyro.sample`` without ``obs``      → MAP parameter (its prior enters the M-step)
- discrete ``numpyro.sample`` without ``obs``        → latent, enumerated exactly
- ``numpyro.sample`` with ``obs``                    → data
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.distribution import validation_enabled
from numpyro.handlers import seed, substitute, trace

from bayes_em.compiled import jit

__all__ = ["ParamSite", "ModelSites", "ModelError", "discover_sites"]


class ModelError(ValueError):
    """The model or its inputs cannot be fitted by EM; the message names the site."""


class ParamSite(NamedTuple):
    name: str
    kind: str  # "param" (maximum likelihood) or "map" (point estimate under its prior)
    constraint: Any
    init: Any  # constrained initial value


class ModelSites(NamedTuple):
    params: tuple  # ParamSite, in model order
    latents: tuple  # names of the enumerated discrete latent sites
    observed: tuple  # names of observed sites
    plate_order: tuple  # plate names, outermost (most negative dim) first
    max_plate_nesting: int

    @property
    def param_names(self):
        return tuple(p.name for p in self.params)


def _map_init(fn, rng_key):
    """A deterministic start for a MAP site: its prior mean if finite and in the support, else
    the median of 15 prior draws (traced: runs inside jit)."""
    draws = fn.sample(rng_key, (15,))
    median = jnp.median(draws, axis=0)
    try:
        mean = jnp.broadcast_to(fn.mean, fn.shape())
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return median
    ok = jnp.all(jnp.isfinite(mean)) & jnp.all(fn.support(mean))
    return jnp.where(ok, mean, median)


def _base(fn):
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _placeholder(msg):
    """A value for sites that cannot be sampled (improper priors), so that tracing goes on."""
    if msg["type"] == "sample" and isinstance(_base(msg["fn"]), dist.ImproperUniform):
        return jnp.zeros(msg["fn"].shape())
    return None


def split_data(args, kwargs):
    """Array leaves of (args, kwargs) are data (jit arguments); everything else is static.

    Returns ``(data, rebuild, key)``: ``rebuild(data) -> (args, kwargs)`` and a hashable key of
    the static part (a fresh object when it is unhashable).
    """
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = tuple(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)
    data = [x for x, d in zip(leaves, dynamic) if d]
    static = tuple(None if d else x for x, d in zip(leaves, dynamic))

    def rebuild(data_leaves):
        it = iter(data_leaves)
        return jax.tree.unflatten(treedef, [next(it) if d else s for s, d in zip(static, dynamic)])

    try:
        key = hash((treedef, static, dynamic))
        key = (treedef, static, dynamic)
    except TypeError:  # unhashable static argument: no reuse of compiled code
        key = object()
    return data, rebuild, key


_TRACERS = {}  # (model, static key, fixed) -> (jitted trace, box holding the last trace)


def _traced_values(model, data, rebuild, key, init_values, rng_key, fixed):
    """Trace the model once under jit; return (trace with static site info, numbers).

    numbers[name] = (value, in_support) for parameters (``init_values`` or the declared init;
    the prior mean or median for MAP sites) and (number of non-finite entries,) for observed
    float sites. One compilation instead of many eager operations.
    """
    cache_key = (model, key, tuple(sorted(fixed)))
    if cache_key not in _TRACERS:
        box = {}

        def traced(data, init_values, rng_key):
            key_model, key_init = jax.random.split(rng_key)
            args, kwargs = rebuild(data)
            # NumPyro would check distribution arguments built from constants eagerly, one small
            # XLA compilation per check (0.6 s for a mixture's covariances); the values that
            # matter are checked below inside this compiled trace, the rest by the initial density
            with validation_enabled(False):
                tr = trace(seed(substitute(model, substitute_fn=_placeholder), key_model)).get_trace(
                    *args, **kwargs
                )
            box["trace"] = tr
            out = {}
            for name, site in tr.items():
                if site["type"] == "param" and name not in fixed:
                    constraint = site["kwargs"].get("constraint", constraints.real)
                    value = jnp.asarray(init_values.get(name, site["value"]))
                    out[name] = (value, constraint(value))
                elif site["type"] == "sample" and site["is_observed"]:
                    value = site["value"]
                    if jnp.issubdtype(jnp.result_type(value), jnp.inexact):
                        out[name] = (jnp.sum(~jnp.isfinite(value)),)
                elif site["type"] == "sample" and not site["fn"].support.is_discrete:
                    if isinstance(_base(site["fn"]), dist.ImproperUniform):
                        continue
                    key_init, sub = jax.random.split(key_init)
                    value = init_values.get(name)
                    value = _map_init(site["fn"], sub) if value is None else jnp.asarray(value)
                    out[name] = (value, site["fn"].support(value))
            return out

        try:
            hash(cache_key)
            _TRACERS[cache_key] = (jit(traced), box)
        except TypeError:
            return _traced_values_uncached(traced, box, data, init_values, rng_key)
    fn, box = _TRACERS[cache_key]
    numbers = jax.device_get(fn(data, init_values, rng_key))
    return box["trace"], numbers


def _traced_values_uncached(traced, box, data, init_values, rng_key):
    numbers = jax.device_get(jit(traced)(data, init_values, rng_key))
    return box["trace"], numbers


def _check_value(name, constraint, value, ok):
    if not np.all(ok) or not np.all(np.isfinite(value)):
        raise ModelError(
            f"Initial value of site '{name}' lies outside its support {constraint}: {value}."
        )


def discover_sites(model, args, kwargs, init_values=None, rng_key=None, fixed=()):
    """Trace ``model`` once (seeded, no enumeration) and return its :class:`ModelSites`.

    Raises :class:`ModelError` on non-finite data, an unusable site or an invalid initial value.
    """
    init_values = {k: jnp.asarray(v) for k, v in dict(init_values or {}).items()}
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    data, rebuild, key = split_data(args, kwargs)
    tr, numbers = _traced_values(model, data, rebuild, key, init_values, rng_key, fixed)

    params, latents, observed, dims = [], [], [], {}
    for name, site in tr.items():
        for frame in site.get("cond_indep_stack", ()):
            if frame.dim is not None:
                dims[frame.name] = frame.dim
        if site["type"] == "param" and name in fixed:
            continue
        if site["type"] == "param":
            if site.get("_control_flow_done"):
                raise ModelError(
                    f"Parameter site '{name}' is declared inside the body of a "
                    "numpyro.contrib.control_flow scan; declare numpyro.param sites outside the "
                    "scanned function (the body can use them by closure)."
                )
            constraint = site["kwargs"].get("constraint", constraints.real)
            value, ok = numbers[name]
            _check_value(name, constraint, value, ok)
            params.append(ParamSite(name, "param", constraint, value))
        elif site["type"] == "sample":
            fn = _base(site["fn"])
            if site["is_observed"]:
                bad = int(numbers[name][0]) if name in numbers else 0
                if bad:
                    raise ModelError(
                        f"Observed site '{name}' has {bad} NaN or infinite value(s); remove them, "
                        f"mask them out with numpyro.handlers.mask, or marginalise NaNs with "
                        f"EM(..., missing=('{name}',))."
                    )
                observed.append(name)
            elif site["fn"].support.is_discrete:
                if not site["fn"].has_enumerate_support:
                    raise ModelError(
                        f"Discrete latent site '{name}' ({type(fn).__name__}) has no finite "
                        "support to enumerate; EM needs latents such as Categorical or Bernoulli."
                    )
                latents.append(name)
            else:
                if isinstance(fn, dist.ImproperUniform):
                    raise ModelError(
                        f"Continuous site '{name}' has no prior (ImproperUniform): declare it "
                        "with numpyro.param for maximum likelihood, or give it a proper prior."
                    )
                value, ok = numbers[name]
                _check_value(name, site["fn"].support, value, ok)
                params.append(ParamSite(name, "map", site["fn"].support, value))

    unknown_fixed = set(fixed) - set(tr)
    if unknown_fixed:
        raise ModelError(f"fixed names no site of the model: {sorted(unknown_fixed)}.")
    unknown = set(init_values) - {p.name for p in params}
    if unknown:
        raise ModelError(f"init_values names no parameter site of the model: {sorted(unknown)}.")
    if not latents:
        raise ModelError(
            "The model has no discrete latent site (a numpyro.sample without obs= and with "
            "enumerable support, e.g. Categorical); there is nothing for EM to enumerate."
        )
    if not params:
        raise ModelError("The model has no parameter (numpyro.param or a continuous sample site).")
    plate_order = tuple(sorted(dims, key=lambda n: dims[n]))
    max_plate_nesting = -min(dims.values()) if dims else 0
    return ModelSites(
        tuple(params), tuple(latents), tuple(observed), plate_order, max_plate_nesting
    )
