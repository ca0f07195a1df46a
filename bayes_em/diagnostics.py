"""Diagnostics of an EM fit: Laplace approximation, standard errors, information criteria,
the lower-bound decomposition, ArviZ conversion and persistence.

Everything is computed from the model itself (through `result.problem`): the objective

    f(v) = log p(X | θ(v)) + log p(θ(v)),     θ(v) = the constraint transforms of the flat vector v,

with the latents summed out exactly, is differentiated twice by autodiff in unconstrained space
(sites flattened with `jax.flatten_util.ravel_pytree`). As in the fit, the prior is the density
of the constrained value: no Jacobian of the transforms enters f.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bayes_em import em as core
from bayes_em.contraction import pointwise_log_likelihood as _pointwise
from bayes_em.estep import posterior_weights

__all__ = [
    "Laplace",
    "objective_function",
    "observed_information",
    "laplace",
    "standard_errors",
    "summary",
    "format_summary",
    "print_summary",
    "num_free_parameters",
    "num_observations",
    "data_plate",
    "pointwise_log_likelihood",
    "posterior_entropy",
    "bic",
    "aic",
    "icl",
    "lower_bound_trace",
]

# -- compiled functions and the static factor layout, cached on the result ----------------------
def _data_key(result):
    return tuple((jnp.shape(d), str(jnp.result_type(d))) for d in result.data)


def _need_problem(result):
    if result.problem is None:
        raise ValueError("This EMResult carries no model or data (it was unpickled or loaded from "
                         "a file): diagnostics need a result of EM.run. Refit with "
                         "EM(model, init_values=result.params) to get them.")


def _cached(result, name, build):
    _need_problem(result)
    key = ("diagnostics", name, _data_key(result))
    if key not in result._cache:
        result._cache[key] = build()
    return result._cache[key]


def _map_sites(problem):
    return tuple(p.name for p in problem.sites.params if p.kind == "map")


def _metas(result):
    """The static description of every log-factor (one abstract trace, cached)."""

    def build():
        return jax.eval_shape(lambda p, d: core.factors(result.problem, p, d),
                              dict(result.params), result.data).metas

    return _cached(result, "metas", build)


class _Functions(NamedTuple):
    unravel: Callable  # flat v -> {site: unconstrained array}
    unravel_constrained: Callable  # flat constrained vector -> {site: constrained array}
    objective: Callable  # (v, data) -> log p(X|θ) + log p(θ)
    hessian: Callable  # (v, data) -> ∇²_v objective
    constrained: Callable  # v -> flat constrained vector
    jacobian: Callable  # v -> ∂ constrained / ∂ v
    pointwise: Callable  # (V, data) -> (n_draws, n_points) log p(x_n | θ)
    log_prior: Callable  # (V, data) -> (n_draws,) log p(θ)


def _functions(result) -> _Functions:
    plate = data_plate(result)

    def build():
        problem = result.problem
        _, unravel = ravel_pytree(core.unconstrain(problem, result.params))
        _, unravel_c = ravel_pytree(dict(result.params))
        drop = _map_sites(problem)

        def params(v):
            return core.constrain(problem, unravel(v))

        def objective(v, data):
            return core.e_step(problem, params(v), data, semiring="sum")[0]

        def constrained(v):
            return ravel_pytree(params(v))[0]

        def pointwise(v, data):
            return _pointwise(core.factors(problem, params(v), data), plate, drop)

        def log_prior(v, data):
            return core.log_prior(problem, core.factors(problem, params(v), data))

        # lax.map, not vmap, over draws: batched linear algebra under vmap has hung on CPU.
        return _Functions(
            unravel,
            unravel_c,
            jax.jit(objective),
            jax.jit(jax.hessian(objective)),
            jax.jit(constrained),
            jax.jit(jax.jacfwd(constrained)),
            jax.jit(lambda V, data: jax.lax.map(lambda v: pointwise(v, data), V)),
            jax.jit(lambda V, data: jax.lax.map(lambda v: log_prior(v, data), V)),
        )

    return _cached(result, ("functions", plate), build)


def _restart(result, restart):
    r = result.best_restart if restart is None else int(restart)
    if not 0 <= r < result.n_restarts:
        raise ValueError(f"restart must be in [0, {result.n_restarts}), got {restart!r}.")
    return r


def _params(result, restart=None):
    r = _restart(result, restart)
    return {k: v[r] for k, v in result.restart_params.items()}


def _flat_u(result, restart=None):
    _need_problem(result)
    return ravel_pytree(core.unconstrain(result.problem, _params(result, restart)))[0]


# -- the objective and its curvature -------------------------------------------------------------
def objective_function(result):
    """`(f, v̂)`: f(v) = log p(X|θ(v)) + log p(θ(v)) on the flat unconstrained vector v (jitted,
    latents summed out) and v̂, the best restart's optimum; e.g. for finite-difference checks."""
    fns = _functions(result)
    def objective(v):
        return float(fns.objective(jnp.asarray(v), result.data))

    return objective, np.asarray(_flat_u(result))


