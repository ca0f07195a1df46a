"""An [`EMResult`][bayes_em.result.EMResult] on disk: `result.save(path)` and `EMResult.load(path)`.

The file is one NumPy `.npz` archive (a zip of `.npy` arrays) with a JSON metadata entry.
Why this format:

- **nothing to install**: NumPy alone writes and reads it (netCDF needs an HDF5 engine), and
  any language with a zip and `.npy` reader can open it;
- **exact**: every array keeps its dtype and bits (NaN tails of the histories included), so a
  reloaded result equals the saved one entry for entry;
- **no Laplace approximation**: unlike [`bayes_em.diagnostics.save`][bayes_em.inference_data.save]
  (netCDF of the ArviZ `InferenceData`, whose `posterior` group is Laplace draws), it needs no
  positive definite information matrix, so a fit at a saddle or on a boundary saves like any other;
- **safe to open**: no pickle inside; it is read with `allow_pickle=False`, so loading an
  untrusted file runs no code.

What it holds: every site's fitted value, every restart's values, objective, iterations, status
and message, the histories (and `history["params"]` if recorded), the latent posterior and
most probable latents (computed before writing when the result still has its model), the sites,
the fit's settings (`result.settings`: restarts, max_iter, tol, hard, closed_form, ...), the
versions of bayes_em and its stack, and the date. A file records its format version; a file
from a newer format loads with a warning (fields this version does not know are ignored).

A loaded result is like an unpickled one: all the numbers are there; what needs the model or
the data (`predict*`, `score*`, `sample`, the diagnostics) says so. Refit from
`EM(model, init_values=loaded.params)` to get them back.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import pathlib
import platform
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["save", "load", "metadata", "run_settings", "FORMAT", "FORMAT_VERSION"]

FORMAT = "bayes_em.EMResult"
FORMAT_VERSION = 1
_META = "__metadata__"
_PACKAGES = ("bayes_em", "jax", "jaxlib", "numpyro", "funsor", "optax", "arviz", "xarray",
             "numpy")


# -- the fit's settings (recorded by EM.run into result.settings) ---------------------------------
def _describe(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _number(x):
    """A float, or its repr when not finite (JSON has no inf / NaN)."""
    x = float(x)
    return x if np.isfinite(x) else repr(x)


def _model_name(model) -> str:
    """The user's model function, seen through EM's `fixed=` wrapper (a closure over it)."""
    for _ in range(3):
        if not getattr(model, "__qualname__", "").endswith("<locals>.frozen"):
            break
        inner = [c.cell_contents for c in (model.__closure__ or ()) if callable(c.cell_contents)]
        if len(inner) != 1:
            break
        model = inner[0]
    return _describe(model)


def run_settings(em) -> dict:
    """The settings of `em` (an [`bayes_em.EM`][bayes_em.api.EM]) as plain data: numbers, strings,
    lists, and NumPy arrays for `fixed` / `init_values` (a callable `init` is kept by name)."""
    mstep = em.mstep
    return {
        "model": _model_name(getattr(em, "_unmarginalized", em.model)),
        "restarts": int(em.restarts),
        "init": em.init if isinstance(em.init, str) else f"callable {_describe(em.init)}",
        "max_iter": int(em.max_iter),
        "tol": _number(em.tol),
        "hard": bool(em.hard),
        "semiring": "max" if em.hard else "sum",
        "strict": bool(em.strict),
        "mstep": {"max_steps": int(mstep.max_steps),
                  "gtol": None if mstep.gtol is None else _number(mstep.gtol),
                  "memory_size": int(mstep.memory_size)},
        "closed_form": bool(em.closed_form),
        "accelerate": bool(em.accelerate),
        "record_params": bool(em.record_params),
        "parallel_time": bool(em.parallel_time),
        "chunk_size": None if getattr(em, "chunk_size", None) is None else int(em.chunk_size),
        "restart_noise": _number(em.restart_noise),
        "memory_limit": _number(em.memory_limit),
        "missing": list(em.missing),
        "fixed": {k: np.asarray(v) for k, v in em.fixed.items()},
        "init_values": {k: np.asarray(v) for k, v in em.init_values.items()},
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }


_ARRAY_SETTINGS = ("fixed", "init_values")


# -- writing --------------------------------------------------------------------------------------
def _versions() -> dict:
    """The running versions of Python and of the packages a result depends on (each package's
    own `__version__`; None if it cannot be imported)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = str(__import__(name).__version__)
        except (ImportError, AttributeError):
            out[name] = None
    return out


