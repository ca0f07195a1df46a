"""The static problem of a fit and the one enumerated trace of its model.

An [`EMProblem`][bayes_em.problem.EMProblem] holds everything about a fit that does not change while
it runs: the enumerated model, the roles of its sites, how to rebuild the model's arguments from
data leaves, the settings and the closed-form plans. [`factors`][bayes_em.problem.factors] is the
single place the model is traced (`bayes_em.factors.log_factors`); the E-step, the M-step, the
diagnostics and the predictions all read it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to

from bayes_em.factors import Factors, enumerated_model, log_factors
from bayes_em.lbfgs import LBFGS
from bayes_em.sites import ModelSites

__all__ = ["EMProblem", "make_problem", "factors", "log_prior", "constrain", "unconstrain"]


class EMProblem(NamedTuple):
    """Everything static about a fit: the enumerated model and its settings."""

    enum_model: Callable
    sites: ModelSites
    rebuild: Callable  # data leaves -> (args, kwargs)
    max_iter: int
    tol: float
    hard: bool = False
    strict: bool = False
    solver: LBFGS = LBFGS()
    closed: tuple = ()  # conjugate.ClosedForm plans: parameters updated in closed form
    refused: tuple = ()  # (site, reason): why the other parameters take the numeric M-step
    accelerate: bool = False  # SQUAREM extrapolation with a monotonicity safeguard
    record_params: bool = False  # keep θ_t of every iteration in the state
    parallel_time: bool = False  # Markov chains by the log-depth contraction (accelerators)
    chunks: Any = None  # chunked.Chunks: the data plate in chunks of rows (None: whole)
    fused: Any = None  # additive.Layout: one pass per iteration, statistics in the state


def make_problem(model, sites: ModelSites, rebuild: Callable, max_iter: int, tol: float,
                 hard: bool = False, strict: bool = False, solver: LBFGS = LBFGS()) -> EMProblem:
    """The static problem; closed-form plans are added with `problem._replace(closed=...)`."""
    return EMProblem(enumerated_model(model, sites.max_plate_nesting), sites, rebuild, max_iter,
                     tol, hard, strict, solver)


def factors(problem: EMProblem, params: dict, data: tuple, vectorized: bool = False) -> Factors:
    """The model's log-factors at θ = `params` (constrained values) on `data` (leaves)."""
    args, kwargs = problem.rebuild(data)
    params = {k: jnp.asarray(v) for k, v in params.items()}  # host arrays index like the model's
    return log_factors(problem.enum_model, params, args, kwargs, vectorized)


def log_prior(problem: EMProblem, factors: Factors):
    """log p(θ): the sum of the MAP sites' prior factors (0 for ML)."""
    return sum((jnp.sum(factors.logs[p.name]) for p in problem.sites.params if p.kind == "map"),
               jnp.zeros((), factors.dtype))


def constrain(problem: EMProblem, u: dict) -> dict:
    """Constrained values of the sites in `u` (unconstrained)."""
    return {p.name: biject_to(p.constraint)(u[p.name]) for p in problem.sites.params if p.name in u}


def unconstrain(problem: EMProblem, params: dict) -> dict:
    """Unconstrained values of the sites in `params`; a value on the boundary (a zero
    probability from a closed-form update) maps to a large finite number whose constrained
    image is that boundary value."""
    out = {}
    for p in problem.sites.params:
        if p.name in params:
            u = biject_to(p.constraint).inv(params[p.name])
            big = 2 * float(np.log(jnp.finfo(jnp.result_type(u)).max))
            out[p.name] = jnp.nan_to_num(u, nan=jnp.nan, posinf=big, neginf=-big)
    return out
