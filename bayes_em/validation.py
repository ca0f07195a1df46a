"""Input validation done by bayes_em itself, before a fit, naming the argument or site.

NumPyro's own checks are `assert` statements (gone under `python -O`) or broadcasting errors
that name no site; JAX's tracer errors point into bayes_em's code. Everything here raises a
[`ModelError`][bayes_em.validation.ModelError] (a `ValueError`) or `TypeError` that says what is
wrong and where.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.primitives import Messenger

from bayes_em._numpyro import control_flow_done

__all__ = ["ModelError", "SiteRecorder", "traced_model_error", "check_options", "check_arguments",
           "check_observed_shape"]


def _base_fn(fn):
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


class ModelError(ValueError):
    """The model or its inputs cannot be fitted by EM; the message names the site."""


class SiteRecorder(Messenger):
    """Remembers the site being traced (for error messages) and refuses duplicate site names
    (NumPyro only asserts it)."""

    def __init__(self, fn=None, fixed=()):
        super().__init__(fn)
        self.last = None
        self.seen = set()
        self.fixed = set(fixed)

    def process_message(self, msg):
        # entered outermost, this handler sees each site last: a value already set on a
        # parameter or latent came from a handler inside the model (handlers.substitute)
        name = msg.get("name")
        substituted = msg["type"] == "param" or (
            msg["type"] == "sample" and not msg.get("is_observed")
            and not isinstance(_base_fn(msg.get("fn")), dist.ImproperUniform))
        if (substituted and msg.get("value") is not None and name not in self.fixed
                and not control_flow_done(msg)):  # a scan replays its body's values
            raise ModelError(
                f"Site '{name}' is given a value inside the model (numpyro.handlers.substitute): "
                f"EM would fit it all the same and ignore that value. Hold it with "
                f"EM(model, fixed={{'{name}': value}}) instead.")
        if msg["type"] in ("sample", "param", "deterministic") and name is not None:
            if name in self.seen and msg["type"] != "param":
                raise ModelError(f"Two sites of the model are named '{name}': every sample, "
                                 "param and deterministic site needs its own name.")
            self.seen.add(name)
            self.last = name


_TRACER_ERRORS = tuple(getattr(jax.errors, n) for n in (
    "ConcretizationTypeError", "TracerBoolConversionError", "TracerIntegerConversionError",
    "TracerArrayConversionError"))


def traced_model_error(err, recorder):
    """A clear error for an exception raised while tracing the model, or None to re-raise."""
    where = f" after site '{recorder.last}'" if recorder.last else ""
    if isinstance(err, _TRACER_ERRORS):
        return ModelError(
            f"The model uses the value of a traced array as a Python value{where} "
            f"({type(err).__name__}): bayes_em enumerates latents and traces the model with "
            "JAX, so a latent or parameter cannot drive a Python `if`, `int()`, `float()` or a "
            "NumPy function. Use jnp.where / lax.cond, index with the array itself "
            "(`loc[z]`), and jnp instead of np on model values.")
    text = str(err)
    if isinstance(err, AssertionError):  # NumPyro's own checks (absent under python -O)
        return ModelError(f"NumPyro refused the model{where}: {text or 'an assertion failed'}.")
    if isinstance(err, (ValueError, TypeError)) and ("shapes" in text or "broadcast" in text):
        return ModelError(
            f"Shapes do not fit{where}: {text.splitlines()[0]} Check that each observed array "
            "has one entry per element of its plates (no extra size-1 dimensions, e.g. (N,) "
            "rather than (N, 1) for a univariate site) and that plate sizes match the data.")
    return None


def _real(name, value, low=None, positive=False, finite=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} "
                        f"({type(value).__name__}).")
    value = float(value)
    if (finite and not math.isfinite(value)) or math.isnan(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}.")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    return value


def check_options(tol, memory_limit, restart_noise, init_values, fixed, missing, *,
                  restarts=1, max_iter=1, mstep=None, init="anchors", inits=("anchors",)):
    """Types and ranges of the EM options."""
    from bayes_em.lbfgs import LBFGS

    if not isinstance(restarts, (int, np.integer)) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}.")
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
    if mstep is not None and (not isinstance(mstep, LBFGS) or mstep.max_steps < 1):
        raise ValueError(f"mstep must be an LBFGS(...) with max_steps >= 1, got {mstep!r}.")
    if not (callable(init) or init in inits):
        raise ValueError(f"init must be one of {inits} or a callable, got {init!r}.")
    _real("tol", tol, low=0.0)
    _real("memory_limit (bytes)", memory_limit, positive=True, finite=False)
    _real("restart_noise", restart_noise, positive=True)
    for name, value in (("init_values", init_values), ("fixed", fixed)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict of site name -> value, got "
                            f"{type(value).__name__}.")
    if not isinstance(missing, (str, tuple, list)) or not all(
            isinstance(m, str) for m in ((missing,) if isinstance(missing, str) else missing)):
        raise TypeError(f"missing must be a site name or a list of site names, got {missing!r}.")


def _describe(path):
    return "argument " + jax.tree_util.keystr(path) if path else "the argument"


def check_arguments(args, kwargs):
    """Model arguments: no string / object arrays, and no float64 values that a float32 JAX
    turns into ±inf on the way in."""
    leaves = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
    x64 = jax.config.jax_enable_x64
    for path, leaf in leaves:
        if not isinstance(leaf, (np.ndarray, jax.Array)):
            continue
        where = _describe(path[1:]) if path else "an argument"
        if leaf.size == 0:
            raise ModelError(f"Model {where} is empty (shape {leaf.shape}): there is no data to "
                             "fit.")
        kind = np.dtype(leaf.dtype).kind
        if kind in "USOV":
            raise TypeError(f"Model {where} is an array of dtype {leaf.dtype}: bayes_em passes "
                            "array arguments to JAX, which holds numbers only. Encode strings "
                            "as integer codes (e.g. np.unique(..., return_inverse=True)).")
        if not x64 and isinstance(leaf, np.ndarray) and leaf.dtype == np.float64:
            big = np.abs(leaf[np.isfinite(leaf)]).max(initial=0.0)
            if big > np.finfo(np.float32).max:
                raise ModelError(
                    f"Model {where} holds values up to {big:.3g}, beyond float32's range: JAX "
                    "runs in float32 here and would turn them into inf. Rescale the data, or "
                    'enable float64 with jax.config.update("jax_enable_x64", True).')


def check_observed_shape(name, value, fn, frames):
    """An observed array must have one entry per element of each plate it lies in: a length-1
    (or missing) dimension broadcast over a plate of size > 1 is refused, naming site and plate."""
    shape = jnp.shape(value)
    batch = shape[: len(shape) - fn.event_dim]
    if jnp.dtype(jnp.result_type(value)) == jnp.bool_ and not fn.support.is_discrete:
        raise ModelError(f"Observed site '{name}' has boolean data but a continuous "
                         f"distribution ({type(fn).__name__}); convert the data to floats.")
    for frame in frames:
        if frame.size == 0:
            raise ModelError(f"Plate '{frame.name}' is empty: there is no data to fit.")
        if frame.dim is None or frame.size == 1:
            continue
        pos = len(batch) + frame.dim
        size = batch[pos] if pos >= 0 else None
        if size != frame.size:
            got = "no dimension" if size is None else f"size {size}"
            raise ModelError(
                f"Observed site '{name}' has shape {shape}: {got} at dim {frame.dim}, where it "
                f"lies in plate '{frame.name}' of size {frame.size}. Pass one value per plate "
                "element (a size-1 array would be broadcast silently, counting one observation "
                f"{frame.size} times).")