class _Arrays:
    """Collects arrays under short keys (`a0`, `a1`, ...); the metadata maps names to keys,
    so that any site name (slashes, dots, unicode) is stored as it is."""

    def __init__(self):
        self.arrays = {}

    def add(self, value) -> str:
        key = f"a{len(self.arrays)}"
        value = np.asarray(value)
        if value.dtype == object:
            raise TypeError(f"cannot store an array of Python objects ({key}).")
        self.arrays[key] = value
        return key

    def tree(self, values: dict) -> dict:
        return {str(k): self.add(v) for k, v in values.items()}


def _constraint_name(constraint) -> str:
    return constraint if isinstance(constraint, str) else repr(constraint)


def _posterior(result):
    """`(posterior, most_probable)` if the result has them or can compute them, else None."""
    try:
        return result.posterior, result.most_probable
    except ValueError:  # unpickled or loaded without them, and no model to compute them
        return None


def _contents(result) -> tuple[dict, dict]:
    store = _Arrays()
    history = {k: store.add(v) for k, v in result.history.items() if k != "params"}
    if "params" in result.history:
        history["params"] = store.tree(result.history["params"])
    settings = dict(getattr(result, "settings", None) or {})
    for k in _ARRAY_SETTINGS:
        if k in settings:
            settings[k] = store.tree(settings[k])
    sites = result.sites
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "settings": settings,
        "params": store.tree(result.params),
        "objective": store.add(np.float64(result.objective)),
        "log_likelihood": store.add(np.float64(result.log_likelihood)),
        "log_prior": store.add(np.float64(result.log_prior)),
        "n_iter": int(result.n_iter),
        "status": str(result.status),
        "best_restart": int(result.best_restart),
        "restart_params": store.tree(result.restart_params),
        "restart_objective": store.add(result.restart_objective),
        "restart_n_iter": store.add(result.restart_n_iter),
        "restart_status": [str(s) for s in result.restart_status],
        "restart_messages": [str(m) for m in result.restart_messages],
        "n_decreases": store.add(result.n_decreases),
        "n_evals": store.add(result.n_evals),
        "n_accepted": store.add(result.n_accepted),
        "n_fallbacks": store.add(result.n_fallbacks),
        "history": history,
        "mstep_paths": (dict(result.mstep_paths) if result.problem is not None
                        or "mstep_paths" in result._cache else None),
        "sites": {
            "params": [{"name": p.name, "kind": p.kind,
                        "constraint": _constraint_name(p.constraint), "init": store.add(p.init)}
                       for p in sites.params],
            "latents": list(sites.latents),
            "observed": list(sites.observed),
            "plate_order": list(sites.plate_order),
            "max_plate_nesting": int(sites.max_plate_nesting),
        },
        "posterior": None,
        "most_probable": None,
    }
    found = _posterior(result)
    if found is not None:
        meta["posterior"], meta["most_probable"] = (store.tree(d) for d in found)
    return meta, store.arrays


