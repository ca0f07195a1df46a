"""Online (stepwise) EM: the data plate's rows in batches, one pass or a stream (Cappé & Moulines
2009; Liang & Klein 2009).

Each update takes a batch of rows at the current θ_t:

    ŝ_t = (N / n) · E[s(X_batch, Z) | X_batch, θ_t]        (E-step on the batch, rescaled)
    s_{t+1} = (1 − ρ_t) s_t + ρ_t ŝ_t                       (running statistics)
    θ_{t+1} = argmax_θ ⟨s_{t+1}, η(θ)⟩ − A(θ) + log p(θ)    (the M-step of the statistics)

with N the full data's rows (`n_total`) and n the batch's. The statistics are the families'
*parameter-free* expected complete-data sufficient statistics (`Family.raw_stats`: counts,
Σ w x, Σ w n, ...; for Gaussian locations and scales
[`GaussianPair`][bayes_em.gaussian_pair.GaussianPair]: Σ w, Σ w x, Σ w x xᵀ per pair of
rows, about fixed references: θ_0's location rows, or in float64 one centre of the init batch's
data for a multivariate location), so statistics computed at different θ can be averaged. The
M-step maps them to the batch M-step's own statistics at the current θ and takes the same
closed-form modes, in the same order (ECM: a covariance at the new location), so with ρ ≡ 1 and the
whole data as the batch the iterates are batch EM's.

Step sizes ρ_t = (t + 2)^(−κ), κ ∈ (0.5, 1] (`kappa`, 0.6 by default; t = 0 for the first
update), a callable `t -> ρ_t`, or a constant. The running statistics start as the statistics
of the `init` batch at θ_0. The priors of MAP sites are read once, from the `init` batch.

Supported: every fitted site takes a closed-form M-step (`result.mstep_paths`), every latent
lies in the data plate (the rows are independent given θ, as for `chunk_size`); a
MultivariateNormal location needs its covariance fitted too. Otherwise `init` raises, naming
the sites.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bayes_em import additive, chunked
from bayes_em.compiled import jit
from bayes_em.conjugate import _trace, plan_prior
from bayes_em.contraction import log_partition
from bayes_em.estep import posterior_weights
from bayes_em.fit import Options, build
from bayes_em.problem import factors, log_prior
from bayes_em.result import _ENGINE_LOCK
from bayes_em.sites import split_data

__all__ = ["OnlineEM", "OnlineState", "step_sizes"]

class OnlineState(NamedTuple):
    """Where online EM stands after `t` updates."""

    params: dict  # θ_t (constrained values)
    stats: dict  # running statistics s_t (scaled to n_total rows): plan -> {name: array}
    t: Any  # updates done
    n_total: Any  # rows of the full data the statistics are scaled to
    reference: dict  # fitted Gaussian location -> its fixed reference rows (additive.references)
    log_likelihood: Any  # log p(batch | θ) per row, at the θ the last update started from


class _Setup(NamedTuple):
    problem: Any
    plate: str
    static: Any  # the static part of the model's arguments (split_data's key)
    layout: additive.Layout  # the closed-form plans' additive statistics
    priors: dict  # MAP plan -> its prior (from the init batch)


def step_sizes(step_size=None, kappa: float = 0.6) -> Callable:
    """`t -> ρ_t`: (t + 2)^(−κ) for `step_size=None`, `step_size` itself if callable, else
    the constant `step_size` in (0, 1] (1: batch EM on each batch)."""
    if step_size is None:
        if not isinstance(kappa, (int, float)) or not 0.5 < kappa <= 1:
            raise ValueError(f"kappa must be in (0.5, 1] (Robbins-Monro), got {kappa!r}.")
        return lambda t: (t + 2.0) ** (-float(kappa))
    if callable(step_size):
        return step_size
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (
            0 < step_size <= 1):
        raise ValueError("step_size must be None, a callable t -> rho or a number in (0, 1], "
                         f"got {step_size!r}.")
    return lambda t: float(step_size)


def _setup(problem, params, data, static) -> _Setup:
    """Check that `problem` fits online and lay out its statistics."""
    from bayes_em.predict import _data_plate, _plate_size

    if problem.refused:
        why = "; ".join(f"'{n}': {r}" for n, r in problem.refused)
        raise ValueError(f"OnlineEM: every fitted site needs a closed-form M-step (additive "
                         f"sufficient statistics); these take the numeric one — {why}. Fit "
                         "the model with EM (chunk_size= for large data).")
    metas = jax.eval_shape(lambda p, d: factors(problem, p, d), params, data).metas
    plate = _data_plate(metas, problem.sites.observed, problem.sites.plate_order)
    if plate is None:
        raise ValueError("OnlineEM needs a data plate (a plate shared by every observed site, "
                         "its rows the batches' unit); this model has none.")
    n = _plate_size(metas, plate)
    if n > 2:
        try:  # the rows must be independent given θ: chunked EM's conditions
            chunked.configure(problem, params, data, n - 1)
        except ValueError as e:
            raise ValueError(f"OnlineEM (batches of rows of the data plate): "
                             f"{str(e).replace('chunk_size: ', '')}") from None
    try:
        lay = additive.layout(problem.closed)
    except ValueError as e:
        raise ValueError(f"OnlineEM: {e}: not supported online (use EM).") from None
    args, kwargs = problem.rebuild(data)
    tr = _trace(problem.enum_model, params, args, kwargs)
    priors = {plan.param: plan_prior(plan, tr) for plan in problem.closed if plan.prior}
    return _Setup(problem, plate, static, lay, priors)


def _batch(setup: _Setup, params, reference, data):
    """`(statistics, log p(batch | θ), rows)`: the batch's E-step at θ = `params`."""
    from bayes_em.predict import _plate_size

    problem = setup.problem
    fs = factors(problem, params, data, vectorized=True)
    log_z, weights = posterior_weights(fs, "sum", problem.parallel_time)
    log_lik = log_z - log_prior(problem, fs)
    n_rows = _plate_size(fs.metas, setup.plate)
    args, kwargs = problem.rebuild(data)
    tr = _trace(problem.enum_model, params, args, kwargs)
    stats = additive.stats(problem, setup.layout, params, weights, reference, args, kwargs, tr)
    return stats, log_lik, n_rows


