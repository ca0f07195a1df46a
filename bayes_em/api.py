"""The NumPyro-style object API: ``EM(model, ...).run(rng_key, *args, **kwargs)``."""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from bayes_em import em as core
from bayes_em import fit as fitting
from bayes_em import predict as predict_mod
from bayes_em.compiled import jit
from bayes_em.conjugate import _FAMILIES
from bayes_em.curvature import is_saddle
from bayes_em.missing import check_missing, marginalize_missing
from bayes_em.mstep import LBFGS
from bayes_em.progress import Progress
from bayes_em.sites import ModelSites, discover_sites, split_data
from bayes_em.starts import INITS
from bayes_em.validation import check_arguments, check_options

__all__ = ["EM", "EMResult", "EStep", "Status", "AscentWarning", "ConvergenceWarning",
           "ClosedFormWarning", "MStepPaths"]


class EStep(NamedTuple):
    """The E-step at given parameters: log p(X|θ), log p(θ) and the posterior over latents."""

    log_likelihood: float
    log_prior: float
    posterior: dict  # latent site -> marginal p(z | X, θ), plates first
    most_probable: dict  # latent site -> jointly most probable value


def _first_objective(states):
    """The objective at the first restart's start (read on the host: no eager JAX op)."""
    return np.asarray(jax.device_get(states.history))[0, 0, 0]


class MStepPaths(dict):
    """``{site: path}``; called with ``explain=True`` it adds, for each numeric site, why it was
    refused a closed form (``"numeric: <reason>"``)."""

    def __init__(self, paths, reasons):
        super().__init__(paths)
        self.reasons = reasons

    def __call__(self, explain: bool = False) -> dict:
        if not explain:
            return dict(self)
        return {k: f"{v}: {self.reasons[k]}" if v == "numeric" and k in self.reasons else v
                for k, v in self.items()}


class AscentWarning(UserWarning):
    """The objective log p(X|θ) + log p(θ) fell between two iterations by more than round-off."""


class ConvergenceWarning(UserWarning):
    """The best restart did not converge: it hit ``max_iter``, stopped at a saddle, collapsed
    or went non-finite (``result.status`` and ``result.message`` say which and what to do)."""


class Status(StrEnum):
    """How a restart ended; compares equal to its name (``result.status == "converged"``)."""

    CONVERGED = "converged"
    MAX_ITER = "max_iter"
    NONFINITE = "nonfinite"
    DECREASED = "decreased"
    SADDLE = "saddle"
    COLLAPSED = "collapsed"

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "the relative change of the objective fell below tol",
    Status.MAX_ITER: "max_iter iterations ran before the objective settled: raise max_iter, "
                     "loosen tol, or try accelerate=True",
    Status.NONFINITE: "the objective became non-finite; the parameters are the last finite ones. "
                      "Usually a component collapsed onto a point (a scale reached 0) or the data "
                      "got zero probability: add a prior on the scales / probabilities",
    Status.DECREASED: "the next iteration would have lowered the objective by more than "
                      "round-off, so the fit stopped at the last point of ascent (the parameters "
                      "returned). The E-step's numerics are at their limit there: fit in float64, "
                      "rescale the data, or put priors on scales that approach 0",
    Status.SADDLE: "two values of a latent have indistinguishable posteriors (e.g. two identical "
                   "mixture components): a symmetric saddle EM cannot leave. Use restarts "
                   "(random starts are anchored on data rows) or start the components apart",
    Status.COLLAPSED: "a scale or covariance shrank towards 0: the likelihood is unbounded there "
                      "(a component on a single point). Put a prior on it (MAP, e.g. "
                      "models.gmm(..., prior=True)) or hold it away from 0",
}


class ClosedFormWarning(UserWarning):
    """An iteration with closed-form M-steps lowered the objective; the guard rejected it and
    redid it with the numeric M-step (the fit is sound; its closed-form plan is not)."""