def observed_information(result, restart=None) -> np.ndarray:
    """I(v̂) = −∇²_v [log p(X|θ) + log p(θ)] at a restart's optimum (default: the best), by exact
    autodiff in unconstrained space; rows follow `ravel_pytree` of the unconstrained sites."""
    return -np.asarray(_functions(result).hessian(_flat_u(result, restart), result.data))


class Laplace(NamedTuple):
    """Gaussian approximation v ~ N(mean, cov) of the fit in unconstrained space."""

    mean: np.ndarray  # v̂: the flat unconstrained optimum
    cov: np.ndarray  # I(v̂)⁻¹
    restart: int


def laplace(result, restart=None) -> Laplace:
    """The Laplace approximation at a restart's optimum: v ~ N(v̂, I(v̂)⁻¹).

    Raises `ValueError` when I(v̂) is not positive definite (no strict local maximum: parameters
    not identified, an optimum on the boundary, or a fit that has not converged)."""
    r = _restart(result, restart)
    info = observed_information(result, r)
    info = 0.5 * (info + info.T)
    eig = np.linalg.eigvalsh(info)
    if not np.all(np.isfinite(eig)) or eig[0] <= 0:
        raise ValueError(
            f"The observed information at restart {r} is not positive definite (smallest "
            f"eigenvalue {eig[0]:.3g}): the optimum is not a strict local maximum of the "
            "objective in unconstrained space (parameters not identified, an optimum on the "
            "boundary, or EM not converged), so standard errors and the Laplace approximation "
            "are undefined there."
        )
    return Laplace(np.asarray(_flat_u(result, r)), np.linalg.inv(info), r)


def standard_errors(result, restart=None) -> dict:
    """Standard errors of the constrained parameters by the delta method:
    Cov(θ̂) ≈ J I(v̂)⁻¹ Jᵀ, J = ∂θ/∂v the Jacobian of the constraint transforms at v̂."""
    lap = laplace(result, restart)
    fns = _functions(result)
    J = np.asarray(fns.jacobian(jnp.asarray(lap.mean)))
    var = np.maximum(np.einsum("ij,jk,ik->i", J, lap.cov, J), 0.0)
    return {k: np.asarray(v) for k, v in fns.unravel_constrained(jnp.asarray(np.sqrt(var))).items()}


def _draws(lap, n, rng_key):
    """`n` draws of the flat unconstrained vector from the Laplace approximation."""
    chol = np.linalg.cholesky(lap.cov)
    eps = np.asarray(jax.random.normal(rng_key, (n, lap.mean.size)), dtype=lap.cov.dtype)
    return lap.mean + eps @ chol.T


