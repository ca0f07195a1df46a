"""Site roles: trace the model once and sort its sites into parameters, latents and data.

- `numpyro.param`                                  → ML parameter (no prior)
- continuous `numpyro.sample` without `obs`      → MAP parameter (its prior enters the M-step)
- discrete `numpyro.sample` without `obs`        → latent, enumerated exactly
- `numpyro.sample` with `obs`                    → data
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.handlers import seed, substitute, trace

from bayes_em._numpyro import control_flow_done, mask_of, validation_enabled
from bayes_em.compiled import jit, quick
from bayes_em.validation import ModelError, SiteRecorder, check_observed_shape, traced_model_error

__all__ = ["ParamSite", "ModelSites", "ModelError", "discover_sites"]


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

    Returns `(data, rebuild, key)`: `rebuild(data) -> (args, kwargs)` and a hashable key of
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


# model -> {(static key, data shapes, init shapes, fixed): (jitted trace, box with its trace)};
# weakly keyed (a model function is not kept alive), and keyed on shapes so that a model whose
# structure depends on the data's shape never reads a trace made for other shapes
_TRACERS = weakref.WeakKeyDictionary()


def _traced_values(model, data, rebuild, key, init_values, rng_key, fixed):
    """Trace the model once under jit; return (trace with static site info, numbers).

    numbers[name] = (value, in_support) for parameters (`init_values` or the declared init;
    the prior mean or median for MAP sites) and (number of non-finite entries,) for observed
    float sites. One compilation instead of many eager operations.
    """
    shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in data)
    init_shapes = tuple(sorted((k, jnp.shape(v)) for k, v in init_values.items()))
    cache_key = (key, shapes, init_shapes, tuple(sorted(fixed)))
    try:
        cache = _TRACERS.setdefault(model, {})
    except TypeError:  # not weakly referenceable: no reuse
        cache = {}
    if cache_key not in cache:
        box = {}
        try:  # the cached program must not keep its own key (the model) alive
            model_ref = weakref.ref(model)
        except TypeError:
            model_ref = lambda m=model: m  # noqa: E731

        def traced(data, init_values, rng_key):
            model = model_ref()
            key_model, key_init = jax.random.split(rng_key)
            args, kwargs = rebuild(data)
            # NumPyro would check distribution arguments built from constants eagerly, one small
            # XLA compilation per check (0.6 s for a mixture's covariances); the values that
            # matter are checked below inside this compiled trace, the rest by the initial density
            recorder = box["recorder"] = SiteRecorder(fixed=fixed)
            with validation_enabled(False), recorder:
                traced = trace(seed(substitute(model, substitute_fn=_placeholder), key_model))
                tr = traced.get_trace(*args, **kwargs)
            box["trace"] = tr
            return _numbers(tr, init_values, fixed, key_init)

        try:
            hash(cache_key)
            cache[cache_key] = (jit(traced, quick=quick(*data)), box)
        except TypeError:
            return _traced_values_uncached(traced, box, data, init_values, rng_key)
    fn, box = cache[cache_key]
    numbers = _run_traced(fn, box, data, init_values, rng_key)
    return box["trace"], numbers


def _numbers(tr, init_values, fixed, key):
    """The numbers `_traced_values` returns, computed inside its compiled trace."""
    out = {}
    for name, site in tr.items():
        if site["type"] == "param" and name not in fixed:
            constraint = site["kwargs"].get("constraint", constraints.real)
            value = jnp.asarray(init_values.get(name, site["value"]))
            _check_shape("init_values", name, value, jnp.shape(site["value"]))
            out[name] = (value, constraint(value))
            out.update(_concrete_support(name, constraint))
        elif site["type"] == "param":  # held fixed: its value must be in the support
            constraint = site["kwargs"].get("constraint", constraints.real)
            out[name] = (site["value"], constraint(site["value"]))
        elif site["type"] == "sample" and site["is_observed"]:
            value = site["value"]
            if not control_flow_done(site):
                check_observed_shape(name, value, site["fn"], site.get("cond_indep_stack", ()))
            nonfinite = jnp.zeros((), jnp.int32)
            if jnp.issubdtype(jnp.result_type(value), jnp.inexact):
                nonfinite = jnp.sum(~jnp.isfinite(value))
            out[name] = (nonfinite, _outside_support(site["fn"], value))
        elif site["type"] == "sample" and not site["fn"].support.is_discrete:
            if isinstance(_base(site["fn"]), dist.ImproperUniform):
                continue
            key, sub = jax.random.split(key)
            value = init_values.get(name)
            if value is not None:
                _check_shape("init_values", name, value, site["fn"].shape())
            value = _map_init(site["fn"], sub) if value is None else jnp.asarray(value)
            out[name] = (value, site["fn"].support(value))
            out.update(_concrete_support(name, site["fn"].support))
    return out


SUPPORT = "@support:"


def _concrete_support(name, constraint):
    """A constraint with array arguments (`Uniform(low, high)`'s interval) is traced inside the
    compiled trace: returned as an output of it, so the site records concrete values (a tracer
    must never reach a public result). Parameter-free constraints stay the singletons they are."""
    return {SUPPORT + name: constraint} if jax.tree.leaves(constraint) else {}


def _traced_values_uncached(traced, box, data, init_values, rng_key):
    fn = jit(traced, quick=quick(*data))
    numbers = _run_traced(fn, box, data, init_values, rng_key)
    return box["trace"], numbers


def _run_traced(fn, box, data, init_values, rng_key):
    try:
        return jax.device_get(fn(data, init_values, rng_key))
    except ModelError:
        raise
    except Exception as err:  # name the site being traced, say what to do
        clear = traced_model_error(err, box.get("recorder") or SiteRecorder())
        if clear is None:
            raise
        raise clear from err


def _outside_support(fn, value):
    """Entries of an observed value outside its distribution's support (masked ones excepted)."""
    support = fn.support
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    bounds = [v for v in vars(support).values() if isinstance(v, (jax.Array, np.ndarray))]
    if isinstance(_base(fn), dist.Unit) or bounds:
        # numpyro.factor has no data; a support bounded by parameters (Uniform(0, high[z]))
        # is the initial density check's to report
        return jnp.zeros((), jnp.int32)
    ok = fn.support(value)
    extra = jnp.ndim(ok) - len(fn.batch_shape)
    if extra > 0:  # an event the constraint checks entrywise
        ok = jnp.all(ok, axis=tuple(range(-extra, 0)))
    mask = mask_of(fn)
    if isinstance(fn, dist.MaskedDistribution) and mask is not None and mask is not True:
        ok = ok | ~jnp.broadcast_to(jnp.asarray(mask, bool), jnp.shape(ok))
    return jnp.sum(~ok)


def _check_shape(option, name, value, shape):
    if tuple(jnp.shape(value)) != tuple(shape):
        raise ModelError(f"{option}['{name}'] has shape {tuple(jnp.shape(value))}, but site "
                         f"'{name}' has shape {tuple(shape)}.")


def _check_value(name, constraint, value, ok):
    if not np.all(ok) or not np.all(np.isfinite(value)):
        raise ModelError(
            f"Initial value of site '{name}' lies outside its support {constraint}: {value}."
        )


def discover_sites(model, args, kwargs, init_values=None, rng_key=None, fixed=()):
    """Trace `model` once (seeded, no enumeration) and return its `ModelSites`.

    Raises [`ModelError`][bayes_em.validation.ModelError] on non-finite data, an unusable site or an
    invalid initial value.
    """
    init_values = {k: jnp.asarray(v) for k, v in dict(init_values or {}).items()}
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    data, rebuild, key = split_data(args, kwargs)
    tr, numbers = _traced_values(model, data, rebuild, key, init_values, rng_key, fixed)

    params, latents, observed, dims = [], [], [], {}
    for name, site in tr.items():
        _check_subsample(name, site)
        for frame in site.get("cond_indep_stack", ()):
            if frame.dim is not None:
                dims[frame.name] = frame.dim
        role = _role(name, site, numbers, fixed)
        if isinstance(role, ParamSite):
            params.append(role)
        elif role == "latent":
            latents.append(name)
        elif role == "observed":
            observed.append(name)

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


def _check_subsample(name, site):
    """EM reads every row at every iteration: a subsampling plate is refused, with the routes
    that do use part of the rows."""
    if site["type"] != "plate":
        return
    size, subsample_size = site["args"][:2]
    if subsample_size is not None and subsample_size < size:
        raise ModelError(
            f"Plate '{name}' subsamples {subsample_size} of its {size} rows (subsample_size=): "
            "EM takes every row at every iteration. Drop subsample_size and fit all rows with "
            "EM (chunk_size=C keeps memory O(C)), or fit in minibatches with "
            "bayes_em.OnlineEM(model, n_total=N) and update(state, batch) per batch of rows.")


def _role(name, site, numbers, fixed):
    """A site's role: its `ParamSite`, `"latent"`, `"observed"` or None (held
    fixed, or not a sample or param site); raises [`ModelError`][bayes_em.validation.ModelError] on
    what EM cannot fit."""
    if site["type"] == "param" and name in fixed:
        if name in numbers:
            value, ok = numbers[name]
            if not np.all(ok) or not np.all(np.isfinite(value)):
                raise ModelError(f"fixed['{name}'] lies outside the support of site "
                                 f"'{name}': {value}.")
        return None
    if site["type"] == "param":
        if control_flow_done(site):
            raise ModelError(
                f"Parameter site '{name}' is declared inside the body of a NumPyro scan; declare "
                "numpyro.param sites outside the scanned function (the body can use them by "
                "closure)."
            )
        constraint = numbers.get(SUPPORT + name, site["kwargs"].get("constraint", constraints.real))
        value, ok = numbers[name]
        _check_value(name, constraint, value, ok)
        return ParamSite(name, "param", constraint, value)
    if site["type"] != "sample":
        return None
    fn = _base(site["fn"])
    if site["is_observed"]:
        bad, outside = (int(n) for n in numbers[name]) if name in numbers else (0, 0)
        if bad:
            raise ModelError(
                f"Observed site '{name}' has {bad} NaN or infinite value(s); remove them, mask "
                f"them out with numpyro.handlers.mask, or marginalise NaNs with "
                f"EM(..., missing=('{name}',))."
            )
        if outside:
            raise ModelError(
                f"Observed site '{name}' has {outside} value(s) outside the support "
                f"{site['fn'].support} of its {type(fn).__name__} distribution."
            )
        return "observed"
    if site["fn"].support.is_discrete:
        if not site["fn"].has_enumerate_support:
            raise ModelError(
                f"Discrete latent site '{name}' ({type(fn).__name__}) has no finite support to "
                "enumerate; EM needs latents such as Categorical or Bernoulli."
            )
        return "latent"
    if isinstance(fn, dist.ImproperUniform):
        raise ModelError(
            f"Continuous site '{name}' has no prior (ImproperUniform): declare it with "
            "numpyro.param for maximum likelihood, or give it a proper prior."
        )
    value, ok = numbers[name]
    support = numbers.get(SUPPORT + name, site["fn"].support)
    _check_value(name, support, value, ok)
    return ParamSite(name, "map", support, value)
