"""The M-step: θ_{t+1} = argmax_θ Q(θ; θ_t) + log p(θ), with Q(θ; θ_t) + log p(θ) =
Σ_f ⟨w_f, log f(θ)⟩ for the E-step's weights w_f held fixed.

Closed-form updates for the planned parameters (`bayes_em.conjugate`), in order, each
conditional on the ones before, then L-BFGS (`bayes_em.lbfgs`) on the rest in unconstrained
space with the closed-form ones fixed (ECM: each update maximises Q given the others' values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bayes_em.conjugate import closed_form_update
from bayes_em.lbfgs import LBFGS, maximize
from bayes_em.problem import EMProblem, constrain, factors, unconstrain

__all__ = ["LBFGS", "q_function", "m_step", "closed_form_step"]


def q_function(problem: EMProblem, params: dict, weights: dict, data: tuple):
    """Q(θ; θ_t) + log p(θ) = Σ_f ⟨w_f, log f(θ)⟩ (weights held fixed)."""
    logs = factors(problem, params, data, vectorized=True).logs
    weights = jax.lax.stop_gradient(weights)
    return sum(jnp.sum(weights[k] * jnp.where(weights[k] > 0, logs[k], 0.0)) for k in weights)


def m_step(problem: EMProblem, params: dict, weights: dict, data: tuple) -> dict:
    """θ_{t+1}: the closed-form updates, then L-BFGS on Q + log p over the other parameters.
    A chunked problem (`problem.chunks`) reads `weights` as the first stage's statistics
    (`bayes_em.chunked.m_step`)."""
    if problem.chunks is not None:
        from bayes_em import chunked

        return chunked.m_step(problem, params, weights, data)
    closed = {c.param for c in problem.closed}
    if closed:
        params = closed_form_step(problem, params, weights, data)
    numeric = {p.name: params[p.name] for p in problem.sites.params if p.name not in closed}
    if numeric:
        sub, _ = maximize(
            lambda v: q_function(problem, {**params, **constrain(problem, v)}, weights, data),
            unconstrain(problem, numeric),
            problem.solver,
        )
        params = {**params, **constrain(problem, sub)}
    return params


def closed_form_step(problem: EMProblem, params: dict, weights: dict, data: tuple) -> dict:
    """The closed-form updates alone (the first part of [`m_step`][bayes_em.mstep.m_step]); a
    chunked problem recomputes the weights at `params` chunk by chunk (`weights` unused)."""
    if problem.chunks is not None:
        from bayes_em import chunked

        return chunked.closed_form_step(problem, params, data)
    args, kwargs = problem.rebuild(data)
    return closed_form_update(problem, problem.closed, params, weights, args, kwargs)
