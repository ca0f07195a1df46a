"""The EM algorithm as pure functions over an immutable state.

    E-step:  w_f = ∂ log Z(θ_t) / ∂ log f           (posterior marginals of every factor)
    M-step:  θ_{t+1} = argmax_θ Σ_f ⟨w_f, log f(θ)⟩   (= Q(θ; θ_t) + log p(θ))

`init` builds an `EMState`, `step` does one iteration, `run` iterates under
`lax.while_loop` until the relative change of log p(X|θ) + log p(θ) drops below `tol` or
`max_iter` iterations are done; `step` returns the new state and a
[`StepInfo`][bayes_em.em.StepInfo]. `pending` is a `fresh` state whose first E-step is left to the
loop's first pass, so that a compiled fit holds the E-step once. The state holds θ at its
constrained values; only the numeric M-step and SQUAREM work in unconstrained coordinates. With
`hard=True` the E-step is max-product: all weight on the most probable configuration
(K-means, Viterbi training).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.flatten_util import ravel_pytree

from bayes_em import fused
from bayes_em.estep import (
    e_step,
    latent_posterior,
    max_product_factors,
    most_probable,
    posterior_weights,
    symmetric_latents,
)
from bayes_em.mstep import closed_form_step, m_step, q_function
from bayes_em.problem import (
    EMProblem,
    constrain,
    factors,
    log_prior,
    make_problem,
    unconstrain,
)
from bayes_em.starts import start_weights

__all__ = [
    "Status",
    "STATUS",
    "EMProblem",
    "EMState",
    "StepInfo",
    "make_problem",
    "factors",
    "log_prior",
    "pending",
    "abstract_factors",
    "constrain",
    "unconstrain",
    "e_step",
    "posterior_weights",
    "q_function",
    "init",
    "m_step",
    "closed_form_step",
    "step",
    "fallback_step",
    "em_map",
    "squarem",
    "run",
    "terminated",
    "random_start",
    "latent_posterior",
    "most_probable",
    "symmetric_latents",
    "objective_hvp",
]


class Status(IntEnum):
    """Where a restart's loop stands: an int32 in `EMState` (jit-able), with a message.
    The public [`bayes_em.result.Status`][bayes_em.result.Status] is its lower-case name
    (`collapsed` is diagnosed on the host)."""

    RUNNING = 0
    CONVERGED = 1
    MAX_ITER = 2
    NONFINITE = 3
    DECREASED = 4
    REJECTED = 6
    SADDLE = 7

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.RUNNING: "iterating",
    Status.CONVERGED: "the relative change of the objective fell below tol",
    Status.MAX_ITER: "max_iter iterations ran",
    Status.NONFINITE: "the objective became non-finite; the parameters are the last finite ones",
    Status.DECREASED: "the next iteration would have lowered the objective beyond round-off",
    Status.REJECTED: "the guard refused a closed-form M-step (fallback_step redoes it)",
    Status.SADDLE: "converged with two values of a latent indistinguishable: a candidate saddle",
}

RUNNING, CONVERGED, MAX_ITER, NONFINITE, DECREASED, REJECTED, SADDLE = (
    Status.RUNNING, Status.CONVERGED, Status.MAX_ITER, Status.NONFINITE, Status.DECREASED,
    Status.REJECTED, Status.SADDLE)
STATUS = {int(s): s.name.lower() for s in Status}  # code -> public name


class EMState(NamedTuple):
    params: dict  # parameters θ_t (constrained values: the model's own parametrisation)
    objective: Any  # log p(X|θ_t) + log p(θ_t)  (max_Z log p(X,Z|θ_t) + log p(θ_t) if hard)
    log_prior: Any  # log p(θ_t)
    weights: dict  # E-step weights at θ_t
    n_iter: Any  # M-steps done
    status: Any  # a Status code (int32)
    n_decreases: Any  # 1 if the restart stopped at an iteration that lowered the objective
    history: Any  # (max_iter + 1, 2): objective and log prior after each iteration
    n_evals: Any = 0  # EM maps evaluated (M-steps); 3 per iteration under SQUAREM
    n_accepted: Any = 0  # SQUAREM extrapolations accepted
    param_history: Any = ()  # {site: (max_iter + 1, ...)} θ_t, if recorded
    n_fallbacks: Any = 0  # closed-form M-steps rejected by the guard (numeric instead)
    fresh: Any = False  # True until the first E-step (a state from ``pending``)


class StepInfo(NamedTuple):
    """What one [`step`][bayes_em.em.step] did: the change of the objective it proposed, and whether
    the iteration was taken (finite, not rejected by the guard, not lowering the objective)."""

    change: Any
    taken: Any
    rejected: Any
    decreased: Any
    converged: Any


def _roundoff(x):
    return 100 * jnp.finfo(jnp.result_type(x)).eps * jnp.maximum(1.0, jnp.abs(x))


def abstract_factors(problem: EMProblem, params: dict, data: tuple):
    """The log-factors the E-step weighs (the max-product's trace if `problem.hard`), as
    shapes with their metas: traced only, nothing runs. The E-step's weights have their
    shapes."""
    def fs():
        if problem.hard:
            return max_product_factors(problem, params, data)
        return factors(problem, params, data, vectorized=True)
    return jax.eval_shape(fs)


def _objective_dtype(abstract):
    """The dtype of log Z from factors `abstract` (their logs, promoted by plate weights)."""
    return jnp.result_type(*abstract.logs.values(), *abstract.plate_weights.values())


def pending(problem: EMProblem, params: dict, data: tuple, abstract=None) -> EMState:
    """The state at θ_0 = `params` before its first E-step (`fresh`): `step` does that
    E-step alone (no M-step), and `run` always does it. A chunked or fused problem's
    `weights` are closed-form statistics (`bayes_em.chunked`, `bayes_em.fused`), nothing
    N-sized.
    `abstract`: [`abstract_factors`][bayes_em.em.abstract_factors] at these shapes, if known."""
    if problem.chunks is not None or problem.fused is not None:  # traced only: nothing runs
        dtype, weights = (lambda s: (s[0].dtype, s[2]))(
            jax.eval_shape(lambda: _e_step(problem, params, data)))
    else:  # the weights are ∂ log Z / ∂ log f: the factors' shapes, no contraction traced
        abstract = abstract or abstract_factors(problem, params, data)
        dtype, weights = _objective_dtype(abstract), abstract.logs
    objective = jnp.full((), jnp.nan, dtype)
    weights = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), weights)
    history = jnp.full((problem.max_iter + 1, 2), jnp.nan, dtype)
    zero = jnp.zeros((), jnp.int32)
    recorded = {}
    if problem.record_params:
        recorded = {k: jnp.full((problem.max_iter + 1,) + jnp.shape(v), jnp.nan, jnp.result_type(v))
                    for k, v in params.items()}
    status = jnp.asarray(RUNNING, jnp.int32)
    return EMState(params, objective, objective, weights, zero, status, zero, history, zero, zero,
                   recorded, zero, jnp.ones((), bool))


def init(problem: EMProblem, params: dict, data: tuple) -> EMState:
    """The state at θ_0 = `params`, after its first E-step."""
    return step(problem, pending(problem, params, data), data)[0]


def _e_step(problem, params, data):
    """`(objective, log prior, weights)`: the E-step, or a chunked problem's E-pass."""
    if problem.chunks is not None:
        from bayes_em import chunked

        return chunked.e_pass(problem, params, data)
    if problem.fused is not None:
        return fused.e_pass(problem, params, data)
    return e_step(problem, params, data)


def em_map(problem: EMProblem, params: dict, weights: dict, data: tuple) -> tuple:
    """The EM map θ ↦ F(θ) with the E-step at F(θ): `(θ, objective, log_prior, weights)`."""
    params = m_step(problem, params, weights, data)
    return (params, *e_step(problem, params, data))


def squarem(problem: EMProblem, state: EMState, data: tuple) -> tuple:
    """One SQUAREM cycle (Varadhan & Roland 2008, SqS3) from `state`:

        r = F(θ) − θ,  v = F(F(θ)) − 2F(θ) + θ,  α = −‖r‖/‖v‖ ≤ −1,
        θ' = F(θ − 2αr + α²v),

    in unconstrained coordinates, kept only if its objective is finite and at least that of
    F(F(θ)) (so ascent holds). Returns `(θ, objective, log_prior, weights, accepted)`.
    """
    one = em_map(problem, state.params, state.weights, data)
    two = em_map(problem, one[0], one[3], data)
    u0, u1, u2 = (unconstrain(problem, p) for p in (state.params, one[0], two[0]))
    r = jax.tree.map(lambda a, b: a - b, u1, u0)
    v = jax.tree.map(lambda c, b, a: c - 2 * b + a, u2, u1, u0)
    sq = lambda t: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))  # noqa: E731
    rr, vv = sq(r), sq(v)
    alpha = jnp.where(vv > 0, -jnp.sqrt(rr / jnp.where(vv > 0, vv, 1.0)), -1.0)
    alpha = jnp.minimum(alpha, -1.0)
    ext = constrain(problem, jax.tree.map(lambda a, b, c: a - 2 * alpha * b + alpha**2 * c,
                                          u0, r, v))
    _, _, w_ext = e_step(problem, ext, data)
    three = em_map(problem, ext, w_ext, data)
    ok = jnp.isfinite(three[1]) & (three[1] >= two[1]) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(three[0])])
    )
    best = jax.tree.map(lambda a, b: jnp.where(ok, a, b), three, two)
    return (*best, ok)


