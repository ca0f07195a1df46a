"""The fitted model on new data: posterior marginals, most probable latents, log-likelihood per
data point, and draws from the model at the fitted parameters.

New data are traced with the fitted θ. Along the data plate (the outermost plate shared by every
observed site) a batch of N rows is padded to a bucket, the next power of two ≥ max(N, 64), by
repeating its last row, and the padded rows are masked out of every site in the plate (masked
latents are pinned, masked observations count 0): a stream of batch sizes compiles once per
bucket, and the first N rows of every output are exact. Models without a data plate (one long
`scan`) compile once per shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.primitives import Messenger

from bayes_em import em as core
from bayes_em.compiled import jit
from bayes_em.contraction import pointwise_log_likelihood
from bayes_em.sites import split_data
from bayes_em.validation import check_arguments

__all__ = ["predict_proba", "predict", "score_samples", "score", "sample", "bucket"]

MIN_BUCKET = 64


def bucket(n: int) -> int:
    """The padded size of a batch of `n` rows: the next power of two, at least 64."""
    return max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())


class RowMask(Messenger):
    """Masks the rows of plate `plate` outside `[lo, hi)` at every sample site inside it
    (`hi=None`: no upper bound): a batch's padded rows (`predict`), a chunk's rows that the
    previous chunk already counted (`bayes_em.chunked`)."""

    def __init__(self, fn, plate, lo=0, hi=None):
        self.plate, self.lo, self.hi = plate, lo, hi
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
        if frame is None:
            return
        rows = jnp.arange(frame.size)
        keep = rows >= self.lo if self.hi is None else (rows >= self.lo) & (rows < self.hi)
        msg["fn"] = msg["fn"].mask(keep.reshape((frame.size,) + (1,) * (-frame.dim - 1)))


def _params(result):
    return {k: jnp.asarray(v) for k, v in result.params.items()}


def _metas(problem, params, data):
    return jax.eval_shape(lambda p, d: core.factors(problem, p, d), params, data).metas


def _data_plate(metas, observed, plate_order):
    by_name = {m.name: m for m in metas}
    plates = [by_name[n].plates for n in observed if n in by_name]
    if not plates:  # no observed site among the factors (e.g. observations inside a scan)
        return None
    shared = frozenset.intersection(*plates)
    return next((n for n in plate_order if n in shared), None)


def _plate_size(metas, plate):
    for m in metas:
        for dim, name in m.dim_to_name:
            if name == plate:
                return int(m.shape[dim])
    return None


def _prepared(result, args, kwargs):
    """`(functions, data, n_rows, layout)` for new data: compiled once per (structure, bucket)."""
    if result.problem is None:
        raise ValueError("This result was unpickled or loaded from a file: it keeps the fitted "
                         "numbers but not the model it needs for new data. Refit (EM(model, "
                         "init_values=result.params, max_iter=1)) to predict.")
    check_arguments(args, kwargs)
    data, rebuild, key = split_data(args, kwargs)
    params = _params(result)
    problem = result.problem._replace(rebuild=rebuild, closed=())
    metas = _metas(problem, params, data)
    plate = _data_plate(metas, result.sites.observed, result.sites.plate_order)
    n = _plate_size(metas, plate) if plate is not None else None
    if n is not None:
        size = bucket(n)
        rows = [i for i, leaf in enumerate(data)
                if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == n]
        padded = tuple(
            jnp.concatenate([jnp.asarray(leaf),
                             jnp.repeat(jnp.asarray(leaf)[-1:], size - n, axis=0)])
            if i in rows and size > n else leaf for i, leaf in enumerate(data))
        masked = problem._replace(enum_model=RowMask(problem.enum_model, plate, hi=n))
        if size > n and _plate_size(_metas(masked, params, padded), plate) == size:
            problem, data = masked, padded
        else:  # the plate does not follow the leading dim of the data: no padding
            n, size = None, None
    shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in data)
    cache_key = ("predict", key, shapes, plate, n is not None)
    if cache_key not in result._cache:
        base, drop = result.problem._replace(rebuild=rebuild, closed=()), tuple(
            p.name for p in result.sites.params if p.kind == "map")
        padded_rows = n is not None

        def at(n_rows):  # the problem with rows ≥ n_rows masked (n_rows traced)
            if not padded_rows:
                return base
            return base._replace(enum_model=RowMask(base.enum_model, plate, hi=n_rows))

        def pointwise(params, data, n_rows):
            return pointwise_log_likelihood(core.factors(at(n_rows), params, data), plate, drop)

        result._cache[cache_key] = dict(
            posterior=jit(lambda params, data, n_rows: core.latent_posterior(
                at(n_rows), params, data)),
            most_probable=jit(lambda params, data, n_rows: core.most_probable(
                at(n_rows), params, data)),
            pointwise=jit(pointwise),
        )
    layout = _layout(problem, params, data, plate, result.sites)
    return result._cache[cache_key], params, data, n, layout


def _layout(problem, params, data, plate, sites):
    """For every latent: the axis of its marginal that indexes `plate` (None if not in it)."""
    axes = {}
    for m in _metas(problem, params, data):
        if m.name not in sites.latents:
            continue
        times = 0 if m.time is None else 1
        own = [p for p in sites.plate_order if p in m.plates]
        axes[m.name] = times + own.index(plate) if plate in own else None
    return axes


def _cut(values, n, layout):
    if n is None:
        return {k: np.asarray(v) for k, v in values.items()}
    return {k: np.asarray(v) if layout.get(k) is None
            else np.take(np.asarray(v), np.arange(n), axis=layout[k]) for k, v in values.items()}


def _rows(n):
    return jnp.asarray(0 if n is None else n, jnp.int32)


def predict_proba(result, *args, **kwargs) -> dict:
    """p(z | x_new, θ̂) for every latent site: plates first (time first in a `scan`), then the
    site's values."""
    fns, params, data, n, layout = _prepared(result, args, kwargs)
    return _cut(fns["posterior"](params, data, _rows(n)), n, layout)