@dataclass(frozen=True)
class EMResult:
    """The outcome of :meth:`EM.run`: the best restart, and every restart's trajectory.

    ``params`` are constrained values keyed by site name (JAX arrays, ready for NumPyro's
    ``Predictive(model, params=result.params)``). ``history`` holds, per restart and
    iteration (iteration 0 is the start), the objective log p(X|θ) + log p(θ), the log prior and
    the log-likelihood; entries after a restart stopped are NaN. ``posterior`` gives each latent
    site's posterior marginal at the best parameters (plates first, then the site's values) and
    ``most_probable`` the jointly most probable value of each latent.
    """

    params: dict
    objective: float
    log_likelihood: float
    log_prior: float
    n_iter: int
    status: Status
    best_restart: int
    restart_params: dict  # site -> array with a leading restart axis
    restart_objective: np.ndarray  # (R,)
    restart_n_iter: np.ndarray  # (R,)
    restart_status: tuple  # (R,) Status of each restart
    restart_messages: tuple  # (R,) what each status means for that restart, and what to do
    n_decreases: np.ndarray  # (R,)
    history: dict  # "objective" / "log_prior" / "log_likelihood": (R, max_iter + 1); "params"
    n_evals: np.ndarray  # (R,) EM maps evaluated (M-steps): 3 per iteration with SQUAREM
    n_accepted: np.ndarray  # (R,) SQUAREM extrapolations kept
    n_fallbacks: np.ndarray  # (R,) closed-form M-steps the guard rejected (numeric instead)
    latents: Any = field(repr=False, compare=False)  # () -> (posterior, most probable), lazily
    sites: ModelSites = field(repr=False)
    problem: core.EMProblem = field(repr=False, compare=False, default=None)  # for diagnostics
    data: tuple = field(repr=False, compare=False, default=())  # array leaves of the model args
    model: Any = field(repr=False, compare=False, default=None)  # the model fitted (for sample)

    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- the fitted model on new data (bayes_em.predict) -----------------------------------------
    def predict_proba(self, *args, **kwargs) -> dict:
        """Posterior marginals p(z | x_new, θ̂) of every latent for new data (the model's
        arguments): plates first (time first in a scan), then the site's values."""
        return _locked(predict_mod.predict_proba, self, *args, **kwargs)

    def predict(self, *args, **kwargs) -> dict:
        """The most probable latents for new data (max-product; Viterbi for a chain)."""
        return _locked(predict_mod.predict, self, *args, **kwargs)

    def score_samples(self, *args, **kwargs) -> np.ndarray:
        """log p(x_n | θ̂) per element of the data plate of new data, latents summed out."""
        return _locked(predict_mod.score_samples, self, *args, **kwargs)

    def score(self, *args, **kwargs) -> float:
        """Total log-likelihood log p(X_new | θ̂) (scikit-learn's ``score`` is the mean)."""
        return _locked(predict_mod.score, self, *args, **kwargs)

    def sample(self, rng_key, *args, num_samples=1, **kwargs) -> dict:
        """Draws of every sample site at θ̂ (``numpyro.infer.Predictive``; pass ``None`` for an
        observation to draw it)."""
        return _locked(predict_mod.sample, self, rng_key, *args, num_samples=num_samples,
                       **kwargs)

    @property
    def posterior(self) -> dict:
        """Posterior marginal of every latent site at the best parameters (computed on first
        access): plates first (time first for scan chains), then the site's values."""
        if "latents" not in self._cache:
            self._cache["latents"] = self.latents()
        return self._cache["latents"][0]

    @property
    def most_probable(self) -> dict:
        """Jointly most probable value of every latent site (max-product; computed on first
        access)."""
        self.posterior
        return self._cache["latents"][1]

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    @property
    def message(self) -> str:
        """What the best restart's status means, and what to do about it."""
        return self.restart_messages[self.best_restart]

    @property
    def n_restarts(self) -> int:
        return len(self.restart_objective)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(np.shape(v))}" for k, v in self.params.items())
        return (f"EMResult(status={str(self.status)!r}, objective={self.objective:.6g}, "
                f"log_likelihood={self.log_likelihood:.6g}, n_iter={self.n_iter}, "
                f"best_restart={self.best_restart} of {self.n_restarts}, params={{{shapes}}})")

    # pickling keeps the numbers (params, histories, statuses, sites, the posterior if it was
    # computed); the compiled functions, the model and the data stay behind
    _TRANSIENT = ("latents", "problem", "data", "model")

    def __getstate__(self):
        state = {k: v for k, v in vars(self).items() if k not in self._TRANSIENT}
        state["_cache"] = {k: v for k, v in self._cache.items() if k == "latents"}
        state["params"] = {k: np.asarray(v) for k, v in self.params.items()}
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["params"] = {k: jnp.asarray(v) for k, v in state["params"].items()}
        for k in self._TRANSIENT:
            state.setdefault(k, None if k != "data" else ())
        if state["latents"] is None:
            state["latents"] = _unpickled_latents
        object.__setattr__(self, "__dict__", state)

    @property
    def mstep_paths(self) -> "MStepPaths":
        """How each parameter site was updated: ``"closed-form <family>"`` or ``"numeric"``;
        ``result.mstep_paths(explain=True)`` also says why a site was refused a closed form."""
        problem = self.problem
        closed = {c.param: c for c in (problem.closed if problem else ())}
        paths = {
            name: f"closed-form {closed[name].family}"
            + (f" ({closed[name].prior} MAP)" if closed[name].prior else "")
            if name in closed else "numeric"
            for name in self.sites.param_names
        }
        return MStepPaths(paths, dict(problem.refused) if problem else {})

    def trace(self, restart: int | None = None) -> dict:
        """History of one restart (default: the best), trimmed to the iterations it ran."""
        r = self.best_restart if restart is None else restart
        n = int(self.restart_n_iter[r]) + 1
        out = {k: v[r, :n] for k, v in self.history.items() if k != "params"}
        if "params" in self.history:
            out["params"] = {k: v[r, :n] for k, v in self.history["params"].items()}
        return out

    # -- diagnostics (thin wrappers over bayes_em.diagnostics) -----------------------------------
    def to_inference_data(self, **kwargs):
        """ArviZ ``InferenceData``: see :func:`bayes_em.diagnostics.to_inference_data`."""
        from bayes_em import diagnostics

        return _locked(diagnostics.to_inference_data, self, **kwargs)

    def standard_errors(self, restart: int | None = None) -> dict:
        """Delta-method standard errors: see :func:`bayes_em.diagnostics.standard_errors`."""
        from bayes_em import diagnostics

        return _locked(diagnostics.standard_errors, self, restart)

    def summary(self, prob: float = 0.9, **kwargs) -> None:
        """Print estimate, standard error and interval of every parameter entry."""
        from bayes_em import diagnostics

        _locked(diagnostics.print_summary, self, prob, **kwargs)

    def bic(self) -> float:
        """−2 log p(X|θ̂) + k log n: see :func:`bayes_em.diagnostics.bic`."""
        from bayes_em import diagnostics

        return _locked(diagnostics.bic, self)

    def aic(self) -> float:
        """−2 log p(X|θ̂) + 2k: see :func:`bayes_em.diagnostics.aic`."""
        from bayes_em import diagnostics

        return _locked(diagnostics.aic, self)

    def icl(self) -> float:
        """BIC + 2 H[p(Z|X,θ̂)]: see :func:`bayes_em.diagnostics.icl`."""
        from bayes_em import diagnostics

        return _locked(diagnostics.icl, self)