def _propose(problem, state, data):
    """`(θ, objective, log_prior, weights, accepted, evals)` of one EM iteration from
    `state` (one SQUAREM cycle with `problem.accelerate`); a fresh state gets its first
    E-step at its own θ."""
    first = state.fresh
    if problem.accelerate:
        def first_e_step():
            return (state.params, *e_step(problem, state.params, data), jnp.zeros((), bool))

        out = lax.cond(first, first_e_step, lambda: squarem(problem, state, data))
        return (*out, 3)
    if problem.chunks is not None:  # passes over the chunks: skipped on the fresh pass
        params = lax.cond(first, lambda: state.params, lambda: jax.tree.map(
            lambda old, new: new.astype(old.dtype), state.params,
            m_step(problem, state.params, state.weights, data)))
        return (params, *_e_step(problem, params, data), jnp.zeros((), bool), 1)
    if problem.fused is not None:  # statistics in the state: the M-step is parameter-sized
        stepped = fused.m_step(problem, state.params, state.weights, data)
        params = jax.tree.map(lambda old, new: jnp.where(first, old, new.astype(old.dtype)),
                              state.params, stepped)
        return (params, *_e_step(problem, params, data), jnp.zeros((), bool), 1)
    # a select, not a lax.cond: XLA on CPU runs a conditional's branches out of line, which
    # cost ~20% per iteration of a mixture at N = 1e6; the M-step of the fresh pass (on zero
    # weights) is discarded
    stepped = m_step(problem, state.params, state.weights, data)
    params = jax.tree.map(lambda old, new: jnp.where(first, old, new), state.params, stepped)
    return (params, *e_step(problem, params, data), jnp.zeros((), bool), 1)


