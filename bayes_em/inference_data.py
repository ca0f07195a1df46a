"""The fit as ArviZ `InferenceData` (Laplace draws, pointwise log-likelihood, the EM trace,
the latent posterior) and its persistence as netCDF; re-exported by
[`bayes_em.diagnostics`][bayes_em.diagnostics]."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bayes_em.diagnostics import (
    _draws,
    _functions,
    _map_sites,
    _metas,
    _restart,
    aic,
    bic,
    data_plate,
    laplace,
    num_free_parameters,
    num_observations,
)

__all__ = ["to_inference_data", "params_from_inference_data", "save", "load"]


# -- ArviZ ---------------------------------------------------------------------------------------
def _observed_values(result):
    """The observed sites' values, as the model's own trace has them (a `scan` stacks its
    steps, as `result.sample` draws them); else from the enumerated model's packed trace."""
    from numpyro.handlers import seed, substitute, trace

    from bayes_em._numpyro import packed_trace, plate_to_enum_plate

    args, kwargs = result.problem.rebuild(result.data)
    names = result.sites.observed
    if result.model is not None:
        try:
            model = seed(substitute(result.model, data=result.params), 0)
            tr = trace(model).get_trace(*args, **kwargs)
            if all(n in tr and tr[n]["is_observed"] for n in names):
                return {n: np.asarray(tr[n]["value"]) for n in names}
        except Exception:  # a model that only runs enumerated: the packed trace below
            pass
    model = substitute(result.problem.enum_model, data=result.params)
    with plate_to_enum_plate():
        tr = packed_trace(model).get_trace(*args, **kwargs)
    return {n: np.asarray(tr[n]["value"]) for n in result.sites.observed}


def _chosen_restarts(result, restarts):
    if restarts is None:
        return None
    if isinstance(restarts, str):
        if restarts != "all":
            raise ValueError(f"restarts must be None, 'all' or a list of indices, got "
                             f"{restarts!r}.")
        return list(range(result.n_restarts))
    return [_restart(result, r) for r in restarts]


def _laplace_draws(result, restarts, num_chains, num_samples, rng_key):
    """`(V, chain_restart, chain_coord)`: unconstrained Laplace draws (chain, draw, v) around
    the best optimum (`restarts=None`) or one chain per chosen restart (those without a
    positive definite observed information left out, with a warning)."""
    chosen = _chosen_restarts(result, restarts)
    if chosen is None:
        lap = laplace(result)
        V = _draws(lap, num_chains * num_samples, rng_key).reshape(num_chains, num_samples, -1)
        chain_restart, chain_coord = [lap.restart] * num_chains, np.arange(num_chains)
    else:
        laps, skipped = {}, []
        for r in chosen:  # a restart at a saddle or a boundary has no Laplace approximation
            try:
                laps[r] = laplace(result, r)
            except ValueError as err:
                skipped.append(f"{r} ({result.restart_status[r]}: {str(err).split(':')[0]})")
        if skipped:
            warnings.warn(f"to_inference_data: restarts {', '.join(skipped)} left out: their "
                          "observed information is not positive definite, so they have no "
                          "Laplace draws (their point estimates stay in em_estimate).",
                          UserWarning, stacklevel=4)
        if not laps:
            raise ValueError("to_inference_data: no chosen restart has a positive definite "
                             "observed information (see result.restart_status).")
        chosen = list(laps)
        keys = jax.random.split(rng_key, len(chosen))
        V = np.stack([_draws(laps[r], num_samples, k) for r, k in zip(chosen, keys)])
        chain_restart, chain_coord = chosen, np.asarray(chosen)
    return V, chain_restart, chain_coord


def _em_groups(result, fns, flat, by_site, chain_coord, n_chain, num_samples):
    """The groups beyond `az.from_dict`'s: unconstrained draws, log prior, the EM trace, every
    restart's estimate and the latent posterior."""
    import xarray as xr

    est_dims = {k: ("restart",) + tuple(f"{k}_dim_{i}" for i in range(np.ndim(v) - 1))
                for k, v in result.restart_params.items()}
    return {
        "unconstrained_posterior": xr.Dataset(
            {k: (("chain", "draw") + tuple(f"{k}_dim_{i}" for i in range(v.ndim - 2)), v)
             for k, v in by_site(fns.unravel, flat).items()},
            coords={"chain": chain_coord, "draw": np.arange(num_samples)},
        ),
        "log_prior": xr.Dataset(
            {"log_prior": (("chain", "draw"),
                           np.asarray(fns.log_prior(flat, result.data)).reshape(
                               n_chain, num_samples))},
            coords={"chain": chain_coord, "draw": np.arange(num_samples)},
        ),
        "em_trace": _trace_dataset(result),
        "em_estimate": xr.Dataset(
            {k: (est_dims[k], np.asarray(v)) for k, v in result.restart_params.items()},
            coords={"restart": np.arange(result.n_restarts)},
        ),
        "latent_posterior": _latent_dataset(result),
    }


