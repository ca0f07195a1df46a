"""The outcome of a fit: [`EMResult`][bayes_em.result.EMResult] (the fitted model), the
[`Status`][bayes_em.result.Status] of each restart with what it means, and the warnings a fit
raises."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from bayes_em import em as core
from bayes_em import predict as predict_mod
from bayes_em.sites import ModelSites

__all__ = ["EMResult", "EStep", "Status", "AscentWarning", "ConvergenceWarning",
           "ClosedFormWarning", "MStepPaths"]


class EStep(NamedTuple):
    """The E-step at given parameters: log p(X|θ), log p(θ) and the posterior over latents."""

    log_likelihood: float
    log_prior: float
    posterior: dict  # latent site -> marginal p(z | X, θ), plates first
    most_probable: dict  # latent site -> jointly most probable value


class MStepPaths(dict):
    """`{site: path}`; called with `explain=True` it adds, for each numeric site, why it was
    refused a closed form (`"numeric: <reason>"`)."""

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
    """The best restart did not converge: it hit `max_iter`, stopped at a saddle, collapsed
    or went non-finite (`result.status` and `result.message` say which and what to do)."""


class Status(StrEnum):
    """How a restart ended; compares equal to its name (`result.status == "converged"`)."""

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
    """The outcome of [`EM.run`][bayes_em.api.EM.run]: the best restart, and every restart's
    trajectory.

    Fields (R restarts; T = `max_iter` + 1 iterations, iteration 0 the start):

    - `params`: {site: JAX array of the site's shape}, θ̂ of the best restart at its
      constrained values (ready for NumPyro's `Predictive(model, params=result.params)`);
    - `objective`, `log_likelihood`, `log_prior`: floats, log p(X|θ̂) + log p(θ̂) and its
      two terms (log p(θ̂) = 0 for maximum likelihood);
    - `n_iter` (int), `status` ([`Status`][bayes_em.result.Status], with `message`), `best_restart`
      (int);
    - `restart_params`: {site: (R, ...) array}, every restart's final θ;
    - `restart_objective`, `restart_n_iter`: (R,) arrays; `restart_status`,
      `restart_messages`: R-tuples;
    - `history`: {"objective", "log_prior", "log_likelihood": (R, T) arrays, NaN after a
      restart stopped; "params": {site: (R, T, ...)} with `record_params=True`};
    - `n_decreases` (iterations refused for lowering the objective), `n_evals` (EM maps: 3
      per SQUAREM cycle), `n_accepted` (SQUAREM extrapolations kept), `n_fallbacks`
      (closed-form M-steps the guard redid numerically): (R,) arrays;
    - `sites`: the roles of the model's sites; `settings`: EM's settings as plain data;
    - `posterior`: {latent: array}, p(z | X, θ̂) with the latent's time dim (scan), its plates,
      then its values; `most_probable`: {latent: int array}, the jointly most probable
      latents (both computed on first use).

    `latents`, `problem`, `data` and `model` are what the diagnostics and predictions need
    (the compiled functions, the static problem, the data leaves, the model); they are not
    pickled or saved.
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
    # EM's settings as plain data (bayes_em.persist.run_settings): restarts, max_iter, tol, ...
    settings: dict = field(repr=False, compare=False, default_factory=dict)

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
        """Total log-likelihood log p(X_new | θ̂) (scikit-learn's `score` is the mean)."""
        return _locked(predict_mod.score, self, *args, **kwargs)

    def sample(self, rng_key, *args, num_samples=1, **kwargs) -> dict:
        """Draws of every sample site at θ̂ (`numpyro.infer.Predictive`; pass `None` for an
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
        if self.problem is not None or "mstep_paths" in self._cache:  # they need the problem
            state["_cache"]["mstep_paths"] = dict(self.mstep_paths)
        state["params"] = {k: np.asarray(v) for k, v in self.params.items()}
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["params"] = {k: jnp.asarray(v) for k, v in state["params"].items()}
        for k in self._TRANSIENT:
            state.setdefault(k, None if k != "data" else ())
        state.setdefault("settings", {})  # pickled before results kept their settings
        if state["latents"] is None:
            state["latents"] = _unpickled_latents
        object.__setattr__(self, "__dict__", state)

    # -- on disk (bayes_em.persist) ---------------------------------------------------------------
    def save(self, path, overwrite: bool = False):
        """Write the fit to one `.npz` file, read back by
        [`EMResult.load`][bayes_em.result.EMResult.load] (no Laplace approximation: a fit at a
        saddle or a boundary saves too); an existing file raises `FileExistsError` unless
        `overwrite=True`. See [`bayes_em.persist`][bayes_em.persist]."""
        from bayes_em import persist

        return persist.save(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "EMResult":
        """A result written by [`save`][bayes_em.result.EMResult.save]: every number, no model (like
        an unpickled one)."""
        from bayes_em import persist

        return persist.load(path)

    @staticmethod
    def _settings_of(em) -> dict:  # EM.run records its settings in the result
        from bayes_em import persist

        return persist.run_settings(em)

    @property
    def mstep_paths(self) -> "MStepPaths":
        """How each parameter site was updated: `"closed-form <family>"` or `"numeric"`;
        `result.mstep_paths(explain=True)` also says why a site was refused a closed form."""
        problem = self.problem
        if problem is None and "mstep_paths" in self._cache:  # unpickled or loaded
            return MStepPaths(self._cache["mstep_paths"], {})
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
    def relabel(self, by: str | None = None) -> "EMResult":
        """Every restart relabelled to the best restart's component labels, and with `by` (a
        parameter site, e.g. `"loc"`) the components ordered by that site's rows: see
        [`bayes_em.relabel.align_restarts`][bayes_em.relabel.align_restarts] (only where the model
        has that symmetry)."""
        from bayes_em.relabel import align_restarts

        return align_restarts(self, by)

    def to_inference_data(self, **kwargs):
        """ArviZ `InferenceData`: see
        [`bayes_em.diagnostics.to_inference_data`][bayes_em.inference_data.to_inference_data]."""
        from bayes_em import diagnostics

        return _locked(diagnostics.to_inference_data, self, **kwargs)

    def standard_errors(self, restart: int | None = None) -> dict:
        """Delta-method standard errors: see
        [`bayes_em.diagnostics.standard_errors`][bayes_em.diagnostics.standard_errors]."""
        from bayes_em import diagnostics

        return _locked(diagnostics.standard_errors, self, restart)

    def summary(self, prob: float = 0.9, **kwargs) -> None:
        """Print estimate, standard error and interval of every parameter entry."""
        from bayes_em import diagnostics

        _locked(diagnostics.print_summary, self, prob, **kwargs)

    def bic(self) -> float:
        """−2 log p(X|θ̂) + k log n: see [`bayes_em.diagnostics.bic`][bayes_em.diagnostics.bic]."""
        from bayes_em import diagnostics

        return _locked(diagnostics.bic, self)

    def aic(self) -> float:
        """−2 log p(X|θ̂) + 2k: see [`bayes_em.diagnostics.aic`][bayes_em.diagnostics.aic]."""
        from bayes_em import diagnostics

        return _locked(diagnostics.aic, self)

    def icl(self) -> float:
        """BIC + 2 H[p(Z|X,θ̂)]: see [`bayes_em.diagnostics.icl`][bayes_em.diagnostics.icl]."""
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
