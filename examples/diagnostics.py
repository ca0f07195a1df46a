"""Diagnostics of a fit: standard errors, model selection, ArviZ, plots and a saved fit.

Fits 1-D Gaussian mixtures with K = 2, 3 (and 4) components (MAP-EM) to data simulated from three,
prints the summary table of the chosen fit, compares the fits with BIC / ICL and ArviZ's LOO,
writes the plots as PNG and round-trips the fit through netCDF.

    python examples/diagnostics.py [output directory]     (default: ./figures)

The figures (convergence.png, mixture.png, responsibilities.png, bound.png) and the saved fit
(fit.nc) are kept in the output directory.
"""

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from bayes_em import EM, diagnostics, plots

QUICK = True  # False: also fit K = 4 (more components than simulated)


def mixture(x, K):
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        loc = numpyro.param("loc", jnp.linspace(-3.0, 3.0, K))
        scale = numpyro.sample("scale", dist.InverseGamma(3.0, 2.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def simulate(key, n=150):
    k1, k2 = jax.random.split(key)
    z = jax.random.categorical(k1, jnp.log(jnp.array([0.4, 0.35, 0.25])), shape=(n,))
    return jnp.array([-3.0, 0.5, 4.0])[z] + 0.5 * jax.random.normal(k2, (n,))


def main(out_dir):
    import arviz as az

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = simulate(jax.random.PRNGKey(3))
    fits = {
        K: EM(mixture, restarts=3, max_iter=300, tol=1e-10, progress_bar=False).run(
            jax.random.PRNGKey(0), x, K=K)
        for K in (2, 3, 4)[: 2 if QUICK else 3]
    }
    print(" K   log p(x|θ)   free params      BIC      AIC      ICL")
    for K, fit in fits.items():
        print(f"{K:2d} {fit.log_likelihood:12.2f} {diagnostics.num_free_parameters(fit):13d}"
              f" {fit.bic():8.1f} {fit.aic():8.1f} {fit.icl():8.1f}")
    best_K = min(fits, key=lambda K: fits[K].bic())
    fit = fits[best_K]
    print(f"\nK = {best_K} by BIC; estimates, standard errors (delta method) and 90% intervals:")
    fit.summary()

    with warnings.catch_warnings():
        # ArviZ's notes on its own future API, here only: every other warning is shown
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"arviz\b.*")
        idatas = {f"K={K}": f.to_inference_data(num_samples=250, num_chains=2)
                  for K, f in fits.items()}
        print("\nArviZ compare (PSIS-LOO):")
        print(az.compare(idatas)[["rank", "elpd_loo", "p_loo", "elpd_diff", "weight"]].round(2))

    plots.plot_convergence(fit, path=out_dir / "convergence.png")
    plots.plot_mixture(fit, x, path=out_dir / "mixture.png")
    plots.plot_responsibilities(fit, x, path=out_dir / "responsibilities.png")
    plots.plot_bound(diagnostics.lower_bound_trace(fit), path=out_dir / "bound.png")

    path = diagnostics.save(idatas[f"K={best_K}"], out_dir / "fit.nc")
    loaded = diagnostics.load(path)
    warm = EM(mixture, max_iter=300, tol=1e-10, progress_bar=False,
              init_values=diagnostics.params_from_inference_data(loaded)).run(
        jax.random.PRNGKey(0), x, K=best_K)
    print(f"\nsaved {path}; warm start from it: objective {warm.history['objective'][0, 0]:.6f} "
          f"(saved {fit.objective:.6f}), {warm.n_iter} more iteration(s)")
    print("wrote", ", ".join(sorted(p.name for p in out_dir.glob("*.png"))), "in", out_dir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "figures")
