"""Figures of the documentation, computed with bayes_em on small data (under a minute on 2 cores).

    python docs/figures/make_figures.py [OUTPUT_DIR]      # default: this folder

docs/math.md:

- ``bound.png``: log p(x | μ) of a two-component mixture with one free location μ, and the
  lower bound Q(μ; μ_t) + H[q_t] built at μ_t: it touches the log-likelihood at μ_t, lies
  below it everywhere, and its maximiser is the next EM iterate μ_{t+1}.
- ``convergence.png``: plain EM against SQUAREM (``EM(model, accelerate=True)``) on a mixture
  of two strongly overlapping components, where plain EM is slow.

The model pages, drawn by ``bayes_em.plots`` (also shown on docs/api/plots.md):

- ``gmm_mixture.png`` (docs/gmm.md): ``plot_mixture`` of a 1-D ``models.gmm`` fit.
- ``gmm_responsibilities.png`` (docs/gmm.md): ``plot_responsibilities`` of a 2-D full-covariance
  fit, with 1- and 2-sd ellipses.
- ``hmm_earthquakes.png`` (docs/hmm.md): ``plot_hmm`` of the Poisson HMM of
  ``examples/poisson_hmm.py`` (major earthquakes 1900-2006).
- ``diagnostics_convergence.png`` and ``diagnostics_bound.png`` (docs/diagnostics.md):
  ``plot_convergence`` of a fit with restarts, ``plot_bound`` of its ``lower_bound_trace``.
"""

import argparse
import importlib.util
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402

from bayes_em import EM, diagnostics, models, plots  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


# --- (a) the bound -------------------------------------------------------------------------------
def one_location(x):
    """Equal weights, unit scales, one component at 0 and the other at the free location μ."""
    mu = numpyro.param("mu", 0.0)
    loc = jnp.stack([jnp.zeros_like(mu), mu])
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def expected_complete(q, x, mu):
    """Q(μ; μ_t) = Σ_n Σ_k q_nk log p(x_n, z_n = k | μ) for a grid of μ."""
    mu = np.atleast_1d(mu)
    loc = np.stack([np.zeros_like(mu), mu], axis=-1)  # (M, 2)
    sq = (x[None, :, None] - loc[:, None, :]) ** 2
    log_joint = np.log(0.5) - 0.5 * np.log(2 * np.pi) - 0.5 * sq
    return np.sum(q[None] * log_joint, axis=(1, 2))


def bound_figure(path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 1.0, 40), rng.normal(3.0, 1.0, 40)])
    em = EM(one_location, progress_bar=False)
    mu_t = 0.8
    grid = np.linspace(-1.5, 5.0, 131)
    loglik = np.array([em.e_step({"mu": m}, jnp.asarray(x)).log_likelihood for m in grid])
    at_t = em.e_step({"mu": mu_t}, jnp.asarray(x))
    q = np.asarray(at_t.posterior["z"])  # q_t(z_n = k) = p(z_n = k | x_n, μ_t)
    entropy = -np.sum(np.where(q > 0, q * np.log(q), 0.0))
    bound = expected_complete(q, x, grid) + entropy
    # the next iterate: one EM iteration of bayes_em from μ_t, and the maximiser of the bound
    step = EM(one_location, max_iter=1, tol=0.0, init_values={"mu": mu_t}, progress_bar=False)
    mu_next = float(step.run(jax.random.PRNGKey(0), jnp.asarray(x)).params["mu"])
    assert abs(mu_next - np.sum(q[:, 1] * x) / np.sum(q[:, 1])) < 1e-8
    assert np.all(bound <= loglik + 1e-8)  # Jensen: the bound lies below ...
    touch = expected_complete(q, x, mu_t)[0] + entropy
    assert abs(touch - at_t.log_likelihood) < 1e-8  # ... and touches at μ_t
    ll_next = em.e_step({"mu": mu_next}, jnp.asarray(x)).log_likelihood
    bound_next = expected_complete(q, x, mu_next)[0] + entropy

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(grid, loglik, color="k", lw=2, label=r"$\log p(x \mid \mu)$")
    ax.plot(grid, bound, color="tab:blue", lw=1.6, ls="--", label=r"$Q(\mu; \mu_t) + H[q_t]$")
    ax.plot([mu_t], [at_t.log_likelihood], "o", color="tab:blue", ms=7,
            label=r"$\mu_t$: the bound touches")
    ax.plot([mu_next], [bound_next], "s", color="tab:orange", ms=6,
            label=r"$\mu_{t+1}$: maximiser of the bound")
    ax.plot([mu_next], [ll_next], "o", color="tab:orange", ms=7)
    ax.annotate("", xy=(mu_next, ll_next), xytext=(mu_next, bound_next),
                arrowprops=dict(arrowstyle="<->", color="tab:orange"))
    ax.text(mu_next + 0.08, (ll_next + bound_next) / 2,
            r"$\mathrm{KL}(q_t \,\|\, p(z \mid x, \mu_{t+1}))$",
            color="tab:orange", va="center", fontsize="small")
    low = min(loglik.min(), at_t.log_likelihood - 40)
    ax.set(xlabel=r"$\mu$", ylabel="nats", ylim=(low, loglik.max() + 8),
           title=rf"the EM lower bound built at $\mu_t = {mu_t}$")
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=100)