def _judge(problem, state, objective) -> StepInfo:
    """Is the proposed iteration taken, and does the restart stop? An ECM iteration never
    lowers the objective (each closed form and L-BFGS raise Q + log p, the E-step closes the
    gap): one with closed forms that does is rejected by the guard (`fallback_step` redoes
    it numerically); any other that lowers it beyond round-off is not taken (`decreased`)."""
    first = state.fresh
    finite = jnp.isfinite(objective)
    change = objective - state.objective
    falls = ~first & finite & (change < -_roundoff(state.objective))
    guarded = bool(problem.closed) and not problem.accelerate
    rejected = falls if guarded else jnp.zeros((), bool)
    decreased = falls & ~rejected
    if problem.tol > 0:
        tol = max(problem.tol, 4 * float(jnp.finfo(jnp.result_type(objective)).eps))
        converged = ~first & (jnp.abs(change) <= tol * jnp.abs(state.objective))
    else:
        converged = jnp.zeros((), bool)
    return StepInfo(change, finite & ~rejected & ~decreased, rejected, decreased, converged)


def step(problem: EMProblem, state: EMState, data: tuple) -> tuple[EMState, StepInfo]:
    """One EM iteration: M-step from the state's weights, then the E-step at the new θ
    (with `problem.accelerate`: one SQUAREM cycle of three EM maps). A fresh state gets its
    first E-step only: the M-step's result is not used on that pass, so the E-step is compiled
    once. An iteration not taken (non-finite, rejected, decreasing) leaves θ_t, its E-step and
    the history as they were: no fit returns NaN, and the recorded objective is monotone."""
    params, objective, log_prior_, weights, accepted, evals = _propose(problem, state, data)
    info = _judge(problem, state, objective)
    first = state.fresh
    n_iter = state.n_iter + jnp.where(~first & info.taken, 1, 0).astype(jnp.int32)
    status = jnp.select(
        [info.rejected, ~jnp.isfinite(objective), info.decreased, info.converged,
         ~first & (n_iter >= problem.max_iter)],
        [REJECTED, NONFINITE, DECREASED, CONVERGED, MAX_ITER],
        RUNNING,
    ).astype(jnp.int32)
    moved = state._replace(
        params=params, objective=objective, log_prior=log_prior_, weights=weights,
        param_history={k: h.at[n_iter].set(params[k]) for k, h in state.param_history.items()})
    kept = jax.tree.map(lambda old, new: jnp.where(info.taken, new, old), state, moved)
    history = state.history.at[n_iter].set(jnp.stack([objective, log_prior_]))
    new = kept._replace(
        status=status,
        n_iter=n_iter,
        history=jnp.where(info.taken, history, state.history),
        n_evals=state.n_evals + jnp.where(first, 0, evals).astype(jnp.int32),
        n_accepted=state.n_accepted + (info.taken & accepted).astype(jnp.int32),
        n_decreases=state.n_decreases + info.decreased.astype(jnp.int32),
        n_fallbacks=state.n_fallbacks + info.rejected.astype(jnp.int32),
        fresh=jnp.zeros((), bool),
    )
    return new, info


