"""How each restart ended, decided on the host after the compiled fit: guard-rejected
iterations redone, candidate saddles confirmed by the curvature, collapses named (the site and
row), the best restart chosen among those at a regular point, and the warnings."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bayes_em import em as core
from bayes_em.curvature import is_saddle
from bayes_em.families import FAMILIES
from bayes_em.result import (
    _ENGINE_LOCK,
    AscentWarning,
    ClosedFormWarning,
    ConvergenceWarning,
    Status,
)

__all__ = ["judge", "redo_rejected", "confirm_saddle", "no_finite_mode", "collapsed"]


def judge(problem, states, data, functions, tol, strict):
    """`(status per restart, messages, best restart)` from the host copy of the final
    `states` (without their E-step weights); warns (or, `strict`, raises) as the statuses
    require."""
    objective = np.asarray(states.objective)
    finite = np.isfinite(objective)
    if not finite.any():
        raise FloatingPointError(
            "Every restart reached a non-finite objective; the fit has no valid parameters."
        )
    status = [Status(core.STATUS[int(s)]) for s in np.asarray(states.status)]
    messages = [st.message for st in status]
    for r in np.flatnonzero(np.asarray(status, dtype=str) == "saddle"):
        status[r], messages[r] = confirm_saddle(problem, functions["hvp"], states.params, r, data)
    for r in np.flatnonzero(np.asarray(status, dtype=str) == "nonfinite"):
        found = no_finite_mode(problem, functions, states, r, data)
        if found:
            status[r], messages[r] = Status.COLLAPSED, f"{found}: {Status.COLLAPSED.message}"
    # parameters that shrank onto a point are a collapse however the restart stopped: a
    # non-finite objective there (the host's update from the last finite state may round to a
    # finite one that `no_finite_mode` cannot name), or a decrease (their log-densities' round-off)
    for r, found in enumerate(collapsed(problem, states.params)):
        if found and status[r] in (Status.CONVERGED, Status.MAX_ITER, Status.DECREASED,
                                   Status.NONFINITE):
            stopped = {Status.DECREASED: " (it stopped where an iteration lowered the objective: "
                                         "round-off of the log-densities near the collapse)",
                       Status.NONFINITE: " (it stopped where the objective became non-finite; "
                                         "the parameters are the last finite ones)"
                       }.get(status[r], "")
            status[r], messages[r] = (Status.COLLAPSED,
                                      f"{found}: {Status.COLLAPSED.message}{stopped}")
    best = _best(objective, finite, status)
    _warn(states, status, messages, best, tol, strict)
    return tuple(status), tuple(messages), best


def _best(objective, finite, status):
    """The best objective among restarts that ended at a regular point (converged, still
    ascending, or stopped at the limit of the numerics), else among the finite ones."""
    good = finite & np.isin(np.asarray(status, dtype=str), ["converged", "max_iter", "decreased"])
    pool = good if good.any() else finite
    return int(np.argmax(np.where(pool, objective, -np.inf)))


def _warn(states, status, messages, best, tol, strict):
    if status[best] != Status.CONVERGED and not (status[best] == Status.MAX_ITER and tol == 0):
        warnings.warn(f"The best restart ({best}) ended '{status[best]}': {messages[best]}.",
                      ConvergenceWarning, stacklevel=6)
    # a decrease at a collapse is the collapse's numerics (its status and message say so), as
    # for the guard's fallbacks below
    n_decreases = np.asarray(states.n_decreases) * (np.asarray(status, dtype=str) != "collapsed")
    if n_decreases.any():
        msg = (
            f"An iteration lowered the objective by more than round-off in restarts "
            f"{np.flatnonzero(n_decreases).tolist()}; they stopped at their last point of "
            "ascent (status 'decreased')."
        )
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, AscentWarning, stacklevel=6)
    # a collapse makes the E-step's numerics fail near it: not the closed forms' fault
    suspect = np.asarray(states.n_fallbacks) * (np.asarray(status, dtype=str) != "collapsed")
    if suspect.any():
        warnings.warn(
            f"An iteration with closed-form M-steps lowered the objective in "
            f"{int(suspect.sum())} case(s) (restarts "
            f"{np.flatnonzero(suspect).tolist()}); the guard rejected it and used the "
            "numeric M-step there. Please report the model; "
            "closed_form=False avoids the closed forms altogether.",
            ClosedFormWarning, stacklevel=6)


def confirm_saddle(problem, hvp, restart_params, r, data):
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


def no_finite_mode(problem, functions, states, r, data):
    """For a restart that ended non-finite: the first closed-form parameter whose update from
    the last finite state has no finite value on a row with data, or makes the objective
    non-finite ("" if none). Under maximum likelihood that is a zero scatter: every point
    weighted to the row is one point (or, for a covariance, lies on a lower-dimensional set),
    and the likelihood is unbounded."""
    if not problem.closed:
        return ""
    params = jax.tree.map(lambda x: jnp.asarray(x[r]), states.params)
    with _ENGINE_LOCK:
        # the E-step weights at the last finite state (the compiled fit does not return them)
        weights = functions["weights"](params, data)
        new = jax.device_get(functions["closed"](params, weights, data))
        for plan in problem.closed:  # in update order, each conditional on the ones before
            v = np.asarray(new[plan.param])
            params = {**params, plan.param: jnp.asarray(v)}
            event = FAMILIES[plan.family].event_ndim
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


def collapsed(problem, restart_params, ratio=1e-4):
    """Per restart, a description of the first maximum-likelihood scale or covariance that
    shrank towards 0 ("" if none): a covariance eigenvalue below `ratio`² of the site's largest
    (a flat component, or one shrinking onto a point), or a closed-form Normal scale below
    `ratio` of the site's largest."""
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
                    idx = [int(i) for i in np.unravel_index(k, cov.shape[:-2])]
                    out[r] = (f"site '{p.name}'{idx if idx else ''}: smallest eigenvalue "
                              f"{eig[k, 0]:.3g} against largest {eig[k, -1]:.3g}")
            elif p.name in scales and v.size > 1:
                flat = v.reshape(-1)
                bad = flat <= ratio * flat.max()
                if bad.any():
                    k = int(np.flatnonzero(bad)[0])
                    idx = [int(i) for i in np.unravel_index(k, v.shape)]
                    out[r] = f"site '{p.name}'{idx}: scale {flat[k]:.3g} against {flat.max():.3g}"
    return out


def redo_rejected(states, fallback, data):
    """Restarts stopped by the guard (a closed-form iteration that lowered the objective) go on:
    that iteration numerically, then the compiled loop again."""
    status = np.asarray(jax.device_get(states.status))
    while (status == core.REJECTED).any():
        for r in np.flatnonzero(status == core.REJECTED):
            one = fallback(jax.tree.map(lambda x: x[r], states), data)
            states = jax.tree.map(lambda x, y: x.at[r].set(y), states, one)
        status = np.asarray(jax.device_get(states.status))
    return states
