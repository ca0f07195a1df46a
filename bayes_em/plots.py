"""Plots of an EM fit (matplotlib). Headless-safe: new figures are built with
`matplotlib.figure.Figure` (no pyplot, no GUI backend).

Every function takes `ax=`: `None` (default) makes a new figure; an `Axes` (or, for the
two-panel plots, a pair of them) draws into a figure of yours, e.g. a `plt.subplots` grid.
Every function returns the `Figure` it drew in (the given axes' figure), and saves it as a PNG
when given `path=`.

- [`plot_convergence`][bayes_em.plots.plot_convergence] — objective of every restart against the
  iteration, and its distance to the best final objective on a log scale.
- [`plot_bound`][bayes_em.plots.plot_bound] — the lower-bound decomposition
  ℓ(θ_{t+1}) = L(q_t, θ_{t+1}) + KL.
- [`plot_mixture`][bayes_em.plots.plot_mixture] — a 1-D Gaussian mixture: histogram of the data,
  each weighted component density, the mixture density, and p(z = k | x) on a second axis.
- [`plot_hmm`][bayes_em.plots.plot_hmm] — a hidden Markov model: the observations with the most
  probable state path, and the state posterior p(z_t = k | y) over time (stacked).
- [`plot_responsibilities`][bayes_em.plots.plot_responsibilities] — 1-D or 2-D data coloured by
  p(z_n = k | x_n, θ̂), with the components' locations (and covariance ellipses in 2-D).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["plot_convergence", "plot_bound", "plot_mixture", "mixture_components", "plot_hmm",
           "plot_responsibilities"]

OBJECTIVE = r"$\log p(X \mid \theta) + \log p(\theta)$"


def _axes(ax, n, width=5.0, height=3.6, sharex=False):
    """`n` axes: new ones side by side (or stacked when `sharex`), or the given ones. A single
    given Axes where two are drawable gets the first panel only (the others are `None`)."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    if ax is None:
        if sharex:
            fig = Figure(figsize=(width, height * n * 0.6), layout="constrained")
            axes = list(fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0])
        else:
            fig = Figure(figsize=(width * n, height), layout="constrained")
            axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
        return fig, axes
    if isinstance(ax, Axes):
        return ax.figure, [ax] + [None] * (n - 1)
    axes = list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) != n or not all(isinstance(a, Axes) for a in axes):
        raise ValueError(f"ax must be a matplotlib Axes or a sequence of {n} Axes, got {ax!r}.")
    return axes[0].figure, axes


def _finish(fig, path):
    if path is not None:
        fig.savefig(str(path), dpi=100)
    return fig