def fallback_step(problem: EMProblem, state: EMState, data: tuple) -> tuple[EMState, StepInfo]:
    """The iteration the guard rejected, redone with the numeric M-step for every parameter
    (a valid generalised-EM step: L-BFGS keeps only points that do not lower Q + log p)."""
    numeric = problem._replace(closed=(), fused=None)
    return step(numeric, state._replace(status=jnp.asarray(RUNNING, jnp.int32)), data)


def terminated(problem: EMProblem, state: EMState):
    """Has the restart stopped (a traced bool)? A fresh state has not."""
    return ~state.fresh & ((state.status != RUNNING) | (state.n_iter >= problem.max_iter))


def run(problem: EMProblem, state: EMState, data: tuple, report: Callable | None = None,
        every: int = 1, metas: tuple | None = None) -> EMState:
    """Iterate `step` until the state stops running (`max_iter` included); a fresh state
    always gets its first E-step. A converged restart whose latent values are
    indistinguishable ends `saddle` (a candidate: the host confirms it by the curvature).

    `report(state)`, if given, is traced into the loop and runs every `every` iterations and
    when the state stops: the hook for host callbacks (`jax.debug.callback`) such as a
    progress bar, so that a fit with a bar is still one compiled loop. `metas`: those of
    [`abstract_factors`][bayes_em.em.abstract_factors], if known (else traced again).
    """
    def body(s):
        s, _ = step(problem, s, data)
        if report is not None:
            due = (s.n_iter % every == 0) | (s.status != RUNNING)
            lax.cond(due, lambda: report(s), lambda: None)
        return s

    final = lax.while_loop(lambda s: ~terminated(problem, s), body, state)
    if problem.chunks is not None:
        from bayes_em import chunked

        symmetric = chunked.symmetric_latents(problem, final.params, data)
    elif problem.fused is not None:  # the weights at the final θ, where it converged
        symmetric = lax.cond(final.status == CONVERGED, lambda: symmetric_latents(
            problem, e_step(problem, final.params, data)[2], final.params, data),
            lambda: jnp.zeros((), bool))
    else:
        symmetric = symmetric_latents(problem, final.weights, final.params, data, metas=metas)
    saddle = (final.status == CONVERGED) & symmetric
    return final._replace(status=jnp.where(saddle, SADDLE, final.status).astype(jnp.int32))


def objective_hvp(problem: EMProblem, params: dict, data: tuple, v: Array) -> Array:
    """∇²f(u) v for f(u) = log p(X|θ(u)) + log p(θ(u)) in unconstrained coordinates u, at
    `params`, with v flat (the layout of `ravel_pytree` of the unconstrained sites)."""
    u, unravel = ravel_pytree(unconstrain(problem, params))

    def f(u):
        return e_step(problem, constrain(problem, unravel(u)), data, "sum")[0]

    return jax.jvp(jax.grad(f), (u,), (v.astype(u.dtype),))[1]


def random_start(problem: EMProblem, params: dict, data: tuple, rng_key: Array,
                 noise: float = 1.0, init: str = "anchors") -> dict:
    """θ from one M-step under made-up posterior weights (`bayes_em.starts`): each latent
    value anchored on a data row drawn by k-means++ (`init="anchors"`), or Gumbel noise of
    scale `noise` on the latent factors (`init="noise"`). The whole data at once, for a
    chunked problem too."""
    problem = problem._replace(chunks=None)
    args, kwargs = problem.rebuild(data)
    weights = start_weights(problem.enum_model, {k: jnp.asarray(v) for k, v in params.items()},
                            args, kwargs, set(problem.sites.latents), rng_key, init, noise,
                            problem.parallel_time)
    return m_step(problem, params, weights, data)
