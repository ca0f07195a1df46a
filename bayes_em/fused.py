"""Unchunked EM in one pass per iteration, where every parameter has a closed form with additive
statistics ([`bayes_em.additive`][bayes_em.additive]: counts, rates, Gaussian locations with
their scales or covariances):

    E-pass at θ_t:  (log Z(θ_t), s_t = Σ_rows E[t(x, z) | x, θ_t])   (one program, no N-sized state)
    M-step:         θ_{t+1} = M(s_t)                                   (parameter-sized)

The raw statistics are read right after the E-step's weights, from the same trace and the same
hoisted data products (x ⊗ x about the data mean for float64 multivariate normals), so the
loop's state carries the statistics instead of the rows × components weights: no separate
M-step pass re-reading the data, and no N-sized select per iteration. The M-step is the batch
M-step's ECM order (locations, then covariances at the new locations): the same θ_{t+1}.

Used by [`bayes_em.em`][bayes_em.em] when the problem's `fused` layout is set
([`configure`][bayes_em.fused.configure]): soft EM, no SQUAREM, no chunks, no numeric M-step.
Whatever needs the weights themselves (the saddle check, diagnostics, the numeric fallback)
recomputes them at θ.
"""

from __future__ import annotations

from bayes_em import additive
from bayes_em.conjugate import _trace, plan_prior
from bayes_em.estep import e_step
from bayes_em.problem import EMProblem

__all__ = ["configure", "unfused", "e_pass", "m_step"]


def configure(problem: EMProblem) -> EMProblem:
    """`problem` with its `fused` layout where one pass per iteration gives the exact EM
    iteration: unchunked soft EM without SQUAREM, every parameter in closed form, every closed
    form with additive statistics; else unchanged."""
    closed = {plan.param for plan in problem.closed}
    if (problem.chunks is not None or problem.hard or problem.accelerate or not closed
            or any(p.name not in closed for p in problem.sites.params)):
        return problem
    try:
        return problem._replace(fused=additive.layout(problem.closed))
    except ValueError:
        return problem


def unfused(problem: EMProblem) -> EMProblem:
    """`problem` with E-step weights in its state (for code that reads them)."""
    return problem._replace(fused=None)


def e_pass(problem: EMProblem, params: dict, data: tuple) -> tuple:
    """`(log Z, log p(θ), raw statistics)` at θ = `params`: the E-step, then every closed
    form's additive statistics under its weights."""
    log_z, lp, weights = e_step(problem, params, data)
    args, kwargs = problem.rebuild(data)
    tr = _trace(problem.enum_model, params, args, kwargs)
    reference = additive.references(problem.fused, params, tr)
    stats = additive.stats(problem, problem.fused, params, weights, reference, args, kwargs, tr)
    return log_z, lp, stats


def m_step(problem: EMProblem, params: dict, stats: dict, data: tuple) -> dict:
    """θ_{t+1} from the raw statistics at θ_t = `params` (each plan's ML / conjugate MAP
    mode, in the batch M-step's order)."""
    args, kwargs = problem.rebuild(data)
    tr = _trace(problem.enum_model, params, args, kwargs)
    reference = additive.references(problem.fused, params, tr)
    priors = {plan.param: plan_prior(plan, tr) for plan in problem.closed if plan.prior}
    return additive.m_step(problem.fused, params, stats, reference, priors)