def _integer_ticks(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colours(K):
    from matplotlib import colormaps

    return colormaps["tab10"](np.arange(K) % 10)[:, :3]


def plot_convergence(result, path=None, ax=None):
    """Objective log p(X|θ_t) + log p(θ_t) of every restart per iteration (left; the best
    restart bold) and best final objective − objective on a log scale (right).

    `ax`: a pair of Axes for both panels, or one Axes for the objective alone."""
    fig, (ax, gap_ax) = _axes(ax, 2)
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
        if gap_ax is not None:
            gap_ax.plot(np.arange(n)[ok], gap[ok], **style)
    ax.set(xlabel="iteration", ylabel=OBJECTIVE, title="EM convergence")
    _integer_ticks(ax)
    if result.n_restarts <= 10:
        ax.legend(fontsize="small")
    if gap_ax is not None:
        gap_ax.set(xlabel="iteration", ylabel="best final objective − objective", yscale="log",
                   title="distance to the best optimum")
        _integer_ticks(gap_ax)
    return _finish(fig, path)


def plot_bound(trace, path=None, ax=None):
    """The decomposition of
    [`bayes_em.diagnostics.lower_bound_trace`][bayes_em.diagnostics.lower_bound_trace]: ℓ(θ_t) and
    L(q_t, θ_{t+1}) per iteration (left), and the KL gap ℓ(θ_{t+1}) − L(q_t, θ_{t+1}) (right).

    `ax`: a pair of Axes for both panels, or one Axes for the left panel alone."""
    fig, (ax, gap_ax) = _axes(ax, 2)
    ll, bound, gap = (np.asarray(trace[k]) for k in ("log_likelihood", "bound", "gap"))
    t = np.arange(len(ll))
    ax.plot(t, ll, "o-", ms=3, label=r"$\ell(\theta_t) = \log p(X \mid \theta_t)$")
    ax.plot(t[1:], bound, "s--", ms=3, label=r"$L(q_{t-1}, \theta_t)$")
    ax.set(xlabel="iteration $t$", ylabel="nats", title="log-likelihood and lower bound")
    _integer_ticks(ax)
    ax.legend(fontsize="small")
    if gap_ax is not None:
        ok = gap > 0
        gap_ax.plot(t[1:][ok], gap[ok], "o-", ms=3)
        gap_ax.set(xlabel="iteration $t$",
                   ylabel=r"$\mathrm{KL}(q_{t-1} \,\|\, p(Z \mid X, \theta_t))$", yscale="log",
                   title="gap closed by the next E-step")
        _integer_ticks(gap_ax)
    return _finish(fig, path)


# -- a 1-D Gaussian mixture ------------------------------------------------------------------------
def _site(params, names):
    for name in names:
        if name in params:
            return np.asarray(params[name], dtype=float)
    return None


def mixture_components(result=None, *, loc=None, scale=None, weights=None):
    """`(weights, loc, scale)` of a 1-D Gaussian mixture as three arrays of shape (K,).

    Given arrays win; the others are read from `result.params`: weights from a site `weights`
    or `w`; locations from `loc` (K,) or (K, 1); standard deviations from `scale` (K,) or
    (K, 1), or from a covariance `cov` (K, 1, 1), or one tied (1, 1) — the sites of
    [`bayes_em.models.gmm`][bayes_em.models.gmm] on data of shape (N, 1) with any `covariance=`."""
    params = {} if result is None else result.params
    w = _site(params, ("weights", "w")) if weights is None else np.asarray(weights, float)
    mu = _site(params, ("loc",)) if loc is None else np.asarray(loc, float)
    sd = scale
    if sd is None:
        sd = _site(params, ("scale",))
        cov = _site(params, ("cov",))
        if sd is None and cov is not None:
            sd = np.sqrt(cov.reshape(cov.shape[:-2]) if cov.ndim == 3 else cov.reshape(()))
    missing = [name for name, v in (("weights", w), ("loc", mu), ("scale", sd)) if v is None]
    if missing:
        raise ValueError(f"plot_mixture: cannot find {missing} in the fit's parameters "
                         f"{sorted(params)}; pass them as arrays (loc=, scale=, weights=).")
    mu = np.asarray(mu, float)
    if mu.ndim == 2 and mu.shape[1] == 1:
        mu = mu[:, 0]
    if mu.ndim != 1:
        raise ValueError(f"plot_mixture draws 1-D mixtures: loc has shape {mu.shape}.")
    K = mu.shape[0]
    sd = np.asarray(sd, float)
    if sd.ndim == 2 and sd.shape[1] == 1:
        sd = sd[:, 0]
    sd = np.broadcast_to(sd, (K,)).astype(float)
    w = np.broadcast_to(np.asarray(w, float), (K,)).astype(float)
    return w, mu, sd


def _normal_pdf(x, loc, scale):
    z = (x[:, None] - loc[None, :]) / scale[None, :]
    return np.exp(-0.5 * z**2) / (scale[None, :] * math.sqrt(2.0 * math.pi))


def plot_mixture(result=None, x=None, *, loc=None, scale=None, weights=None, bins=30,
                 grid=None, responsibilities=True, path=None, ax=None):
    """A 1-D Gaussian mixture over its data: a histogram of `x` (`density=True`), each
    weighted component density w_k N(x; μ_k, σ_k), the mixture density Σ_k w_k N(x; μ_k, σ_k)
    (black) and, on a second y-axis (`ax.twinx()`, 0 to 1), the posterior p(z = k | x) of each
    component along the grid (dotted).

    `result`: an `EMResult` of [`bayes_em.models.gmm`][bayes_em.models.gmm] (data (N, 1), any
    covariance) or of a mixture of your own with sites `weights` / `w`, `loc` and `scale` / `cov`;
    or `None` with `loc=`, `scale=` (standard deviations) and `weights=` as arrays, which
    also override the fit's. `x`: the data, (N,) or (N, 1). `grid`: where the curves are
    evaluated (default: 400 points over the data's range, padded). The lines carry ids for
    checking: `line.get_gid()` is `"component k"`, `"mixture"` or `"posterior k"`.
    """
    if x is None:
        raise ValueError("plot_mixture needs the data x.")
    w, mu, sd = mixture_components(result, loc=loc, scale=scale, weights=weights)
    x = np.asarray(x, float).reshape(-1)
    fig, (ax,) = _axes(ax, 1, 6.4, 4.0)
    if grid is None:
        lo, hi = min(x.min(), (mu - 3 * sd).min()), max(x.max(), (mu + 3 * sd).max())
        pad = 0.05 * (hi - lo)
        grid = np.linspace(lo - pad, hi + pad, 400)
    grid = np.asarray(grid, float)
    weighted = w[None, :] * _normal_pdf(grid, mu, sd)  # (G, K)
    density = weighted.sum(axis=1)
    palette = _colours(len(mu))
    counts, _, _ = ax.hist(x, bins=bins, density=True, color="0.85", edgecolor="0.6", lw=0.5,
                           label="data")
    # components wide and underneath, the mixture thin on top: where one component dominates
    # the two coincide, and both stay visible
    for k in range(len(mu)):
        ax.plot(grid, weighted[:, k], color=palette[k], lw=3.0, alpha=0.8, gid=f"component {k}",
                label=rf"$w_{{{k}}}\,\mathcal{{N}}(x;\ \mu_{{{k}}}, \sigma_{{{k}}}^2)$")
    ax.plot(grid, density, color="k", lw=1.2, gid="mixture",
            label=r"$p(x \mid \hat\theta) = \sum_k w_k\,\mathcal{N}(x;\ \mu_k, \sigma_k^2)$")
    ax.set(xlabel="$x$", ylabel="density", title="data and fitted mixture")
    room = 1.6  # head room above the curves for the legend
    ax.set_ylim(0.0, room * max(float(np.max(counts)), float(density.max())))
    handles, labels = ax.get_legend_handles_labels()
    if responsibilities:
        post_ax = ax.twinx()
        post = weighted / np.where(density > 0, density, 1.0)[:, None]
        for k in range(len(mu)):
            post_ax.plot(grid, post[:, k], color=palette[k], lw=1.2, ls=":",
                         gid=f"posterior {k}")
        post_ax.set(ylim=(0.0, room), yticks=np.linspace(0.0, 1.0, 6),
                    ylabel=r"$p(z = k \mid x, \hat\theta)$ (dotted)")
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="0.3", lw=1.2, ls=":"))
        labels.append(r"$p(z = k \mid x, \hat\theta)$")
    ax.legend(handles, labels, fontsize="small", loc="upper center", ncols=2, framealpha=0.9)
    return _finish(fig, path)