def _by_site(unravel, X, n_chain, num_samples):
    """Flat draws `X` (chain × draw, v) as {site: (chain, draw, ...)}."""
    tree = jax.vmap(unravel)(X)
    return {k: np.asarray(v).reshape((n_chain, num_samples) + v.shape[1:])
            for k, v in tree.items()}


def _observed_with_dims(result, plate):
    """`(name of the log-likelihood variable, observed values, dims)`: the log-likelihood is
    named after the observed site when there is one, and indexed by the data plate."""
    obs_names = result.sites.observed
    ll_name = obs_names[0] if len(obs_names) == 1 else "log_likelihood"
    observed = _observed_values(result)
    dims = {ll_name: [plate or "point"]}
    n_points = num_observations(result)
    for k, v in observed.items():
        if plate is not None and k != ll_name and v.ndim and v.shape[0] == n_points:
            dims[k] = [plate]
    return ll_name, observed, dims


def to_inference_data(result, num_samples=1000, num_chains=4, restarts=None, rng_key=None,
                      posterior_predictive=False, num_predictive=100, align=True):
    """An ArviZ `InferenceData` of the fit, in the manner of `az.from_numpyro`.

    Groups: `posterior` — draws of the Laplace approximation N(v̂, I(v̂)⁻¹) in unconstrained space
    pushed through the constraints (`unconstrained_posterior`: the same draws untransformed);
    `log_likelihood` — log p(x_n | θ) for every draw and data point, latents summed out (for
    `az.loo` / `az.waic` / `az.compare`); `log_prior`; `observed_data`; `em_trace` —
    objective, log prior and log-likelihood per restart and iteration (NaN after a restart
    stopped) and each restart's final state; `em_estimate` — every restart's point estimate;
    `latent_posterior` — p(z | X, θ̂) and the most probable z. Settings and status: `attrs`.

    `posterior_predictive=True` adds a `posterior_predictive` group: `num_predictive`
    draws per chain of every observed site from the model at the chain's fitted θ̂ (the plug-in
    predictive p(x | θ̂), latents drawn too, by `result.sample`), dims `(chain, draw)` then
    the observed site's, as in `observed_data`: `az.plot_ppc(idata)` compares them.

    `restarts=None`: `num_chains` chains of independent draws around the best optimum.
    `restarts="all"` or a list of indices: one chain per restart around its own optimum (the
    chain coordinate is the restart index), so that different optima are never pooled. With
    `align` (the default) the restarts are first relabelled to the best restart's component
    labels where the model has that symmetry
    ([`bayes_em.relabel.align_restarts`][bayes_em.relabel.align_restarts]): restarts at one optimum
    under permuted labels then agree (R-hat ≈ 1) instead of reading as different.
    """
    import arviz as az

    if restarts is not None and align:
        from bayes_em.relabel import align_restarts

        result = align_restarts(result)
    plate = data_plate(result)
    fns = _functions(result)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    V, chain_restart, chain_coord = _laplace_draws(result, restarts, num_chains, num_samples,
                                                   rng_key)
    n_chain = V.shape[0]
    flat = jnp.asarray(V.reshape(n_chain * num_samples, -1))

    by_site = functools.partial(_by_site, n_chain=n_chain, num_samples=num_samples)
    ll_name, observed, dims = _observed_with_dims(result, plate)
    attrs = _attrs(result, chain_restart)
    predictive = {}
    if posterior_predictive:
        predictive = _predictive(result, chain_restart, int(num_predictive),
                                 jax.random.fold_in(rng_key, 1))
    idata = az.from_dict(
        posterior_predictive=predictive or None,
        posterior=by_site(fns.unravel_constrained, jax.lax.map(fns.constrained, flat)),
        log_likelihood={ll_name: np.asarray(fns.pointwise(flat, result.data)).reshape(
            n_chain, num_samples, -1)},
        observed_data=observed,
        coords={"chain": chain_coord},
        dims=dims,
        attrs=attrs,
        posterior_attrs=attrs,
        log_likelihood_attrs=attrs,
    )
    idata.add_groups(_em_groups(result, fns, flat, by_site, chain_coord, n_chain, num_samples))
    return idata


def _predictive(result, chain_restart, n, rng_key):
    """`{observed site: (chain, n, ...)}`: draws of the observed sites at each chain's restart
    (one `result.sample` call per distinct restart)."""
    from bayes_em.predict import _sample

    if n < 1:
        raise ValueError(f"num_predictive must be >= 1, got {n}.")
    args, kwargs = result.problem.rebuild(result.data)
    names = result.sites.observed
    draws = {}
    for i, r in enumerate(dict.fromkeys(chain_restart)):
        chains = [c for c, rr in enumerate(chain_restart) if rr == r]
        params = {k: v[r] for k, v in result.restart_params.items()}
        out = _sample(result, params, jax.random.fold_in(rng_key, i), args, kwargs,
                      len(chains) * n, redraw=names)
        for k in names:
            v = out[k].reshape((len(chains), n) + out[k].shape[1:])
            for j, c in enumerate(chains):
                draws.setdefault(k, [None] * len(chain_restart))[c] = v[j]
    return {k: np.stack(v) for k, v in draws.items()}