# --- (b) convergence -----------------------------------------------------------------------------
def mixture(x):
    w = numpyro.param("w", jnp.array([0.3, 0.7]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    scale = numpyro.param("scale", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def convergence_figure(path):
    rng = np.random.default_rng(1)
    z = rng.random(400) < 0.4
    x = jnp.asarray(np.where(z, rng.normal(0.0, 1.0, 400), rng.normal(1.5, 1.0, 400)))
    fits = {
        "EM": EM(mixture, max_iter=2000, tol=1e-13, progress_bar=False),
        "SQUAREM (accelerate=True)": EM(mixture, max_iter=2000, tol=1e-13, accelerate=True,
                                        progress_bar=False),
    }
    results = {name: em.run(jax.random.PRNGKey(0), x) for name, em in fits.items()}
    best = max(r.objective for r in results.values())

    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    ax, gap_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, r in results.items():
        objective = r.trace()["objective"]
        assert np.all(np.diff(objective) >= -1e-9)  # both ascend
        maps_per_iteration = int(r.n_evals[0]) // max(r.n_iter, 1)  # 1 for EM, 3 for SQUAREM
        maps = maps_per_iteration * np.arange(len(objective))
        label = f"{name.split()[0]}: {r.n_iter} iterations ({r.status})"
        ax.plot(maps, objective, lw=1.6, label=label)
        gap = best - objective
        ok = gap > 0
        gap_ax.plot(maps[ok], gap[ok], lw=1.6, label=name)
    ax.set(xlabel="EM maps evaluated (M-steps)", ylabel=r"$\log p(x \mid \theta_t)$",
           title="objective", ylim=(best - 1.0, best + 0.1))
    ax.legend(fontsize="small", loc="center right")
    gap_ax.set(xlabel="EM maps evaluated (M-steps)", ylabel="best objective − objective",
               yscale="log", title="distance to the optimum")
    gap_ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


# --- (c) the model pages -------------------------------------------------------------------------
def gmm_figures(mixture_path, responsibilities_path):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-3.0, 0.6, 150), rng.normal(0.5, 1.0, 200),
                        rng.normal(4.0, 0.5, 100)])[:, None]
    fit = EM(models.gmm, restarts=3, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=3, covariance="spherical", prior=True)
    plots.plot_mixture(fit, x, path=mixture_path)

    centres = np.array([[0.0, 0.0], [3.5, 1.0], [1.0, 4.0]])
    covs = np.array([[[1.0, 0.6], [0.6, 0.8]], [[0.4, -0.2], [-0.2, 0.6]],
                     [[0.8, 0.0], [0.0, 0.3]]])
    z = rng.integers(3, size=300)
    noise = rng.normal(size=(300, 2))
    x2 = centres[z] + np.einsum("nij,nj->ni", np.linalg.cholesky(covs[z]), noise)
    fit2 = EM(models.gmm, restarts=3, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x2), K=3)
    plots.plot_responsibilities(fit2, x2, path=responsibilities_path)


def hmm_figure(path):
    script = ROOT / "examples" / "poisson_hmm.py"
    spec = importlib.util.spec_from_file_location("poisson_hmm", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    counts = jnp.asarray(example.EARTHQUAKES, dtype=float)
    fit = EM(example.poisson_hmm, max_iter=1000, tol=1e-9, progress_bar=False).run(
        jax.random.PRNGKey(0), counts, K=3)
    fig = plots.plot_hmm(fit, counts, levels="rates", times=example.YEARS)
    fig.axes[0].set(ylabel="earthquakes of magnitude ≥ 7",
                    title="major earthquakes per year, and the decoded rate")
    fig.savefig(path, dpi=100)


def diagnostics_figures(convergence_path, bound_path):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(-2.0, 1.0, 120), rng.normal(1.0, 0.7, 80)])[:, None]
    fit = EM(models.gmm, restarts=4, max_iter=300, tol=1e-10, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=2, covariance="spherical", prior=True)
    plots.plot_convergence(fit, path=convergence_path)
    plots.plot_bound(diagnostics.lower_bound_trace(fit), path=bound_path)


FIGURES = ("bound.png", "convergence.png", "gmm_mixture.png", "gmm_responsibilities.png",
           "hmm_earthquakes.png", "diagnostics_convergence.png", "diagnostics_bound.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=pathlib.Path(__file__).resolve().parent,
                        type=pathlib.Path, help="output folder (default: docs/figures)")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    bound_figure(out / "bound.png")
    convergence_figure(out / "convergence.png")
    gmm_figures(out / "gmm_mixture.png", out / "gmm_responsibilities.png")
    hmm_figure(out / "hmm_earthquakes.png")
    diagnostics_figures(out / "diagnostics_convergence.png", out / "diagnostics_bound.png")
    print("wrote", ", ".join(FIGURES), "in", out)


if __name__ == "__main__":
    main()
