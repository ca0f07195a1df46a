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
from numpyro.handlers import seed, substitute, trace

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


def _map_init(name, fn, rng_key):
    """A deterministic start for a MAP site: its prior mean if finite, else a sample median."""
    try:
        value = fn.mean
        if bool(jnp.all(jnp.isfinite(value))) and bool(jnp.all(fn.support(value))):
            return jnp.broadcast_to(value, fn.shape())
    except (NotImplementedError, AttributeError, TypeError):
        pass
    draws = fn.sample(rng_key, (15,))
    return jnp.median(draws, axis=0)


def _base(fn):
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _placeholder(msg):
    """A value for sites that cannot be sampled (improper priors), so that tracing goes on."""
    if msg["type"] == "sample" and isinstance(_base(msg["fn"]), dist.ImproperUniform):
        return jnp.zeros(msg["fn"].shape())
    return None


def _check_in_support(name, constraint, value):
    ok = constraint(jnp.asarray(value))
    if not bool(jnp.all(ok)) or not bool(jnp.all(jnp.isfinite(jnp.asarray(value)))):
        raise ModelError(
            f"Initial value of site '{name}' lies outside its support {constraint}: {value}."
        )


def discover_sites(model, args, kwargs, init_values=None, rng_key=None, fixed=()):
    """Trace ``model`` once (seeded, no enumeration) and return its :class:`ModelSites`.

    Raises :class:`ModelError` on non-finite data, an unusable site or an invalid initial value.
    """
    init_values = dict(init_values or {})
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    key_model, key_init = jax.random.split(rng_key)
    tr = trace(seed(substitute(model, substitute_fn=_placeholder), key_model)).get_trace(
        *args, **kwargs
    )

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
            value = jnp.asarray(init_values.get(name, site["value"]))
            _check_in_support(name, constraint, value)
            params.append(ParamSite(name, "param", constraint, value))
        elif site["type"] == "sample":
            fn = _base(site["fn"])
            if site["is_observed"]:
                value = site["value"]
                if jnp.issubdtype(jnp.result_type(value), jnp.inexact) and not bool(
                    jnp.all(jnp.isfinite(value))
                ):
                    bad = int(np.size(value) - np.sum(np.isfinite(np.asarray(value))))
                    raise ModelError(
                        f"Observed site '{name}' has {bad} NaN or infinite value(s); remove them "
                        "or mask them out with numpyro.handlers.mask."
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
                if name in init_values:
                    value = jnp.asarray(init_values[name])
                else:
                    key_init, sub = jax.random.split(key_init)
                    value = _map_init(name, site["fn"], sub)
                _check_in_support(name, site["fn"].support, value)
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