def predict(result, *args, **kwargs) -> dict:
    """The most probable joint configuration of the latents given the new data (max-product;
    Viterbi for a chain)."""
    fns, params, data, n, layout = _prepared(result, args, kwargs)
    return _cut(fns["most_probable"](params, data, _rows(n)), n, layout)


def score_samples(result, *args, **kwargs) -> np.ndarray:
    """log p(x_n | θ̂) for every element n of the data plate, latents summed out (shape (1,)
    when the model has no data plate: the whole data set is one point)."""
    fns, params, data, n, _ = _prepared(result, args, kwargs)
    out = np.asarray(fns["pointwise"](params, data, _rows(n)))
    return out if n is None else out[:n]


def score(result, *args, **kwargs) -> float:
    """log p(X_new | θ̂), the total log-likelihood of the new data (scikit-learn's `score` is
    its mean over rows; hmmlearn's is this total)."""
    return float(np.sum(score_samples(result, *args, **kwargs)))


def sample(result, rng_key, *args, num_samples=1, **kwargs) -> dict:
    """Draws of every sample site from the model at θ̂ (`numpyro.infer.Predictive`): pass
    `None` for an observation to draw it. MAP sites are held at their fitted values."""
    return _sample(result, result.params, rng_key, args, kwargs, num_samples)


class _Unobserve(Messenger):
    """Turns the observed sites `names` into draws (their `obs` values are ignored)."""

    def __init__(self, fn, names):
        self.names = frozenset(names)
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.names and msg["is_observed"]:
            msg["value"], msg["is_observed"] = None, False


def _sample(result, params, rng_key, args, kwargs, num_samples, redraw=()):
    """[`sample`][bayes_em.predict.sample] at `params` (constrained values of every fitted site),
    the observed sites in `redraw` drawn instead of taken from the data."""
    from numpyro.infer import Predictive

    if result.model is None:
        raise ValueError("This result has no model attached (it was unpickled or loaded from a "
                         "file): draw with numpyro.infer.Predictive(model, params=...) instead.")
    params = {k: jnp.asarray(v) for k, v in params.items()}
    map_sites = {p.name for p in result.sites.params if p.kind == "map"}
    model = _Unobserve(result.model, redraw) if redraw else result.model
    model = handlers.condition(model, data={k: params[k] for k in map_sites})
    model = handlers.substitute(model, data={k: v for k, v in params.items()
                                             if k not in map_sites})
    return {k: np.asarray(v) for k, v in
            Predictive(model, num_samples=num_samples)(rng_key, *args, **kwargs).items()}