def _references(setup: _Setup, params, data):
    """The fixed references of the Gaussian statistics, from the init batch at θ_0."""
    args, kwargs = setup.problem.rebuild(data)
    tr = _trace(setup.problem.enum_model, params, args, kwargs)
    return additive.references(setup.layout, params, tr)


def _update(setup: _Setup, rho: Callable, batch_em: bool, state: OnlineState, data):
    stats, log_lik, n_rows = _batch(setup, state.params, state.reference, data)
    stats = jax.tree.map(lambda s: s * (state.n_total / n_rows).astype(s.dtype), stats)
    if not batch_em:
        r = rho(state.t)
        stats = jax.tree.map(lambda old, new: (1 - r) * old + r * new, state.stats, stats)
    params = additive.m_step(setup.layout, state.params, stats, state.reference, setup.priors)
    return OnlineState(params, stats, state.t + 1, state.n_total, state.reference,
                       log_lik / n_rows)


def _score(setup: _Setup, params, data):
    problem = setup.problem
    fs = factors(problem, params, data, vectorized=True)
    from bayes_em.predict import _plate_size

    log_z = log_partition(fs, "sum", problem.parallel_time)
    return (log_z - log_prior(problem, fs)) / _plate_size(fs.metas, setup.plate)


class OnlineEM:
    """Online (stepwise) EM over batches of the data plate's rows.

    Args:
        model: a NumPyro model whose fitted sites all take closed-form M-steps and whose
            latents lie in the data plate (the rows of every data array are the batch unit).
        step_size: None for ρ_t = (t + 2)^(−kappa), a callable `t -> ρ_t` (traced by
            JAX), or a constant in (0, 1]; `step_size=1` with the whole data as the batch is
            batch EM, iterate by iterate.
        kappa: the decay exponent of the default schedule, in (0.5, 1].
        n_total: rows of the full data (the batch statistics are scaled to it: it weighs
            the data against the priors of MAP sites); None: the `init` batch's rows.
        init_values: initial values of fitted sites (as for [`bayes_em.EM`][bayes_em.api.EM]).

    `state = online.init(key, x_first_batch, K)`, then `state = online.update(state,
    x_batch, K)` per batch (compiled once per batch shape), `online.params(state)`; or
    `online.run(key, batches, K=K)` over any iterable of batches.
    """

    def __init__(self, model: Callable, step_size: float | Callable | None = None,
                 kappa: float = 0.6, n_total: int | None = None,
                 init_values: dict | None = None, memory_limit: float = 2 * 2**30):
        self.model = model
        self.rho = step_sizes(step_size, kappa)
        self.batch_em = step_size is not None and not callable(step_size) and step_size == 1
        self.n_total = n_total
        self.init_values = dict(init_values or {})
        self.memory_limit = memory_limit
        self._setup = None

    def init(self, rng_key, *args, **kwargs) -> OnlineState:
        """θ_0 and the running statistics from the batch in `args` / `kwargs` (the model's
        arguments): its closed-form plans, priors and layout hold for every later batch."""
        return self._init(rng_key, args, kwargs, self.n_total)

    def _init(self, rng_key, args, kwargs, n_total):
        with _ENGINE_LOCK:
            options = Options(max_iter=1, memory_limit=self.memory_limit)
            problem, params, data = build(self.model, *args, options=options,
                                          init_values=self.init_values, rng_key=rng_key,
                                          **kwargs)
            params = {k: jnp.asarray(v) for k, v in params.items()}
            setup = _setup(problem, params, data, split_data(args, kwargs)[2])
            self._setup = setup
            self._update_fn = jit(functools.partial(_update, setup, self.rho, self.batch_em))
            self._score_fn = jit(functools.partial(_score, setup))
            reference = jax.jit(functools.partial(_references, setup))(params, data)
            stats, _, n_rows = jax.jit(functools.partial(_batch, setup))(params, reference, data)
            dtype = jnp.result_type(*jax.tree.leaves(params))
            total = jnp.asarray(n_rows if n_total is None else n_total, dtype)
            stats = jax.tree.map(lambda s: s * (total / n_rows).astype(s.dtype), stats)
            return OnlineState(params, stats, jnp.zeros((), jnp.int32), total, reference,
                               jnp.full((), jnp.nan, dtype))

    def _data(self, args, kwargs):
        if self._setup is None:
            raise ValueError("OnlineEM: call init(rng_key, *batch) first.")
        data, _, static = split_data(args, kwargs)
        if isinstance(static, tuple) and static != self._setup.static:
            raise ValueError("OnlineEM: this batch's non-array arguments differ from the init "
                             "batch's, or are passed otherwise (positional / keyword): pass "
                             "them as init had them.")
        return data

    def update(self, state: OnlineState, *args, **kwargs) -> OnlineState:
        """One step: the E-step on this batch at θ_t, the running statistics moved towards its
        statistics (rescaled to `n_total` rows) by ρ_t, the M-step."""
        data = self._data(args, kwargs)
        with _ENGINE_LOCK:
            return self._update_fn(state, data)

    def params(self, state: OnlineState) -> dict:
        """θ_t: site name -> constrained value."""
        return dict(state.params)

    def log_likelihood(self, state: OnlineState, *args, **kwargs) -> float:
        """log p(x | θ_t) per row of the data plate on the data in `args` / `kwargs`
        (held-out data, say), latents summed out."""
        data = self._data(args, kwargs)
        with _ENGINE_LOCK:
            return float(self._score_fn(state.params, data))

    def run(self, rng_key, batches, n_total: int | None = None, progress_bar: bool = True,
            **kwargs) -> OnlineState:
        """Online EM over `batches` (any iterable: a generator, slices of a memory-mapped
        array): `init` on the first, then `update` on every batch, the first included. A
        batch is a tuple of the model's positional arguments or a single array (its first);
        `kwargs` go to every call (`K=3`)."""
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        bar = tqdm(total=total, desc="Online EM", unit="batch", disable=not progress_bar)
        state = None
        n_total = self.n_total if n_total is None else n_total
        try:
            for batch in batches:
                args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
                if state is None:
                    state = self._init(rng_key, args, kwargs, n_total)
                state = self.update(state, *args, **kwargs)
                ll = float(state.log_likelihood)
                bar.set_postfix(loglik=f"{ll:.6g}" if math.isfinite(ll) else ll, refresh=False)
                bar.update(1)
        finally:
            bar.close()
        if state is None:
            raise ValueError("OnlineEM.run: no batches.")
        return state
