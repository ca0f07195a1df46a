"""Plots of an EM fit (matplotlib). Headless-safe: figures are built with
``matplotlib.figure.Figure`` (no pyplot, no GUI backend); pass ``path=`` to save a PNG.

- :func:`plot_convergence` — objective of every restart against the iteration, and its distance
  to the best final objective on a log scale.
- :func:`plot_bound` — the lower-bound decomposition ℓ(θ_{t+1}) = L(q_t, θ_{t+1}) + KL.
- :func:`plot_responsibilities` — 1-D or 2-D data coloured by p(z_n = k | x_n, θ̂), with the
  components' locations (and covariance ellipses in 2-D).
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_convergence", "plot_bound", "plot_responsibilities"]


def _figure(ncols=1, width=5.0, height=3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _finish(fig, path):
    if path is not None:
        fig.savefig(str(path), dpi=100)
    return fig


def _colours(K):
    from matplotlib import colormaps

    return colormaps["tab10"](np.arange(K) % 10)[:, :3]


def plot_convergence(result, path=None):
    """Objective log p(X|θ_t) + log p(θ_t) of every restart per iteration (left; the best
    restart bold) and best final objective − objective on a log scale (right)."""
    fig, (ax, gap_ax) = _figure(2)
    history = np.asarray(result.history["objective"])
    best = float(np.nanmax(result.restart_objective))
    for r in range(result.n_restarts):
        n = int(result.restart_n_iter[r]) + 1
        obj = history[r, :n]
        is_best = r == result.best_restart
        style = dict(lw=2.2 if is_best else 1.0, alpha=1.0 if is_best else 0.7,
                     label=f"restart {r}" + (" (best)" if is_best else ""))
        ax.plot(np.arange(n), obj, **style)
        gap = best - obj
        ok = gap > 0
        gap_ax.plot(np.arange(n)[ok], gap[ok], **style)
    ax.set(xlabel="iteration", ylabel="log p(X|θ) + log p(θ)", title="EM convergence")
    gap_ax.set(xlabel="iteration", ylabel="best final objective − objective", yscale="log",
               title="distance to the best optimum")
    if result.n_restarts <= 10:
        ax.legend(fontsize="small")
    return _finish(fig, path)


def plot_bound(trace, path=None):
    """The decomposition of :func:`bayes_em.diagnostics.lower_bound_trace`: ℓ(θ_t) and
    L(q_t, θ_{t+1}) per iteration (left), and the KL gap ℓ(θ_{t+1}) − L(q_t, θ_{t+1}) (right)."""
    fig, (ax, gap_ax) = _figure(2)
    ll, bound, gap = (np.asarray(trace[k]) for k in ("log_likelihood", "bound", "gap"))
    t = np.arange(len(ll))
    ax.plot(t, ll, "o-", ms=3, label="ℓ(θ_t) = log p(X|θ_t)")
    ax.plot(t[1:], bound, "s--", ms=3, label="L(q_{t-1}, θ_t)")
    ax.set(xlabel="iteration t", ylabel="nats", title="log-likelihood and lower bound")
    ax.legend(fontsize="small")
    ok = gap > 0
    gap_ax.plot(t[1:][ok], gap[ok], "o-", ms=3)
    gap_ax.set(xlabel="iteration t", ylabel="KL(q_{t-1} ‖ p(Z|X,θ_t))", yscale="log",
               title="gap closed by the next E-step")
    return _finish(fig, path)


def _ellipse(ax, mean, cov, colour, n_std):
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(np.asarray(cov))
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    w, h = 2 * n_std * np.sqrt(np.maximum(vals[::-1], 0.0))
    ax.add_patch(Ellipse(mean, w, h, angle=angle, fill=False, color=colour, lw=1.5))


def plot_responsibilities(result, x, latent=None, loc="loc", cov="cov", path=None):
    """Data coloured by responsibility: each point's colour is Σ_k p(z_n = k | x_n) · colour_k.

    ``x``: the data, shape (N,) or (N, 1) for a strip plot, or (N, 2) for a scatter plot.
    ``latent``: the latent site (default: the first). If the fit has a site named ``loc`` it is
    drawn as the component locations, and in 2-D a site ``cov`` (K, 2, 2) as 1- and 2-sd ellipses.
    """
    x = np.asarray(x)
    latent = result.sites.latents[0] if latent is None else latent
    q = np.asarray(result.posterior[latent])
    if q.ndim != 2 or q.shape[0] != x.shape[0]:
        raise ValueError(
            f"Latent '{latent}' has posterior shape {q.shape}; plot_responsibilities needs one "
            f"categorical latent per data point, shape ({x.shape[0]}, K)."
        )
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] != 2):
        raise ValueError(f"x must have shape (N,), (N, 1) or (N, 2), got {x.shape}.")
    K = q.shape[1]
    palette = _colours(K)
    colours = np.clip(q @ palette, 0.0, 1.0)
    locs = np.asarray(result.params[loc]) if loc in result.params else None
    fig, (ax,) = _figure(1, 6.0, 4.0)
    if x.ndim == 1:
        jitter = np.random.default_rng(0).uniform(-0.4, 0.4, x.shape[0])
        y = np.argmax(q, axis=1) + jitter
        ax.scatter(x, y, c=colours, s=12, edgecolors="none")
        ax.set(xlabel="x", ylabel="most probable component (jittered)", yticks=np.arange(K))
        if locs is not None:
            for k in range(K):
                ax.axvline(float(np.ravel(locs)[k]), color=palette[k], ls="--", lw=1.2)
    else:
        ax.scatter(x[:, 0], x[:, 1], c=colours, s=12, edgecolors="none")
        ax.set(xlabel="x[0]", ylabel="x[1]")
        if locs is not None and locs.shape == (K, 2):
            ax.scatter(locs[:, 0], locs[:, 1], c=palette, marker="X", s=90, edgecolors="k")
            if cov in result.params and np.shape(result.params[cov]) == (K, 2, 2):
                for k in range(K):
                    for n_std in (1.0, 2.0):
                        _ellipse(ax, locs[k], result.params[cov][k], palette[k], n_std)
    ax.set_title(f"data coloured by p({latent} = k | x, θ̂)")
    return _finish(fig, path)
