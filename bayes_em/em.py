"""The EM algorithm as pure functions over an immutable state.

    E-step:  w_f = ∂ log Z(θ_t) / ∂ log f           (posterior marginals of every factor)
    M-step:  θ_{t+1} = argmax_θ Σ_f ⟨w_f, log f(θ)⟩   (= Q(θ; θ_t) + log p(θ))

``init`` builds an :class:`EMState`, ``step`` does one iteration, ``run`` iterates under
``lax.while_loop`` until the relative change of log p(X|θ) + log p(θ) drops below ``tol`` or
``max_iter`` iterations are done. ``pending`` is a state whose first E-step is left to the loop's
first pass, so that a compiled fit holds the E-step once. The state holds θ at its constrained
values; only the numeric M-step and SQUAREM work in unconstrained coordinates. With
``hard=True`` the E-step is max-product: all weight on the most probable configuration
(K-means, Viterbi training).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to

from bayes_em.conjugate import closed_form_update
from bayes_em.enumeration import (
    chain_marginals,
    enumerated_model,
    log_factors,
    posterior_weights,
    time_sizes,
)
from bayes_em.mstep import LBFGS, maximize
from bayes_em.sites import ModelSites
from bayes_em.starts import start_weights

__all__ = [
    "RUNNING",
    "CONVERGED",
    "MAX_ITER",
    "NONFINITE",
    "DECREASED",
    "STATUS",
    "EMProblem",
    "EMState",
    "make_problem",
    "pending",
    "constrain",
    "unconstrain",
    "e_step",
    "q_function",
    "init",
    "m_step",
    "step",
    "fallback_step",
    "em_map",
    "squarem",
    "run",
    "random_start",
    "latent_posterior",
    "most_probable",
]

RUNNING, CONVERGED, MAX_ITER, NONFINITE, DECREASED, PENDING, REJECTED, SADDLE = range(8)
STATUS = {
    RUNNING: "running",
    CONVERGED: "converged",
    MAX_ITER: "max_iter",
    NONFINITE: "nonfinite",
    DECREASED: "decreased",
    PENDING: "pending",  # the first E-step is not done yet
    REJECTED: "rejected",  # the guard refused a closed-form M-step: fallback_step goes on
    SADDLE: "saddle",  # converged with two values of a latent indistinguishable: a candidate saddle
}


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


class EMState(NamedTuple):
    params: dict  # parameters θ_t (constrained values: the model's own parametrisation)
    objective: Any  # log p(X|θ_t) + log p(θ_t)  (max_Z log p(X,Z|θ_t) + log p(θ_t) if hard)
    log_prior: Any  # log p(θ_t)
    weights: dict  # E-step weights at θ_t
    n_iter: Any  # M-steps done
    status: Any  # one of STATUS
    n_decreases: Any  # 1 if the restart stopped at an iteration that lowered the objective
    history: Any  # (max_iter + 1, 2): objective and log prior after each iteration
    n_evals: Any = 0  # EM maps evaluated (M-steps); 3 per iteration under SQUAREM
    n_accepted: Any = 0  # SQUAREM extrapolations accepted
    param_history: Any = ()  # {site: (max_iter + 1, ...)} θ_t, if recorded
    n_fallbacks: Any = 0  # closed-form M-steps rejected by the guard (numeric instead)


def make_problem(model, sites, rebuild, max_iter, tol, hard=False, strict=False, solver=LBFGS()):
    """The static problem; closed-form plans are added with ``problem._replace(closed=...)``."""
    return EMProblem(
        enumerated_model(model, sites.max_plate_nesting),
        sites,
        rebuild,
        max_iter,
        tol,
        hard,
        strict,
        solver,
    )


def constrain(problem, u):
    """Constrained values of the sites in ``u`` (unconstrained)."""
    return {p.name: biject_to(p.constraint)(u[p.name]) for p in problem.sites.params if p.name in u}


def unconstrain(problem, params):
    """Unconstrained values of the sites in ``params``; a value on the boundary (a zero
    probability from a closed-form update) maps to a large finite number whose constrained
    image is that boundary value."""
    out = {}
    for p in problem.sites.params:
        if p.name in params:
            u = biject_to(p.constraint).inv(params[p.name])
            big = 2 * float(np.log(jnp.finfo(jnp.result_type(u)).max))
            out[p.name] = jnp.nan_to_num(u, nan=jnp.nan, posinf=big, neginf=-big)
    return out


def _factors(problem, params, data, vectorized=False):
    args, kwargs = problem.rebuild(data)
    params = {k: jnp.asarray(v) for k, v in params.items()}  # host arrays index like the model's
    return log_factors(problem.enum_model, params, args, kwargs, vectorized)


def _log_prior(problem, arrays):
    return sum(
        (jnp.sum(arrays[p.name]) for p in problem.sites.params if p.kind == "map"),
        jnp.zeros((), jnp.result_type(*arrays.values())),
    )


def e_step(problem, params, data, semiring=None):
    """``(log Z, log p(θ), weights)`` at θ = ``params``; log Z = log p(X|θ) + log p(θ)."""
    semiring = semiring or ("max" if problem.hard else "sum")
    arrays, metas = _factors(problem, params, data, vectorized=semiring == "sum")
    log_z, weights = posterior_weights(arrays, metas, semiring, problem.parallel_time)
    return log_z, _log_prior(problem, arrays), weights


def q_function(problem, params, weights, data):
    """Q(θ; θ_t) + log p(θ) = Σ_f ⟨w_f, log f(θ)⟩ (weights held fixed)."""
    arrays, _ = _factors(problem, params, data, vectorized=True)
    weights = jax.lax.stop_gradient(weights)
    return sum(jnp.sum(weights[k] * jnp.where(weights[k] > 0, arrays[k], 0.0)) for k in weights)


def _roundoff(x):
    return 100 * jnp.finfo(jnp.result_type(x)).eps * jnp.maximum(1.0, jnp.abs(x))


def pending(problem, params, data):
    """The state at θ_0 = ``params`` before its first E-step: ``step`` does that E-step alone
    (no M-step), and ``run`` always does it."""
    shapes = jax.eval_shape(lambda: e_step(problem, params, data))  # traced only: nothing runs
    objective = jnp.full((), jnp.nan, shapes[0].dtype)
    weights = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2])
    history = jnp.full((problem.max_iter + 1, 2), jnp.nan, shapes[0].dtype)
    zero = jnp.zeros((), jnp.int32)
    recorded = {}
    if problem.record_params:
        recorded = {k: jnp.full((problem.max_iter + 1,) + jnp.shape(v), jnp.nan, jnp.result_type(v))
                    for k, v in params.items()}
    status = jnp.asarray(PENDING, jnp.int32)
    return EMState(params, objective, objective, weights, zero, status, zero, history, zero, zero,
                   recorded, zero)


def init(problem, params, data):
    """The state at θ_0 = ``params``, after its first E-step."""
    return step(problem, pending(problem, params, data), data)


def m_step(problem, params, weights, data):
    """θ_{t+1}: closed-form updates for the planned parameters (in order, each conditional on
    the ones before), then L-BFGS on Q + log p over the rest in unconstrained space, with the
    closed-form ones fixed (ECM: each update maximises Q given the others' current values)."""
    closed = {c.param for c in problem.closed}
    if closed:
        args, kwargs = problem.rebuild(data)
        params = closed_form_update(problem, problem.closed, params, weights, args, kwargs)
    numeric = {p.name: params[p.name] for p in problem.sites.params if p.name not in closed}
    if numeric:
        sub, _ = maximize(
            lambda v: q_function(problem, {**params, **constrain(problem, v)}, weights, data),
            unconstrain(problem, numeric),
            problem.solver,
        )
        params = {**params, **constrain(problem, sub)}
    return params


def closed_form_step(problem, params, weights, data):
    """The closed-form updates alone (the first part of ``m_step``), for diagnosis."""
    args, kwargs = problem.rebuild(data)
    return closed_form_update(problem, problem.closed, params, weights, args, kwargs)


def em_map(problem, params, weights, data):
    """The EM map θ ↦ F(θ) with the E-step at F(θ): ``(θ, objective, log_prior, weights)``."""
    params = m_step(problem, params, weights, data)
    return (params, *e_step(problem, params, data))


def squarem(problem, state, data):
    """One SQUAREM cycle (Varadhan & Roland 2008, SqS3) from ``state``:

        r = F(θ) − θ,  v = F(F(θ)) − 2F(θ) + θ,  α = −‖r‖/‖v‖ ≤ −1,
        θ' = F(θ − 2αr + α²v),

    in unconstrained coordinates, kept only if its objective is finite and at least that of
    F(F(θ)) (so ascent holds). Returns ``(θ, objective, log_prior, weights, accepted)``.
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


def step(problem, state, data):
    """One EM iteration: M-step from the state's weights, then the E-step at the new θ
    (with ``problem.accelerate``: one SQUAREM cycle of three EM maps). A pending state gets its
    first E-step only: the M-step's result is not used on that pass, so the E-step is compiled
    once."""
    first = state.status == PENDING
    if problem.accelerate:
        def first_e_step():
            return (state.params, *e_step(problem, state.params, data), jnp.zeros((), bool))

        params, objective, log_prior, weights, accepted = lax.cond(
            first, first_e_step, lambda: squarem(problem, state, data)
        )
        evals = 3
    else:
        # a select, not a lax.cond: XLA on CPU runs a conditional's branches out of line, which
        # cost ~20% per iteration of a mixture at N = 1e6; the M-step of the pending pass (on
        # zero weights) is discarded
        stepped = m_step(problem, state.params, state.weights, data)
        params = jax.tree.map(lambda old, new: jnp.where(first, old, new), state.params, stepped)
        objective, log_prior, weights = e_step(problem, params, data)
        accepted, evals = jnp.zeros((), bool), 1
    finite = jnp.isfinite(objective)
    # the guard: an ECM iteration never lowers the objective (each closed form and L-BFGS
    # raise Q + log p, and the E-step closes the gap); an iteration with closed forms that does
    # is rejected: the state stays at θ_t with status "rejected", and ``fallback_step``
    # (compiled only when needed) redoes it with the numeric M-step
    rejected = jnp.zeros((), bool)
    if problem.closed and not problem.accelerate:
        rejected = ~first & finite & (objective - state.objective < -_roundoff(state.objective))
    change = objective - state.objective
    # an iteration that lowers the objective beyond round-off (the numeric M-step included: the
    # E-step's own round-off at these parameters) is not taken: the restart stops at θ_t, the
    # last point of ascent, with status "decreased"
    decreased = ~first & finite & ~rejected & (change < -_roundoff(state.objective))
    tol = problem.tol
    if tol > 0:
        tol = max(tol, 4 * float(jnp.finfo(jnp.result_type(objective)).eps))
        converged = ~first & (jnp.abs(change) <= tol * jnp.abs(state.objective))
    else:
        converged = jnp.zeros((), bool)
    # an iteration counts (and enters the history) only if taken: finite, not rejected by the
    # guard, not lowering the objective
    taken = finite & ~rejected & ~decreased
    n_iter = state.n_iter + jnp.where(~first & taken, 1, 0).astype(jnp.int32)
    evals = jnp.where(first, 0, evals).astype(jnp.int32)
    status = jnp.select(
        [rejected, ~finite, decreased, converged,
         ~first & (n_iter >= problem.max_iter)],
        [REJECTED, NONFINITE, DECREASED, CONVERGED, MAX_ITER],
        RUNNING,
    ).astype(jnp.int32)
    new = EMState(
        params,
        objective,
        log_prior,
        weights,
        n_iter,
        status,
        state.n_decreases + decreased.astype(jnp.int32),
        state.history.at[n_iter].set(jnp.stack([objective, log_prior])),
        state.n_evals + evals,
        state.n_accepted + accepted.astype(jnp.int32),
        {k: h.at[n_iter].set(params[k]) for k, h in state.param_history.items()},
        state.n_fallbacks + rejected.astype(jnp.int32),
    )
    # A non-finite objective keeps the last finite parameters: no fit returns NaN; a rejected
    # or decreasing iteration keeps θ_t and its E-step.
    keep = jax.tree.map(lambda old, nw: jnp.where(taken, nw, old), state, new)
    history = jnp.where(taken, new.history, state.history)
    return keep._replace(status=status, n_iter=n_iter, history=history, n_evals=new.n_evals,
                         n_fallbacks=new.n_fallbacks, n_decreases=new.n_decreases)


def fallback_step(problem, state, data):
    """The iteration the guard rejected, redone with the numeric M-step for every parameter
    (a valid generalised-EM step: L-BFGS keeps only points that do not lower Q + log p)."""
    numeric = problem._replace(closed=())
    return step(numeric, state._replace(status=jnp.asarray(RUNNING, jnp.int32)), data)


def run(problem, state, data, report=None, every=1):
    """Iterate ``step`` until the state stops running (``max_iter`` included); a pending state
    always gets its first E-step.

    ``report(state)``, if given, is traced into the loop and runs every ``every`` iterations and
    when the state stops: the hook for host callbacks (``jax.debug.callback``) such as a
    progress bar, so that a fit with a bar is still one compiled loop.
    """
    def body(s):
        s = step(problem, s, data)
        if report is not None:
            due = (s.n_iter % every == 0) | (s.status != RUNNING)
            lax.cond(due, lambda: report(s), lambda: None)
        return s

    final = lax.while_loop(
        lambda s: (s.status == PENDING) | ((s.status == RUNNING) & (s.n_iter < problem.max_iter)),
        body,
        state,
    )
    # a candidate only: the caller confirms it by the curvature (bayes_em.curvature)
    saddle = (final.status == CONVERGED) & symmetric_latents(problem, final.weights, final.params,
                                                             data)
    return final._replace(status=jnp.where(saddle, SADDLE, final.status).astype(jnp.int32))


def objective_hvp(problem, params, data, v):
    """∇²f(u) v for f(u) = log p(X|θ(u)) + log p(θ(u)) in unconstrained coordinates u, at
    ``params``, with v flat (the layout of ``ravel_pytree`` of the unconstrained sites)."""
    u, unravel = ravel_pytree(unconstrain(problem, params))

    def f(u):
        return e_step(problem, constrain(problem, unravel(u)), data, "sum")[0]

    return jax.jvp(jax.grad(f), (u,), (v.astype(u.dtype),))[1]


def symmetric_latents(problem, weights, params, data, rtol=1e-6):
    """Whether two values of some latent have the same posterior (within ``rtol``) wherever it
    has mass: their parameters cannot be told apart, the symmetric point EM cannot leave (a
    saddle of the objective, e.g. two mixture components with equal parameters). Compared by
    two fixed random projections of each value's posterior weights."""
    _, metas = _factors(problem, params, data, vectorized=not problem.hard)  # shapes only
    latents = set(problem.sites.latents)
    found = jnp.zeros((), bool)
    for m in metas:
        own = [d for d, n in m.dim_to_name if n == m.name]
        w = weights.get(m.name)
        if m.name not in latents or not own or w is None or jnp.ndim(w) != len(m.shape):
            continue
        w = jnp.moveaxis(w, len(m.shape) + own[0], 0).reshape(m.shape[own[0]], -1)
        if w.shape[0] < 2:
            continue
        r = jax.random.uniform(jax.random.PRNGKey(0), (2, w.shape[1]), w.dtype, 0.5, 1.0)
        sig = w @ r.T  # (K, 2): positive where a value has mass
        close = jnp.abs(sig[:, None, :] - sig[None, :, :]) <= rtol * jnp.maximum(
            sig[:, None, :], sig[None, :, :])
        pair = jnp.all(close, -1) & (sig[:, None, 0] > 0) & (sig[None, :, 0] > 0)
        pair = pair & ~jnp.eye(w.shape[0], dtype=bool)
        found = found | jnp.any(pair)
    return found


def random_start(problem, params, data, rng_key, noise=1.0, init="anchors"):
    """θ from one M-step under made-up posterior weights (``bayes_em.starts``): each latent
    value anchored on a data row drawn by k-means++ (``init="anchors"``), or Gumbel noise of
    scale ``noise`` on the latent factors (``init="noise"``)."""
    args, kwargs = problem.rebuild(data)
    weights = start_weights(problem.enum_model, {k: jnp.asarray(v) for k, v in params.items()},
                            args, kwargs, set(problem.sites.latents), rng_key, init, noise,
                            problem.parallel_time)
    return m_step(problem, params, weights, data)


def latent_posterior(problem, params, data):
    """Posterior marginal of every latent site: plates first, then the site's values.

    A latent whose factor is constant over the steps of a vectorised ``scan`` has weights summed
    over time; its marginal at each step comes from a zero "probe" factor over (time, plates,
    latent), whose weight is exactly that marginal.
    """
    arrays, metas = _factors(problem, params, data, vectorized=True)
    # impossible configurations (log f = −∞, a zero transition) as a finite log-density whose
    # exp is exactly 0: the marginals are the same, and their gradients free of ∞ · 0 = NaN
    arrays = {k: jnp.where(a == -jnp.inf, 4 * jnp.log(jnp.finfo(a.dtype).tiny), a)
              if jnp.issubdtype(a.dtype, jnp.floating) else a for k, a in arrays.items()}
    probes = _time_probes(arrays, metas, set(problem.sites.latents))
    probe_arrays = {"@probe:" + m.name: a for m, a in probes.values()}
    probe_metas = tuple(m._replace(name="@probe:" + m.name) for m, _ in probes.values())
    _, weights = posterior_weights({**arrays, **probe_arrays}, metas + probe_metas, "sum",
                                   problem.parallel_time)
    for name, (meta, _) in probes.items():
        weights[name] = weights["@probe:" + name]
    metas = tuple(probes[m.name][0] if m.name in probes else m for m in metas)
    order = problem.sites.plate_order
    return {n: chain_marginals(weights, metas, n, order) for n in problem.sites.latents}


def _time_probes(arrays, metas, latents):
    """{site: (meta, zeros)} for every latent whose factor has a size-1 time dim: a zero factor
    over the site's time dim (full length), plates and own values (observed: not summed)."""
    sizes = time_sizes(metas)
    probes = {}
    for m in metas:
        dims = dict(m.dim_to_name)
        time = [d for d, n in dims.items() if n.startswith("_time")]
        if m.name not in latents or not time or m.shape[time[0]] != 1 or sizes[dims[time[0]]] == 1:
            continue
        keep = {d for d, n in dims.items() if n == m.name or n in m.plates}
        nd = len(m.shape)
        shape = tuple(sizes[dims[time[0]]] if i - nd == time[0] else (s if i - nd in keep else 1)
                      for i, s in enumerate(m.shape))
        dim_to_name = tuple((d, n) for d, n in m.dim_to_name if d == time[0] or d in keep)
        meta = m._replace(dim_to_name=dim_to_name, is_observed=True, shape=shape)
        probes[m.name] = (meta, jnp.zeros(shape, jnp.result_type(arrays[m.name])))
    return probes


def most_probable(problem, params, data):
    """The jointly most probable value of every latent site (max-product; among tied optima one
    is chosen by a fixed random tie-break, see ``enumeration._one_optimum``)."""
    arrays, metas = _factors(problem, params, data)
    _, weights = posterior_weights(arrays, metas, "max", problem.parallel_time)
    order = problem.sites.plate_order
    return {
        n: jnp.argmax(chain_marginals(weights, metas, n, order), axis=-1)
        for n in problem.sites.latents
    }