# one fit at a time in a process: NumPyro's handler stack is a module global (see EM.run)
_ENGINE_LOCK = threading.RLock()


def _unpickled_latents():
    raise ValueError("This result was unpickled without its posterior (it had not been computed "
                     "before pickling) or the model and data it needs: read result.posterior "
                     "before pickling, or use result.predict_proba(data) on a refitted result.")


def _locked(fn, *args, **kwargs):
    with _ENGINE_LOCK:
        return fn(*args, **kwargs)


def _confirm_saddle(problem, hvp, restart_params, r, data):
    """A restart that converged with two latent values indistinguishable is a saddle if the
    objective curves upwards somewhere (a positive Hessian eigenvalue); otherwise it is a
    degenerate maximum (the data support fewer distinct values) and stays converged."""
    params = {k: jnp.asarray(v[r]) for k, v in restart_params.items()}
    with _ENGINE_LOCK:
        n = sum(int(np.size(v)) for v in jax.tree.leaves(core.unconstrain(problem, params)))
        try:
            saddle, (low, high) = is_saddle(lambda v: hvp(params, data, jnp.asarray(v)), n)
        except (FloatingPointError, np.linalg.LinAlgError):
            saddle = None
    if saddle is None:  # the curvature is not finite there (a probability at exactly 0 or 1)
        return Status.SADDLE, (f"{Status.SADDLE.message} (the curvature could not be evaluated "
                               "there to tell a saddle from a degenerate maximum)")
    if saddle:
        return Status.SADDLE, (f"{Status.SADDLE.message} (the objective's curvature has a "
                               f"positive eigenvalue {high:.3g})")
    return Status.CONVERGED, (f"{Status.CONVERGED.message}, at a symmetric point: two values of "
                              "a latent are indistinguishable, and no direction of the objective "
                              "curves upwards (a degenerate maximum, not a saddle)")