# -- a hidden Markov model -------------------------------------------------------------------------
def _chain(values, names, what):
    """Concatenate the latents' arrays along time: a site without a time axis (the first state,
    outside the scan) counts as one step."""
    parts = []
    for name in names:
        if name not in values:
            raise ValueError(f"plot_hmm: no latent {name!r} in the fit's {what} "
                             f"(latents: {sorted(values)}).")
        v = np.asarray(values[name])
        parts.append(v[None] if (what == "posterior" and v.ndim == 1) or v.ndim == 0 else v)
    return np.concatenate(parts, axis=0)


def plot_hmm(result=None, y=None, latents=None, *, posterior=None, path_states=None, levels=None,
             times=None, path=None, ax=None):
    """A hidden Markov model's fit over time: the observations `y` with the most probable state
    of each step (top, points coloured by state, and `levels[state]` as a step line when
    `levels` is given, e.g. the fitted rates or means) and the posterior p(z_t = k | y) of the
    states, stacked (bottom).

    The states come from `result.posterior` and `result.most_probable` (the jointly most
    probable path, Viterbi) of the latent sites `latents` concatenated along time (default:
    every latent of the fit in order, e.g. `("z0", "z")` for a chain whose first state sits
    before the `scan`), or from arrays: `posterior` (T, K) and `path_states` (T,), e.g.
    `result.predict_proba(y_new)` / `result.predict(y_new)` on new data. `levels`: an array
    (K,) or the name of a parameter site. `times`: the x values (default 0 .. T-1).
    `ax`: a pair of Axes (observations, posterior), or one Axes for the posterior alone.
    """
    if posterior is None or path_states is None:
        if result is None:
            raise ValueError("plot_hmm needs a fit or both posterior= and path_states=.")
        names = tuple(result.sites.latents) if latents is None else tuple(
            [latents] if isinstance(latents, str) else latents)
        if posterior is None:
            posterior = _chain(result.posterior, names, "posterior")
        if path_states is None:
            path_states = _chain(result.most_probable, names, "most_probable")
    q = np.asarray(posterior, float)
    states = np.asarray(path_states).astype(int).reshape(-1)
    if q.ndim != 2 or q.shape[0] != states.shape[0]:
        raise ValueError(f"plot_hmm: the posterior must be (T, K) and the path (T,); got "
                         f"{q.shape} and {states.shape}.")
    T, K = q.shape
    t = np.arange(T) if times is None else np.asarray(times)
    if isinstance(levels, str):
        levels = np.asarray(result.params[levels], float)
    palette = _colours(K)
    fig, (obs_ax, post_ax) = _axes(ax, 2, 8.0, 4.2, sharex=True)
    if post_ax is None:  # one Axes given: the posterior alone
        obs_ax, post_ax = None, obs_ax
    if obs_ax is not None:
        if y is None:
            raise ValueError("plot_hmm needs the observations y for its top panel.")
        yv = np.asarray(y, float).reshape(T, -1)[:, 0]
        obs_ax.plot(t, yv, color="0.7", lw=0.8, zorder=1)
        for k in range(K):
            on = states == k
            obs_ax.scatter(t[on], yv[on], color=palette[k], s=14, zorder=2,
                           label=f"state {k}")
        if levels is not None:
            obs_ax.step(t, np.asarray(levels, float).reshape(K, -1)[states, 0], where="mid",
                        color="k", lw=1.2, gid="levels", label="level of the decoded state")
        obs_ax.set(ylabel="$y_t$", title="observations and most probable state path")
        obs_ax.legend(fontsize="small", ncols=min(K + 1, 4))
    post_ax.stackplot(t, q.T, colors=palette, alpha=0.85, step=None,
                      labels=[f"$p(z_t = {k} \\mid y)$" for k in range(K)])
    post_ax.set(xlabel="$t$", ylabel=r"$p(z_t = k \mid y_{1:T})$", ylim=(0.0, 1.0),
                xlim=(t[0], t[-1]), title="state posterior")
    post_ax.legend(fontsize="small", loc="upper right", ncols=min(K, 4), framealpha=0.9)
    if np.issubdtype(t.dtype, np.integer):
        _integer_ticks(post_ax)
    return _finish(fig, path)


