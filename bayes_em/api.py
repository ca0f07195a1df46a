"""The NumPyro-style object API: `EM(model, ...).run(rng_key, *args, **kwargs)`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from bayes_em import chunked, outcome
from bayes_em import em as core
from bayes_em import fit as fitting
from bayes_em.compiled import jit
from bayes_em.compiled import large as _large
from bayes_em.compiled import quick as _quick
from bayes_em.lbfgs import LBFGS
from bayes_em.missing import check_missing, marginalize_missing
from bayes_em.progress import Progress
from bayes_em.result import (  # noqa: F401 (re-exported: bayes_em.api is the public path)
    _ENGINE_LOCK,
    AscentWarning,
    ClosedFormWarning,
    ConvergenceWarning,
    EMResult,
    EStep,
    MStepPaths,
    Status,
    _locked,
)
from bayes_em.sites import discover_sites, split_data
from bayes_em.starts import INITS
from bayes_em.validation import check_arguments, check_options

__all__ = ["EM", "EMResult", "EStep", "Status", "AscentWarning", "ConvergenceWarning",
           "ClosedFormWarning", "MStepPaths"]


def _first_objective(states):
    """The objective at the first restart's start (read on the host: no eager JAX op)."""
    return np.asarray(jax.device_get(states.history))[0, 0, 0]


def _on_mesh(mesh, fn, *args):
    """`fn(*args)` under the engine's lock and the fit's mesh (global arrays: the posterior
    of sharded data stays sharded)."""
    with _ENGINE_LOCK, fitting.mesh_context(mesh):
        return fn(*args)