def summary(result, prob=0.9, restart=None, num_samples=4000, rng_key=None) -> dict:
    """Per parameter site: `estimate` (the EM optimum), `std_err` (delta method, see
    [`standard_errors`][bayes_em.diagnostics.standard_errors]) and the central `prob` interval
    `lower` / `upper`: quantiles of `num_samples` Laplace draws pushed through the constraints
    (inside the support)."""
    r = _restart(result, restart)
    lap = laplace(result, r)
    fns = _functions(result)
    se = standard_errors(result, r)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    C = np.asarray(jax.lax.map(fns.constrained, jnp.asarray(_draws(lap, num_samples, rng_key))))
    lo, hi = np.quantile(C, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    lo, hi = fns.unravel_constrained(jnp.asarray(lo)), fns.unravel_constrained(jnp.asarray(hi))
    return {
        name: {
            "estimate": np.asarray(result.restart_params[name][r]),
            "std_err": se[name],
            "lower": np.asarray(lo[name]),
            "upper": np.asarray(hi[name]),
        }
        for name in result.sites.param_names
    }


def format_summary(table, prob=0.9) -> str:
    """The table of [`summary`][bayes_em.diagnostics.summary] as text, one row per scalar entry
    (like NumPyro's)."""
    lo, hi = f"{50 * (1 - prob):.1f}%", f"{50 * (1 + prob):.1f}%"
    rows = []
    for name, cols in table.items():
        est = np.asarray(cols["estimate"])
        for idx in np.ndindex(est.shape):
            label = name + (f"[{','.join(map(str, idx))}]" if idx else "")
            values = [float(np.asarray(cols[c])[idx])
                      for c in ("estimate", "std_err", "lower", "upper")]
            rows.append((label, values))
    width = max([len(label) for label, _ in rows] + [8])
    lines = [f"{'':>{width}} {'estimate':>10} {'std.err':>10} {lo:>10} {hi:>10}"]
    lines += [f"{label:>{width}} " + " ".join(f"{v:10.4f}" for v in values)
              for label, values in rows]
    return "\n".join(lines)


def print_summary(result, prob=0.9, restart=None, **kwargs) -> None:
    """Print [`summary`][bayes_em.diagnostics.summary]: estimate, standard error and interval for
    every parameter entry."""
    print(format_summary(summary(result, prob, restart, **kwargs), prob))


# -- data points and model selection --------------------------------------------------------------
def data_plate(result):
    """The plate that indexes data points: the outermost plate shared by every observed site
    (`None` when they share none: the whole data set is then a single point)."""
    metas = {m.name: m for m in _metas(result)}
    shared = frozenset.intersection(*(metas[n].plates for n in result.sites.observed))
    return next((n for n in result.sites.plate_order if n in shared), None)


def _plate_size(result, plate):
    for m in _metas(result):
        for dim, name in m.dim_to_name:
            if name == plate:
                return int(m.shape[dim])
    return 1


def num_observations(result) -> int:
    """n in BIC: the size of [`data_plate`][bayes_em.diagnostics.data_plate] (1 when there is
    none)."""
    plate = data_plate(result)
    return 1 if plate is None else _plate_size(result, plate)


def num_free_parameters(result) -> int:
    """Free parameters = size of the unconstrained vector: a K-simplex counts K−1, a D×D
    covariance D(D+1)/2 — exactly the dimensions the fit moves in."""
    return int(_flat_u(result).size)


def pointwise_log_likelihood(result, restart=None) -> np.ndarray:
    """log p(x_n | θ̂) for every point n of [`data_plate`][bayes_em.diagnostics.data_plate], the
    latents summed out exactly."""
    return np.asarray(_functions(result).pointwise(_flat_u(result, restart)[None], result.data)[0])


def posterior_entropy(result, restart=None) -> float:
    """H[p(Z | X, θ̂)] = log p(X|θ̂) − E_q[log p(X, Z | θ̂)], exact for any factor graph; the
    expectation is Σ_f ⟨w_f, log f⟩ over the likelihood factors (MAP priors left out)."""
    _need_problem(result)
    problem = result.problem
    fs = core.factors(problem, _params(result, restart), result.data)
    log_z, weights = posterior_weights(fs, "sum")
    drop = set(_map_sites(problem))
    expected = sum(
        jnp.sum(weights[m.name] * jnp.where(weights[m.name] > 0, fs.logs[m.name], 0.0))
        for m in fs.metas
        if m.name not in drop
    )
    return float(log_z - core.log_prior(problem, fs) - expected)


def bic(result) -> float:
    """BIC = −2 log p(X|θ̂) + k log n (k:
    [`num_free_parameters`][bayes_em.diagnostics.num_free_parameters], n:
    [`num_observations`][bayes_em.diagnostics.num_observations]); lower is better, as in
    scikit-learn."""
    k, n = num_free_parameters(result), num_observations(result)
    return -2.0 * result.log_likelihood + k * float(np.log(n))


def aic(result) -> float:
    """AIC = −2 log p(X|θ̂) + 2k; lower is better."""
    return -2.0 * result.log_likelihood + 2.0 * num_free_parameters(result)


def icl(result) -> float:
    """ICL = BIC + 2 H[p(Z|X,θ̂)] (Biernacki, Celeux & Govaert 2000, entropy form); lower is
    better: it penalises fits whose latents stay uncertain (overlapping components)."""
    return bic(result) + 2.0 * posterior_entropy(result)


# -- the lower bound, iteration by iteration -----------------------------------------------------
def lower_bound_trace(result, n_iter=None) -> dict:
    """Re-run restart 0 (the declared start) and split every iteration as in docs/math.md:

        ℓ(θ_{t+1}) = L(q_t, θ_{t+1}) + KL(q_t ‖ p(Z|X,θ_{t+1})),   L(q_t, θ_t) = ℓ(θ_t),
        L(q_t, θ) = E_{q_t}[log p(X, Z | θ)] + H[q_t].

    Returns `log_likelihood` ℓ(θ_t) and `log_prior` log p(θ_t) for t = 0..n, and for
    t = 0..n−1 `bound` L(q_t, θ_{t+1}) and `gap` (the KL term, ≥ 0); n defaults to restart
    0's iterations; `params` holds θ_t (constrained, leading axis t). EM guarantees
    bound_t + log p(θ_{t+1}) ≥ ℓ(θ_t) + log p(θ_t). Soft EM only."""
    _need_problem(result)
    problem = result.problem._replace(fused=None)  # the state's E-step weights are read
    if problem.hard:
        raise ValueError("The lower-bound decomposition holds for soft EM; this fit used "
                         "hard=True.")
    n = int(result.restart_n_iter[0]) if n_iter is None else int(n_iter)
    if n < 1:
        raise ValueError(f"n_iter must be >= 1, got {n}.")

    def go(params0, data):
        def expected(params, weights, log_prior):  # E_q[log p(X, Z | θ)] (weights hold q)
            return core.q_function(problem, params, weights, data) - log_prior

        def body(state, _):
            new, _ = core.step(problem, state, data)
            ll_t = state.objective - state.log_prior
            entropy = ll_t - expected(state.params, state.weights, state.log_prior)
            bound = expected(new.params, state.weights, new.log_prior) + entropy
            ll_next = new.objective - new.log_prior
            return new, (ll_next, new.log_prior, bound, ll_next - bound, new.params)

        state = core.init(problem, params0, data)
        _, (ll, lp, bound, gap, params) = jax.lax.scan(body, state, None, length=n)
        params = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), params0, params)
        return state.objective - state.log_prior, state.log_prior, ll, lp, bound, gap, params

    params0 = {p.name: p.init for p in problem.sites.params}
    ll0, lp0, ll, lp, bound, gap, params = jax.jit(go)(params0, result.data)
    return {
        "log_likelihood": np.concatenate([[float(ll0)], np.asarray(ll)]),
        "log_prior": np.concatenate([[float(lp0)], np.asarray(lp)]),
        "bound": np.asarray(bound),
        "gap": np.asarray(gap),
        "params": {k: np.asarray(v) for k, v in params.items()},
    }


# the ArviZ side lives in its own module, which builds on the functions above: its names are
# served from here on first use (a module-level import would be circular)
_ARVIZ = ("to_inference_data", "params_from_inference_data", "save", "load")


def __getattr__(name):
    if name in _ARVIZ:
        from bayes_em import inference_data

        return getattr(inference_data, name)
    raise AttributeError(f"module 'bayes_em.diagnostics' has no attribute {name!r}")