# -- responsibilities ------------------------------------------------------------------------------
def _ellipse(ax, mean, cov, colour, n_std):
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(np.asarray(cov))
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    w, h = 2 * n_std * np.sqrt(np.maximum(vals[::-1], 0.0))
    ax.add_patch(Ellipse(mean, w, h, angle=angle, fill=False, color=colour, lw=1.5))


def plot_responsibilities(result, x, latent=None, loc="loc", cov="cov", path=None, ax=None):
    """Data coloured by responsibility: each point's colour is Σ_k p(z_n = k | x_n) · colour_k.

    `x`: the data, shape (N,) or (N, 1) for a strip plot, or (N, 2) for a scatter plot.
    `latent`: the latent site (default: the first). If the fit has a site named `loc` it is
    drawn as the component locations, and in 2-D a site `cov` (K, 2, 2) as 1- and 2-sd ellipses.
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
    fig, (ax,) = _axes(ax, 1, 6.0, 4.0)
    if x.ndim == 1:
        jitter = np.random.default_rng(0).uniform(-0.4, 0.4, x.shape[0])
        y = np.argmax(q, axis=1) + jitter
        ax.scatter(x, y, c=colours, s=12, edgecolors="none")
        ax.set(xlabel="$x$", ylabel="most probable component (jittered)", yticks=np.arange(K))
        if locs is not None:
            for k in range(K):
                ax.axvline(float(np.ravel(locs)[k]), color=palette[k], ls="--", lw=1.2)
    else:
        ax.scatter(x[:, 0], x[:, 1], c=colours, s=12, edgecolors="none")
        ax.set(xlabel="$x_0$", ylabel="$x_1$")
        if locs is not None and locs.shape == (K, 2):
            ax.scatter(locs[:, 0], locs[:, 1], c=palette, marker="X", s=90, edgecolors="k")
            if cov in result.params and np.shape(result.params[cov]) == (K, 2, 2):
                for k in range(K):
                    for n_std in (1.0, 2.0):
                        _ellipse(ax, locs[k], result.params[cov][k], palette[k], n_std)
    ax.set_title(rf"data coloured by $p(\mathrm{{{latent}}} = k \mid x, \hat\theta)$")
    return _finish(fig, path)