def _no_finite_mode(problem, functions, states, r, data):
    """For a restart that ended non-finite: the first closed-form parameter whose update from
    the last finite state has no finite value on a row with data, or makes the objective
    non-finite ("" if none). Under maximum likelihood that is a zero scatter: every point
    weighted to the row is one point (or, for a covariance, lies on a lower-dimensional set),
    and the likelihood is unbounded."""
    if not problem.closed:
        return ""
    params = jax.tree.map(lambda x: jnp.asarray(x[r]), states.params)
    weights = jax.tree.map(lambda x: jnp.asarray(x[r]), states.weights)
    with _ENGINE_LOCK:
        new = jax.device_get(functions["closed"](params, weights, data))
        for plan in problem.closed:  # in update order, each conditional on the ones before
            v = np.asarray(new[plan.param])
            params = {**params, plan.param: jnp.asarray(v)}
            event = _FAMILIES[plan.family][2]
            rows = v.reshape(v.shape[: v.ndim - event] + (-1,))
            bad = ~np.isfinite(rows).all(axis=-1)
            where = ""
            if bad.any():
                idx = [int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)]
                where = f"{idx}" if bad.ndim else ""
            elif np.isfinite(float(functions["e_step"](params, data)[0])):
                continue
            elif rows.ndim > 1 and plan.family in ("normal_scale", "mvn_cov", "mvn_tril"):
                # finite but degenerate: name the row with the smallest spread
                spread = (np.abs(v) if event == 0 else np.linalg.eigvalsh(v)[..., 0]
                          if plan.family == "mvn_cov" else
                          np.abs(np.diagonal(v, axis1=-2, axis2=-1)).min(-1))
                k = np.unravel_index(int(np.argmin(spread)), spread.shape)
                where = f"{[int(i) for i in k]}"
            return (f"site '{plan.param}'{where}: its {plan.family} update has no finite "
                    "maximum (all the weight on one point: a zero scatter)")
    return ""


def _collapsed(problem, restart_params, ratio=1e-4):
    """Per restart, a description of the first maximum-likelihood scale or covariance that
    shrank towards 0 ("" if none): a covariance eigenvalue below ``ratio``² of the site's largest
    (a flat component, or one shrinking onto a point), or a closed-form Normal scale below
    ``ratio`` of the site's largest."""
    scales = {c.param for c in problem.closed if c.family == "normal_scale"}
    out = [""] * len(next(iter(restart_params.values()))) if restart_params else []
    for p in problem.sites.params:
        if p.kind != "param":
            continue
        name = str(type(p.constraint).__name__)
        values = np.asarray(restart_params[p.name], dtype=float)
        for r in range(len(out)):
            if out[r]:
                continue
            v = values[r]
            if name in ("_PositiveDefinite", "_LowerCholesky") and v.ndim >= 2:
                cov = v if name == "_PositiveDefinite" else v @ np.swapaxes(v, -1, -2)
                eig = np.linalg.eigvalsh(cov.reshape((-1,) + cov.shape[-2:]))
                # within a component (a flat ellipsoid) or against the site's largest spread
                # (a component shrinking in every direction onto a point)
                bad = eig[:, 0] <= ratio**2 * max(eig[:, -1].max(), np.finfo(float).tiny)
                if bad.any():
                    k = int(np.flatnonzero(bad)[0])
                    idx = np.unravel_index(k, cov.shape[:-2]) if cov.ndim > 2 else ()
                    out[r] = (f"site '{p.name}'{list(idx) if idx else ''}: smallest eigenvalue "
                              f"{eig[k, 0]:.3g} against largest {eig[k, -1]:.3g}")
            elif p.name in scales and v.size > 1:
                flat = v.reshape(-1)
                bad = flat <= ratio * flat.max()
                if bad.any():
                    k = int(np.flatnonzero(bad)[0])
                    idx = list(np.unravel_index(k, v.shape))
                    out[r] = f"site '{p.name}'{idx}: scale {flat[k]:.3g} against {flat.max():.3g}"
    return out