def _freeze(model, fixed):
    """`model` with the sites in `fixed` held at the given values."""

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

    Args:
        model (Callable): a NumPyro model. `numpyro.param` sites are fitted by maximum likelihood,
            continuous `numpyro.sample` sites without `obs` by MAP under their prior, and discrete
            sample sites without `obs` are enumerated exactly.
        restarts: number of starts. The first is the model's declared initial values
            (`numpyro.param` inits; for MAP sites `init_values` or the prior mean); the others
            are drawn by `init`. The best final objective wins.
        init (str | Callable): how restarts after the first begin: `"anchors"` (default: one
            M-step under posterior weights concentrated around data rows drawn by k-means++, one
            anchor per value of each latent; see `bayes_em.starts`), `"noise"` (one M-step under
            random posterior weights, Gumbel noise of scale `restart_noise`), or a callable
            `init(rng_key, params) -> dict` of constrained values (traced: JAX operations only)
            that override the declared `params`.
        max_iter: maximum number of EM iterations.
        tol: stop when |Δ objective| ≤ tol · |objective| (at least a few ulps of the dtype);
            `tol=0` runs exactly `max_iter` iterations.
        hard: hard EM: the E-step puts all weight on the most probable configuration.
        init_values: dict of constrained initial values, overriding any site's.
        mstep: settings of the numeric M-step ([`bayes_em.LBFGS`][bayes_em.lbfgs.LBFGS]).
        strict: raise if the objective ever decreases (default: warn).
        progress_bar: show a tqdm bar with the iteration and the objective of the restart
            being fitted (updated from inside the compiled loop by a host callback).
        memory_limit: bytes the enumerated tensors may take; checked before allocating.
        restart_noise: scale of the Gumbel noise behind the random starts.
        closed_form: update parameters that qualify by closed-form conjugate M-steps
            (`bayes_em.conjugate`); `False` forces the numeric M-step everywhere.
        fixed: dict of site name -> value held fixed (not fitted): `numpyro.param` sites
            take the value, sample sites are conditioned on it.
        record_params: keep the parameters of every iteration and restart in
            `result.history["params"]` (memory: max_iter + 1 copies of θ per restart).
        accelerate: SQUAREM acceleration (Varadhan & Roland 2008): each iteration is three EM
            maps and an extrapolation, kept only when it does not lower the objective.
        missing: names of observed sites whose NaN entries are marginalised out of the
            likelihood (`bayes_em.missing`): dropped for event_dim-0 and `.to_event` sites, the
            exact marginal of the observed coordinates for a `MultivariateNormal`. NaNs at other
            observed sites still raise. A discrete site whose value other sites use needs
            `obs_mask=` instead (see `docs/data.md`).
        parallel_time: sum Markov chains (`scan`) by funsor's parallel-in-time contraction
            (log₂ T rounds of K×K×K products, O(T·K³) work) instead of the forward recursion
            (T sequential steps, O(T·K²)): for long sequences on accelerators; slower on CPUs.
        chunk_size: process the data plate (the plate shared by every observed site, the
            leading axis of the data arrays) `chunk_size` rows at a time inside the compiled fit
            (`bayes_em.chunked`): the same iterates as without it (to round-off), with the
            E-step's intermediates O(chunk_size) instead of O(N); each iteration makes a few passes
            over the chunks. `None` or a value ≥ N: unchunked. Needs every latent in the data
            plate; refused with `hard=True` or `accelerate=True`. Random starts
            (`restarts > 1` with `init="anchors"` / `"noise"`) read the whole data once.
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
        chunk_size: int | None = None,
    ):
        check_options(tol, memory_limit, restart_noise, init_values, fixed, missing,
                      restarts=restarts, max_iter=max_iter, mstep=mstep, init=init, inits=INITS)
        # as JAX arrays: a NumPy array indexed by a traced latent (loc[z]) cannot be traced
        self.fixed = {k: jnp.asarray(v) for k, v in dict(fixed or {}).items()}
        self.model = _freeze(model, self.fixed) if self.fixed else model
        self.missing = (missing,) if isinstance(missing, str) else tuple(missing)
        if self.missing:
            self._unmarginalized = self.model
            self.model = marginalize_missing(self.model, self.missing)
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
        self.chunk_size = chunked.check_chunk_size(chunk_size)
        if self.chunk_size is not None and (self.hard or accelerate):
            raise ValueError("chunk_size does not combine with hard=True or accelerate=True.")
        self.options = fitting.Options(
            restarts=self.restarts, init=init, max_iter=self.max_iter, tol=self.tol,
            hard=self.hard, strict=self.strict, mstep=mstep, closed_form=self.closed_form,
            accelerate=self.accelerate, record_params=self.record_params,
            parallel_time=self.parallel_time, restart_noise=self.restart_noise,
            memory_limit=memory_limit, chunk_size=self.chunk_size)
        self._compiled = {}
        self._bar = {}  # {"bar": the running fit's tqdm bar}, shown by a host callback

    # -- compiled pieces, one set per model structure and static arguments ----------------------
    def _functions(self, sites, rebuild, key, data, quick=False, large=False):
        # quick / large: the compiler settings by size (bayes_em.compiled)
        cache_key = (key, _sites_key(sites), quick, large)
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
                    fit=jit(fit, quick=quick, large=large),
                    latents=jit(latents, quick=quick, large=large),
                    e_step=jit(lambda params, data: core.e_step(problem, params, data, "sum")[:2],
                               quick=quick, large=large),
                    # compiled only where a restart stopped at a symmetric point
                    hvp=jit(lambda params, data, v: core.objective_hvp(problem, params, data, v)),
                    # compiled only if the guard rejects a closed-form M-step
                    fallback=jit(functools.partial(fitting.fallback, problem)),
                    # compiled only where a restart ended non-finite: its E-step weights
                    weights=jit(lambda params, data: core.e_step(problem, params, data)[2]),
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
        checked = chunked.head(chunked.configure(bare, init_params, data, self.chunk_size), data)
        size = check_enumeration(bare, init_params, checked, self.memory_limit,
                                 fitting.devices_of(data))
        work = (self.restarts * size, *data)
        problem, functions = self._functions(sites, rebuild, key, data, _quick(*work),
                                             _large(*work))
        return problem, functions, init_params, data

    def e_step(self, params, *args, **kwargs) -> EStep:
        """The exact E-step at `params` (constrained values; sites not given take their initial
        values): log p(X|θ), log p(θ), posterior marginals and the most probable latents."""
        with _ENGINE_LOCK:
            (params, args, kwargs), mesh = fitting.on_mesh((params, args, kwargs))
            with fitting.mesh_context(mesh):
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
        """Fit the model to the data in `args` / `kwargs` (passed on to the model).

        Thread-safe: fits from several threads run one at a time (NumPyro's effect handlers
        live on one global stack, and the vectorised scan patches NumPyro's scan module while a
        model is traced), each with the result it would have alone.

        Data sharded over a mesh (`jax.sharding`, any axis types, one process or several
        under `jax.distributed`) is fitted data-parallel: see `docs/distributed.md`."""
        with _ENGINE_LOCK:
            tree = (rng_key, self.init_values, args, kwargs)
            (rng_key, init_values, args, kwargs), mesh = fitting.on_mesh(tree)
            with fitting.mesh_context(mesh):
                return self._run(rng_key, mesh, init_values, *args, **kwargs)

    def _run(self, rng_key, mesh, init_values, *args, **kwargs) -> EMResult:
        from bayes_em.checks import check_initial_density

        problem, functions, params0, data = self._prepare(rng_key, init_values, args, kwargs)
        if not self.progress_bar:
            self._check_memory(problem, functions, params0, data, rng_key)
            states = functions["fit"](params0, data, rng_key)
            states = outcome.redo_rejected(states, functions["fallback"], data)
            check_initial_density(problem, _first_objective(states), params0, data)
            return self._result(problem, states, data, functions, mesh)
        progress, result = Progress(self.restarts, self.max_iter), None
        self._bar["bar"] = progress  # read by the compiled fit's host callback
        try:
            self._check_memory(problem, functions, params0, data, rng_key)
            states = jax.block_until_ready(functions["fit"](params0, data, rng_key))
            self._bar["bar"] = None
            states = outcome.redo_rejected(states, functions["fallback"], data)
            # a non-finite start stops its restart at once; then this names the sites
            check_initial_density(problem, _first_objective(states), params0, data)
            result = self._result(problem, states, data, functions, mesh)
        finally:
            self._bar["bar"] = None
            progress.close(result)
        return result

    def _check_memory(self, problem, functions, params0, data, rng_key):
        """Compile the fit ahead of running it (the call that follows reuses the executable)
        and check XLA's memory analysis of it against `memory_limit`."""
        from bayes_em.checks import check_compiled_memory

        compiled = functions["fit"].lower(params0, data, rng_key).compile()
        check_compiled_memory(compiled, self.memory_limit, problem, params0, data)

    def _result(self, problem, states, data, functions, mesh):
        # the program's states are small (no E-step weights): parameters, statuses, histories,
        # replicated on every device, read by every process
        states = jax.device_get(states)
        restart_params = states.params
        param_history = states.param_history if self.record_params else None
        objective = np.asarray(states.objective)
        status, messages, best = outcome.judge(problem, states, data, functions, self.tol,
                                               self.strict)
        n_decreases, n_fallbacks = np.asarray(states.n_decreases), np.asarray(states.n_fallbacks)
        # JAX arrays: NumPyro's Predictive(model, params=result.params) indexes them with traced
        # latents (loc[z]), which a NumPy array refuses; put, not converted (jnp.asarray of a
        # NumPy scalar compiles a program of its own)
        params_best = {k: jax.device_put(v[best]) for k, v in restart_params.items()}
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
            latents=functools.partial(_on_mesh, mesh, functions["latents"], params_best, data),
            sites=problem.sites,
            problem=problem,
            data=tuple(data),
            model=self.model,
            settings=EMResult._settings_of(self),
        )