def save(result, path, overwrite: bool = False) -> pathlib.Path:
    """Write `result` (an [`EMResult`][bayes_em.result.EMResult]) to `path`, a `.npz` archive with a
    JSON metadata entry (see the module's documentation). The name is used as given (no suffix
    is added; `.npz` is the convention).

    An existing file is left alone and `FileExistsError` raised, unless
    `overwrite=True`; then it is replaced atomically (a failed write leaves the old file).
    Returns the path written."""
    path = pathlib.Path(os.fspath(path))
    meta, arrays = _contents(result)
    blob = json.dumps(meta, allow_nan=False).encode("utf-8")
    arrays[_META] = np.frombuffer(blob, dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    if not (overwrite and path.exists()):
        try:
            f = open(path, "xb")  # exclusive creation: no race with another writer
        except FileExistsError:
            if not overwrite:
                raise FileExistsError(f"{str(path)!r} exists; EMResult.save does not overwrite "
                                      "it unless overwrite=True.") from None
        else:
            try:
                with f:
                    f.write(data)
            except BaseException:  # no half-written file left behind
                path.unlink(missing_ok=True)
                raise
            return path
    # replace the existing file atomically: a failed write leaves it as it was
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        shutil.copymode(path, tmp)  # the old file's permissions, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# -- reading --------------------------------------------------------------------------------------
def _read(path):
    path = pathlib.Path(os.fspath(path))
    with np.load(path, allow_pickle=False) as archive:
        if _META not in archive.files:
            raise ValueError(f"{str(path)!r} is not a file written by EMResult.save (no "
                             f"{_META} entry).")
        meta = json.loads(archive[_META].tobytes().decode("utf-8"))
        arrays = {k: archive[k] for k in archive.files if k != _META}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a file written by EMResult.save (format "
                         f"{meta.get('format')!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        import bayes_em

        written = (meta.get("versions") or {}).get("bayes_em")
        warnings.warn(f"{str(path)!r} was written by bayes_em {written} in file format "
                      f"{version}; this bayes_em ({bayes_em.__version__}) reads format "
                      f"{FORMAT_VERSION}: fields it does not know are ignored.", UserWarning,
                      stacklevel=3)
    return path, meta, arrays


def metadata(path) -> dict:
    """The JSON metadata of a file written by [`save`][bayes_em.persist.save] (format version, date,
    versions of bayes_em / jax / numpyro / ... and Python, the fit's settings, statuses), without
    building the result. Array entries appear as their keys in the archive."""
    return _read(path)[1]


def _constraint(name: str):
    """The NumPyro constraint whose repr is `name` (the module's named constraints), else the
    description itself (a parametrised constraint such as `Interval(lower_bound=..., ...)`)."""
    from numpyro.distributions import constraints

    for value in vars(constraints).values():
        if isinstance(value, constraints.Constraint) and repr(value) == name:
            return value
    return name


def _loaded_latents(path):
    def latents():
        raise ValueError(f"This result was loaded from {str(path)!r} without its posterior (the "
                         "result saved had neither its posterior nor the model to compute it), "
                         "and it has no model or data: refit (EM(model, init_values="
                         "result.params)) or use result.predict_proba(data) on a fitted result.")

    return latents


def _sites(s, arrays):
    """The `ModelSites` stored by [`save`][bayes_em.persist.save]."""
    from bayes_em.sites import ModelSites, ParamSite

    return ModelSites(
        params=tuple(ParamSite(p["name"], p["kind"], _constraint(p["constraint"]),
                               arrays[p["init"]]) for p in s["params"]),
        latents=tuple(s["latents"]),
        observed=tuple(s["observed"]),
        plate_order=tuple(s["plate_order"]),
        max_plate_nesting=int(s["max_plate_nesting"]),
    )


def load(path):
    """Read a result written by [`save`][bayes_em.persist.save]: an
    [`EMResult`][bayes_em.result.EMResult] with every number of the saved one, and no model, data or
    compiled functions (like an unpickled result)."""
    from bayes_em.result import EMResult, Status

    path, meta, arrays = _read(path)

    def array(key):
        return arrays[key]

    def tree(keys):
        return {name: arrays[key] for name, key in (keys or {}).items()}

    def scalar(key):
        return float(arrays[key])

    history = {k: array(v) for k, v in meta["history"].items() if k != "params"}
    if "params" in meta["history"]:
        history["params"] = tree(meta["history"]["params"])
    settings = dict(meta.get("settings") or {})
    for k in _ARRAY_SETTINGS:
        if k in settings:
            settings[k] = tree(settings[k])
    sites = _sites(meta["sites"], arrays)
    cache = {}
    if meta.get("posterior") is not None:
        cache["latents"] = (tree(meta["posterior"]), tree(meta["most_probable"]))
    if meta.get("mstep_paths") is not None:
        cache["mstep_paths"] = dict(meta["mstep_paths"])
    return EMResult(
        params={k: jnp.asarray(v) for k, v in tree(meta["params"]).items()},
        objective=scalar(meta["objective"]),
        log_likelihood=scalar(meta["log_likelihood"]),
        log_prior=scalar(meta["log_prior"]),
        n_iter=int(meta["n_iter"]),
        status=Status(meta["status"]),
        best_restart=int(meta["best_restart"]),
        restart_params=tree(meta["restart_params"]),
        restart_objective=array(meta["restart_objective"]),
        restart_n_iter=array(meta["restart_n_iter"]),
        restart_status=tuple(Status(x) for x in meta["restart_status"]),
        restart_messages=tuple(meta["restart_messages"]),
        n_decreases=array(meta["n_decreases"]),
        history=history,
        n_evals=array(meta["n_evals"]),
        n_accepted=array(meta["n_accepted"]),
        n_fallbacks=array(meta["n_fallbacks"]),
        latents=_loaded_latents(path),
        sites=sites,
        settings=settings,
        _cache=cache,
    )