def _redo_rejected(states, fallback, data):
    """Restarts stopped by the guard (a closed-form iteration that lowered the objective) go on:
    that iteration numerically, then the compiled loop again."""
    status = np.asarray(jax.device_get(states.status))
    while (status == core.REJECTED).any():
        for r in np.flatnonzero(status == core.REJECTED):
            one = fallback(jax.tree.map(lambda x: x[r], states), data)
            states = jax.tree.map(lambda x, y: x.at[r].set(y), states, one)
        status = np.asarray(jax.device_get(states.status))
    return states


def _freeze(model, fixed):
    """``model`` with the sites in ``fixed`` held at the given values."""

    def frozen(*args, **kwargs):
        with handlers.substitute(data=fixed), handlers.condition(data=fixed):
            return model(*args, **kwargs)

    return frozen


def _sites_key(sites):
    return (
        tuple((p.name, p.kind, repr(p.constraint), jnp.shape(p.init)) for p in sites.params),
        sites.latents,
        sites.plate_order,
        sites.max_plate_nesting,
    )


class EM:
    """Exact EM (maximum likelihood or MAP) for a NumPyro model with discrete latents.

    :param model: a NumPyro model. ``numpyro.param`` sites are fitted by maximum likelihood,
        continuous ``numpyro.sample`` sites without ``obs`` by MAP under their prior, and discrete
        sample sites without ``obs`` are enumerated exactly.
    :param restarts: number of starts. The first is the model's declared initial values
        (``numpyro.param`` inits; for MAP sites ``init_values`` or the prior mean); the others
        are drawn by ``init``. The best final objective wins.
    :param init: how restarts after the first begin: ``"anchors"`` (default: one M-step under
        posterior weights concentrated around data rows drawn by k-means++, one anchor per
        value of each latent; see ``bayes_em.starts``), ``"noise"`` (one M-step under random
        posterior weights, Gumbel noise of scale ``restart_noise``), or a callable
        ``init(rng_key, params) -> dict`` of constrained values (traced: JAX operations only)
        that override the declared ``params``.
    :param max_iter: maximum number of EM iterations.
    :param tol: stop when |Δ objective| ≤ tol · |objective| (at least a few ulps of the dtype);
        ``tol=0`` runs exactly ``max_iter`` iterations.
    :param hard: hard EM: the E-step puts all weight on the most probable configuration.
    :param init_values: dict of constrained initial values, overriding any site's.
    :param mstep: settings of the numeric M-step (:class:`bayes_em.LBFGS`).
    :param strict: raise if the objective ever decreases (default: warn).
    :param progress_bar: show a tqdm bar with the iteration and the objective of the restart
        being fitted (updated from inside the compiled loop by a host callback).
    :param memory_limit: bytes the enumerated tensors may take; checked before allocating.
    :param restart_noise: scale of the Gumbel noise behind the random starts.
    :param closed_form: update parameters that qualify by closed-form conjugate M-steps
        (``bayes_em.conjugate``); ``False`` forces the numeric M-step everywhere.
    :param fixed: dict of site name -> value held fixed (not fitted): ``numpyro.param`` sites
        take the value, sample sites are conditioned on it.
    :param record_params: keep the parameters of every iteration and restart in
        ``result.history["params"]`` (memory: max_iter + 1 copies of θ per restart).
    :param accelerate: SQUAREM acceleration (Varadhan & Roland 2008): each iteration is three EM
        maps and an extrapolation, kept only when it does not lower the objective.
    :param missing: names of observed sites whose NaN entries are marginalised out of the
        likelihood (``bayes_em.missing``): dropped for event_dim-0 and ``.to_event`` sites, the
        exact marginal of the observed coordinates for a ``MultivariateNormal``. NaNs at other
        observed sites still raise. A discrete site whose value other sites use needs
        ``obs_mask=`` instead (see ``docs/data.md``).
    :param parallel_time: sum Markov chains (``scan``) by funsor's parallel-in-time contraction
        (log₂ T rounds of K×K×K products, O(T·K³) work) instead of the forward recursion
        (T sequential steps, O(T·K²)): for long sequences on accelerators; slower on CPUs.
    """

    def __init__(
        self,
        model,
        *,
        restarts: int = 1,
        init="anchors",
        max_iter: int = 500,
        tol: float = 1e-8,
        hard: bool = False,
        init_values: dict | None = None,
        mstep: LBFGS = LBFGS(),
        strict: bool = False,
        progress_bar: bool = True,
        memory_limit: float = 2 * 2**30,
        restart_noise: float = 1.0,
        closed_form: bool = True,
        accelerate: bool = False,
        fixed: dict | None = None,
        record_params: bool = False,
        missing: tuple | list = (),
        parallel_time: bool = False,
    ):
        if not isinstance(restarts, (int, np.integer)) or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}.")
        if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
        check_options(tol, memory_limit, restart_noise, init_values, fixed, missing)
        if not isinstance(mstep, LBFGS) or mstep.max_steps < 1:
            raise ValueError(f"mstep must be an LBFGS(...) with max_steps >= 1, got {mstep!r}.")
        # as JAX arrays: a NumPy array indexed by a traced latent (loc[z]) cannot be traced
        self.fixed = {k: jnp.asarray(v) for k, v in dict(fixed or {}).items()}
        self.model = _freeze(model, self.fixed) if self.fixed else model
        self.missing = (missing,) if isinstance(missing, str) else tuple(missing)
        if self.missing:
            self._unmarginalized = self.model
            self.model = marginalize_missing(self.model, self.missing)
        if not (callable(init) or init in INITS):
            raise ValueError(f"init must be one of {INITS} or a callable, got {init!r}.")
        self.init = init
        self.restarts = int(restarts)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.hard = bool(hard)
        self.init_values = dict(init_values or {})
        self.mstep = mstep
        self.strict = bool(strict)
        self.progress_bar = progress_bar
        self.memory_limit = memory_limit
        self.restart_noise = float(restart_noise)
        self.closed_form = bool(closed_form)
        self.accelerate = bool(accelerate)
        self.record_params = bool(record_params)
        self.parallel_time = bool(parallel_time)
        self.options = fitting.Options(
            restarts=self.restarts, init=init, max_iter=self.max_iter, tol=self.tol,
            hard=self.hard, strict=self.strict, mstep=mstep, closed_form=self.closed_form,
            accelerate=self.accelerate, record_params=self.record_params,
            parallel_time=self.parallel_time, restart_noise=self.restart_noise,
            memory_limit=memory_limit)
        self._compiled = {}
        self._bar = {}  # {"bar": the running fit's tqdm bar}, shown by a host callback

    # -- compiled pieces, one set per model structure and static arguments ----------------------
    def _functions(self, sites, rebuild, key, data):
        cache_key = (key, _sites_key(sites))
        if cache_key not in self._compiled:
            problem = fitting.problem_for(self.model, sites, rebuild, data, self.options)
            bar = self._bar

            def show(*report):  # host side: move the current run's bar
                if bar.get("bar") is not None:
                    bar["bar"].show(*report)

            fit = fitting.program(problem, self.options, show if self.progress_bar else None)

            def latents(params, data):
                return (core.latent_posterior(problem, params, data),
                        core.most_probable(problem, params, data))

            self._compiled[cache_key] = (
                problem,
                dict(
                    fit=jit(fit),
                    latents=jit(latents),
                    e_step=jit(lambda params, data: core.e_step(problem, params, data, "sum")[:2]),
                    # compiled only where a restart stopped at a symmetric point
                    hvp=jit(lambda params, data, v: core.objective_hvp(problem, params, data, v)),
                    # compiled only if the guard rejects a closed-form M-step
                    fallback=jit(lambda state, data: core.run(
                        problem, core.fallback_step(problem, state, data), data)),
                    # compiled only where a restart ended non-finite: which closed form failed
                    closed=jit(lambda params, weights, data: core.closed_form_step(
                        problem, params, weights, data)),
                ),
            )
        return self._compiled[cache_key]

    def _prepare(self, rng_key, init_values, args, kwargs):
        from bayes_em.checks import check_enumeration

        check_arguments(args, kwargs)
        data, rebuild, key = split_data(args, kwargs)
        if self.missing:
            check_missing(self._unmarginalized, self.missing, args, kwargs)
        sites = discover_sites(self.model, args, kwargs, init_values, rng_key, self.fixed)
        init_params = {p.name: p.init for p in sites.params}  # host arrays: no transfer
        bare = core.make_problem(self.model, sites, rebuild, self.max_iter, self.tol, self.hard)
        check_enumeration(bare, init_params, data, self.memory_limit)
        problem, functions = self._functions(sites, rebuild, key, data)
        return problem, functions, init_params, data

    def e_step(self, params, *args, **kwargs) -> EStep:
        """The exact E-step at ``params`` (constrained values; sites not given take their initial
        values): log p(X|θ), log p(θ), posterior marginals and the most probable latents."""
        with _ENGINE_LOCK:
            return self._e_step(params, *args, **kwargs)

    def _e_step(self, params, *args, **kwargs) -> EStep:
        from bayes_em.checks import check_initial_density

        init_values = {**self.init_values, **params}
        problem, functions, theta, data = self._prepare(
            jax.random.PRNGKey(0), init_values, args, kwargs
        )
        log_z, log_prior = functions["e_step"](theta, data)
        check_initial_density(problem, log_z, theta, data)
        posterior, mode = functions["latents"](theta, data)
        return EStep(float(log_z - log_prior), float(log_prior), posterior, mode)

    def run(self, rng_key, *args, **kwargs) -> EMResult:
        """Fit the model to the data in ``args`` / ``kwargs`` (passed on to the model).

        Thread-safe: fits from several threads run one at a time (NumPyro's effect handlers
        live on one global stack, and the vectorised scan patches NumPyro's scan module while a
        model is traced), each with the result it would have alone."""
        with _ENGINE_LOCK:
            return self._run(rng_key, *args, **kwargs)

    def _run(self, rng_key, *args, **kwargs) -> EMResult:
        from bayes_em.checks import check_initial_density

        problem, functions, params0, data = self._prepare(rng_key, self.init_values, args, kwargs)
        if not self.progress_bar:
            states = functions["fit"](params0, data, rng_key)
            states = _redo_rejected(states, functions["fallback"], data)
            check_initial_density(problem, _first_objective(states), params0, data)
            return self._result(problem, states, data, functions)
        progress, result = Progress(self.restarts, self.max_iter), None
        self._bar["bar"] = progress  # read by the compiled fit's host callback
        try:
            states = jax.block_until_ready(functions["fit"](params0, data, rng_key))
            self._bar["bar"] = None
            states = _redo_rejected(states, functions["fallback"], data)
            # a non-finite start stops its restart at once; then this names the sites
            check_initial_density(problem, _first_objective(states), params0, data)
            result = self._result(problem, states, data, functions)
        finally:
            self._bar["bar"] = None
            progress.close(result)
        return result

    def _result(self, problem, states, data, functions):
        states = jax.device_get(states)
        restart_params = states.params
        param_history = states.param_history if self.record_params else None
        objective = np.asarray(states.objective)
        finite = np.isfinite(objective)
        if not finite.any():
            raise FloatingPointError(
                "Every restart reached a non-finite objective; the fit has no valid parameters."
            )
        status = [Status(core.STATUS[int(s)]) for s in np.asarray(states.status)]
        messages = [st.message for st in status]
        for r in np.flatnonzero(np.asarray(status, dtype=str) == "saddle"):
            status[r], messages[r] = _confirm_saddle(problem, functions["hvp"], restart_params, r,
                                                     data)
        for r in np.flatnonzero(np.asarray(status, dtype=str) == "nonfinite"):
            found = _no_finite_mode(problem, functions, states, r, data)
            if found:
                status[r] = Status.COLLAPSED
                messages[r] = f"{found}: {Status.COLLAPSED.message}"
        for r, found in enumerate(_collapsed(problem, restart_params)):
            if found and status[r] in (Status.CONVERGED, Status.MAX_ITER, Status.DECREASED):
                status[r] = Status.COLLAPSED
                messages[r] = f"{found}: {Status.COLLAPSED.message}"
        status = tuple(status)
        # the best objective among restarts that ended at a regular point (converged, still
        # ascending, or stopped at the limit of the numerics), else among the finite ones
        good = finite & np.isin(np.asarray(status, dtype=str),
                                ["converged", "max_iter", "decreased"])
        pool = good if good.any() else finite
        best = int(np.argmax(np.where(pool, objective, -np.inf)))
        if status[best] != Status.CONVERGED and not (status[best] == Status.MAX_ITER
                                                     and self.tol == 0):
            warnings.warn(f"The best restart ({best}) ended '{status[best]}': {messages[best]}.",
                          ConvergenceWarning, stacklevel=4)
        n_decreases = np.asarray(states.n_decreases)
        if n_decreases.any():
            msg = (
                f"An iteration lowered the objective by more than round-off in restarts "
                f"{np.flatnonzero(n_decreases).tolist()}; they stopped at their last point of "
                "ascent (status 'decreased')."
            )
            if self.strict:
                raise RuntimeError(msg)
            warnings.warn(msg, AscentWarning, stacklevel=4)
        n_fallbacks = np.asarray(states.n_fallbacks)
        # a collapse makes the E-step's numerics fail near it: not the closed forms' fault
        suspect = n_fallbacks * (np.asarray(status, dtype=str) != "collapsed")
        if suspect.any():
            warnings.warn(
                f"An iteration with closed-form M-steps lowered the objective in "
                f"{int(suspect.sum())} case(s) (restarts "
                f"{np.flatnonzero(suspect).tolist()}); the guard rejected it and used the "
                "numeric M-step there. Please report the model; "
                "closed_form=False avoids the closed forms altogether.",
                ClosedFormWarning, stacklevel=4)
        # JAX arrays: NumPyro's Predictive(model, params=result.params) indexes them with traced
        # latents (loc[z]), which a NumPy array refuses
        params_best = {k: jnp.asarray(v[best]) for k, v in restart_params.items()}
        history = np.asarray(states.history)
        return EMResult(
            params=params_best,
            objective=float(objective[best]),
            log_likelihood=float(objective[best] - states.log_prior[best]),
            log_prior=float(states.log_prior[best]),
            n_iter=int(states.n_iter[best]),
            status=status[best],
            best_restart=best,
            restart_params=restart_params,
            restart_objective=objective,
            restart_n_iter=np.asarray(states.n_iter),
            restart_status=status,
            restart_messages=tuple(messages),
            n_decreases=n_decreases,
            history={
                "objective": history[..., 0],
                "log_prior": history[..., 1],
                "log_likelihood": history[..., 0] - history[..., 1],
                **({"params": param_history} if param_history is not None else {}),
            },
            n_evals=np.asarray(states.n_evals),
            n_accepted=np.asarray(states.n_accepted),
            n_fallbacks=n_fallbacks,
            latents=functools.partial(_locked, functions["latents"], params_best, data),
            sites=problem.sites,
            problem=problem,
            data=tuple(data),
            model=self.model,
        )