def _attrs(result, chain_restart):
    problem = result.problem
    return {
        "inference_library": "bayes_em",
        "method": "Laplace approximation at the EM optimum, in unconstrained space",
        "status": str(result.status.value if hasattr(result.status, "value") else result.status),
        "n_iter": int(result.n_iter),
        "best_restart": int(result.best_restart),
        "n_restarts": int(result.n_restarts),
        "objective": float(result.objective),
        "log_likelihood": float(result.log_likelihood),
        "log_prior": float(result.log_prior),
        "max_iter": int(problem.max_iter),
        "tol": float(problem.tol),
        "hard": int(problem.hard),
        "n_free_parameters": num_free_parameters(result),
        "n_observations": num_observations(result),
        "bic": bic(result),
        "aic": aic(result),
        "chain_restart": [int(r) for r in chain_restart],
        "param_sites": ",".join(result.sites.param_names),  # strings: netCDF-safe attributes
        "map_sites": ",".join(_map_sites(problem)),
    }


def _trace_dataset(result):
    import xarray as xr

    it = ("restart", "iteration")
    data = {k: (it, np.asarray(v)) for k, v in result.history.items() if k != "params"}
    for k, v in result.history.get("params", {}).items():  # EM(record_params=True)
        v = np.asarray(v)
        data[f"param_{k}"] = (it + tuple(f"{k}_dim_{i}" for i in range(v.ndim - 2)), v)
    data["restart_objective"] = ("restart", np.asarray(result.restart_objective))
    data["restart_n_iter"] = ("restart", np.asarray(result.restart_n_iter))
    data["restart_status"] = ("restart", np.asarray(result.restart_status, dtype=str))
    data["n_decreases"] = ("restart", np.asarray(result.n_decreases))
    R, T = np.shape(result.history["objective"])
    return xr.Dataset(data, coords={"restart": np.arange(R), "iteration": np.arange(T)})


def _latent_dataset(result):
    import xarray as xr

    metas = {m.name: m for m in _metas(result)}
    data = {}
    for name, p in result.posterior.items():
        p = np.asarray(p)
        plates = tuple(n for n in result.sites.plate_order if n in metas[name].plates)
        if p.ndim != len(plates) + 1:  # e.g. a time dim of a scan
            plates = tuple(f"{name}_dim_{i}" for i in range(p.ndim - 1))
        data[name] = (plates + (f"{name}_value",), p)
        data[f"{name}_most_probable"] = (plates, np.asarray(result.most_probable[name]))
    return xr.Dataset(data)


# -- persistence ----------------------------------------------------------------------------------
def params_from_inference_data(idata, restart=None) -> dict:
    """The point estimate stored by [`to_inference_data`][bayes_em.inference_data.to_inference_data]
    (default: the best restart) as a dict of constrained values — ready for
    `EM(model, init_values=...)` (a warm start)."""
    est = idata["em_estimate"]
    r = int(idata.posterior.attrs["best_restart"]) if restart is None else int(restart)
    return {k: jnp.asarray(est[k].values[r]) for k in est.data_vars}


def save(result_or_idata, path, overwrite=False, **kwargs):
    """Write a fit to netCDF (`InferenceData.to_netcdf`); an `EMResult` is converted first
    with `to_inference_data(result, **kwargs)`, which needs a Laplace approximation (a
    positive definite information matrix). To keep any fit — at a saddle or a boundary too — with
    its settings, use `result.save(path)` ([`bayes_em.persist`][bayes_em.persist], a `.npz` file).
    An existing file raises `FileExistsError` unless `overwrite=True`. Returns the path
    written."""
    import os

    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{str(path)!r} exists; diagnostics.save does not overwrite it "
                              "unless overwrite=True.")
    idata = result_or_idata
    if not hasattr(idata, "to_netcdf"):
        try:
            idata = to_inference_data(result_or_idata, **kwargs)
        except ValueError as err:
            if "not positive definite" not in str(err):
                raise
            raise ValueError(f"{err} diagnostics.save writes the Laplace approximation; "
                             "result.save(path) keeps the fit without it.") from err
    return idata.to_netcdf(str(path))


def load(path):
    """Read an `InferenceData` written by [`save`][bayes_em.inference_data.save], every group loaded
    into memory."""
    import arviz as az

    idata = az.from_netcdf(str(path))
    for group in idata.groups():
        idata[group].load()
    return idata
