"""bayes_em.plots (Agg backend, no pyplot): every plot draws with and without ``ax=`` (into the
given axes), iteration axes have integer ticks, the mixture picture's curves are the weighted
components, their sum and the posteriors (checked against scipy.stats.norm), and the HMM picture
shows the decoded path and the state posterior of the fit."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from matplotlib.figure import Figure
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from scipy import stats

from bayes_em import EM, models, plots

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def gmm_fit():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2.0, 0.6, 120), rng.normal(1.5, 1.0, 80)])[:, None]
    result = EM(models.gmm, restarts=2, max_iter=100, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=2, covariance="spherical")
    return result, x


def gaussian_hmm(ys, K):
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", 0.8 * jnp.eye(K) + 0.2 / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
    scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)
    z0 = numpyro.sample("z0", dist.Categorical(init))
    numpyro.sample("y0", dist.Normal(loc[z0], scale[z0]), obs=ys[0])

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Normal(loc[z], scale[z]), obs=y)
        return z, None

    scan(step, z0, ys[1:])


@pytest.fixture(scope="module")
def hmm_fit():
    rng = np.random.default_rng(1)
    states = np.repeat(rng.integers(2, size=12), 10)  # 120 steps, sticky
    ys = np.array([-1.5, 1.5])[states] + 0.5 * rng.normal(size=120)
    result = EM(gaussian_hmm, max_iter=100, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(ys), K=2)
    return result, ys


def _lines(ax):
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


def _all_lines(fig):
    return {gid: line for ax in fig.axes for gid, line in _lines(ax).items()}


def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


# -- with and without ax= --------------------------------------------------------------------------
def _calls(gmm_fit, hmm_fit):
    (g, x), (h, ys) = gmm_fit, hmm_fit
    trace = {"log_likelihood": np.array([-3.0, -2.0, -1.5]), "bound": np.array([-2.5, -1.8]),
             "gap": np.array([0.5, 0.3])}
    return {
        "convergence": (lambda **kw: plots.plot_convergence(g, **kw), 2),
        "bound": (lambda **kw: plots.plot_bound(trace, **kw), 2),
        "mixture": (lambda **kw: plots.plot_mixture(g, x, **kw), 1),
        "hmm": (lambda **kw: plots.plot_hmm(h, ys, levels="loc", **kw), 2),
        "responsibilities": (lambda **kw: plots.plot_responsibilities(g, x, **kw), 1),
    }


NAMES = ["convergence", "bound", "mixture", "hmm", "responsibilities"]


@pytest.mark.parametrize("name", NAMES)
def test_new_figure_and_png(name, gmm_fit, hmm_fit, tmp_path):
    draw, n_panels = _calls(gmm_fit, hmm_fit)[name]
    fig = draw(path=tmp_path / f"{name}.png")
    assert isinstance(fig, Figure)
    assert len(fig.axes) >= n_panels
    assert _png(tmp_path / f"{name}.png")


@pytest.mark.parametrize("name", NAMES)
def test_draws_into_the_given_axes(name, gmm_fit, hmm_fit):
    draw, n_panels = _calls(gmm_fit, hmm_fit)[name]
    fig = Figure()
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    out = draw(ax=axes[0] if n_panels == 1 else tuple(axes))
    assert out is fig
    for ax in axes:
        assert ax.has_data(), name
    if n_panels == 2:  # one Axes: the first panel only (the posterior for the HMM)
        fig1 = Figure()
        ax1 = fig1.add_subplot()
        assert draw(ax=ax1) is fig1 and ax1.has_data()
        assert len(fig1.axes) == 1


def test_wrong_ax_is_refused(gmm_fit):
    result, _ = gmm_fit
    fig = Figure()
    with pytest.raises(ValueError, match="sequence of 2 Axes"):
        plots.plot_convergence(result, ax=fig.subplots(1, 3))


def test_iteration_ticks_are_integers(gmm_fit):
    result, _ = gmm_fit
    fig = plots.plot_convergence(result)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert np.allclose(ticks, np.round(ticks)), ticks
    assert "$" in fig.axes[0].get_ylabel()  # mathtext label


# -- the mixture picture ---------------------------------------------------------------------------
def test_mixture_curves_are_components_sum_and_posteriors(gmm_fit):
    result, x = gmm_fit
    fig = plots.plot_mixture(result, x)
    lines = _all_lines(fig)
    K = 2
    grid = lines["mixture"].get_xdata()
    w = np.asarray(result.params["weights"])
    mu = np.asarray(result.params["loc"])[:, 0]
    sd = np.asarray(result.params["scale"])
    components = np.stack([lines[f"component {k}"].get_ydata() for k in range(K)], axis=1)
    expected = w * stats.norm.pdf(grid[:, None], mu, sd)  # independent of plots' own formula
    np.testing.assert_allclose(components, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lines["mixture"].get_ydata(), components.sum(axis=1), rtol=1e-12)
    posts = np.stack([lines[f"posterior {k}"].get_ydata() for k in range(K)], axis=1)
    np.testing.assert_allclose(posts.sum(axis=1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(posts, expected / expected.sum(axis=1, keepdims=True), rtol=1e-6)
    # on the data, the plotted posterior is the fit's responsibility p(z_n = k | x_n)
    at_data = np.stack([np.interp(x[:, 0], grid, posts[:, k]) for k in range(K)], axis=1)
    np.testing.assert_allclose(at_data, np.asarray(result.posterior["z"]), atol=0.02)
    # the mixture density integrates to ~1 over the grid, as does the histogram
    assert abs(np.trapezoid(lines["mixture"].get_ydata(), grid) - 1.0) < 1e-3
    hist_ax = fig.axes[0]
    heights = np.array([p.get_height() for p in hist_ax.patches])
    widths = np.array([p.get_width() for p in hist_ax.patches])
    assert abs(np.sum(heights * widths) - 1.0) < 1e-9
    assert fig.axes[1].get_yticks()[[0, -1]].tolist() == [0.0, 1.0]  # posteriors, twin axis


def test_mixture_from_arrays_and_every_gmm_covariance(gmm_fit):
    _, x = gmm_fit
    fig = plots.plot_mixture(x=x, loc=[-2.0, 1.0, 3.0], scale=[0.5, 1.0, 0.3],
                             weights=[0.5, 0.3, 0.2], responsibilities=False)
    lines = _all_lines(fig)
    assert len(fig.axes) == 1 and {f"component {k}" for k in range(3)} <= set(lines)
    grid = lines["mixture"].get_xdata()
    np.testing.assert_allclose(
        lines["component 2"].get_ydata(), 0.2 * stats.norm.pdf(grid, 3.0, 0.3), rtol=1e-9)
    # models.gmm's sites for every covariance, read generically
    for cov, params in {
        "full": {"weights": [0.4, 0.6], "loc": [[0.0], [2.0]], "cov": [[[0.25]], [[4.0]]]},
        "diag": {"weights": [0.4, 0.6], "loc": [[0.0], [2.0]], "scale": [[0.5], [2.0]]},
        "tied": {"weights": [0.4, 0.6], "loc": [[0.0], [2.0]], "cov": [[1.0]]},
    }.items():
        fake = type("Fit", (), {"params": {k: np.asarray(v) for k, v in params.items()}})()
        w, mu, sd = plots.mixture_components(fake)
        np.testing.assert_allclose(w, [0.4, 0.6])
        np.testing.assert_allclose(mu, [0.0, 2.0])
        np.testing.assert_allclose(sd, {"tied": [1.0, 1.0]}.get(cov, [0.5, 2.0]))
    with pytest.raises(ValueError, match="loc="):
        plots.plot_mixture(x=x, scale=[1.0], weights=[1.0])


# -- the HMM picture -------------------------------------------------------------------------------
def test_hmm_plot_shows_the_decoded_path_and_posterior(hmm_fit):
    result, ys = hmm_fit
    fig = plots.plot_hmm(result, ys, levels="loc")
    obs_ax, post_ax = fig.axes
    T = len(ys)
    path = np.concatenate([np.atleast_1d(result.most_probable["z0"]),
                           np.asarray(result.most_probable["z"])])
    loc = np.asarray(result.params["loc"])
    np.testing.assert_allclose(_lines(obs_ax)["levels"].get_ydata(), loc[path])
    # points coloured by the decoded state: one scatter per state, T points in all
    assert sum(len(c.get_offsets()) for c in obs_ax.collections) == T
    # the stacked posterior: state 1's band lies between p(z_t = 0 | y) and 1 at every step
    q = np.concatenate([np.asarray(result.posterior["z0"])[None],
                        np.asarray(result.posterior["z"])])
    assert q.shape == (T, 2) and len(post_ax.collections) == 2
    band = post_ax.collections[-1].get_paths()[0].vertices
    step = np.clip(np.round(band[:, 0]).astype(int), 0, T - 1)
    on_edge = np.isclose(band[:, 1], 1.0) | np.isclose(band[:, 1], q[step, 0], atol=1e-9)
    assert on_edge.all() and np.isclose(band[:, 1], q[step, 0], atol=1e-9).sum() >= T
    assert post_ax.get_ylim() == (0.0, 1.0)


def test_hmm_plot_from_arrays_of_new_data(hmm_fit):
    result, ys = hmm_fit
    proba = result.predict_proba(jnp.asarray(ys[:50]), K=2)
    decoded = result.predict(jnp.asarray(ys[:50]), K=2)
    q = np.concatenate([proba["z0"][None], proba["z"]])
    path = np.concatenate([np.atleast_1d(decoded["z0"]), decoded["z"]])
    fig = plots.plot_hmm(y=ys[:50], posterior=q, path_states=path, times=1900 + np.arange(50))
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match=r"\(T, K\)"):
        plots.plot_hmm(y=ys[:50], posterior=q[:10], path_states=path)
