"""Using a fitted model (issue 16): ``result.save`` / ``EMResult.load`` round-trip any fit —
at a saddle, on a boundary (no Laplace approximation there), a regular GMM — with its settings
and versions, refuse to overwrite, read files of other format versions; and the posterior
predictive group of ``to_inference_data`` feeds ``az.plot_ppc``."""

import datetime
import json
import pickle
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import bayes_em
from bayes_em import EM, ConvergenceWarning, EMResult, Status, models, persist
from bayes_em import diagnostics as D

jax.config.update("jax_enable_x64", True)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def full_mixture(x, K):
    D_ = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D_)))
    cov = numpyro.param("cov", jnp.broadcast_to(jnp.eye(D_), (K, D_, D_)),
                        constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov[z]), obs=x)


def two_clusters(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.concatenate([rng.normal(-3, 1, (n // 2, 2)),
                                       rng.normal(3, 1, (n // 2, 2))]))


@pytest.fixture(scope="module")
def gmm_fit():
    x = two_clusters()
    result = EM(models.gmm, restarts=3, max_iter=100, tol=1e-10, record_params=True,
                progress_bar=False).run(jax.random.PRNGKey(0), x, K=2)
    assert result.status == "converged"
    return result, x


@pytest.fixture(scope="module")
def saddle_fit():
    """Both components declared at the same values: EM stays on the symmetric saddle."""
    x = two_clusters()
    with pytest.warns(ConvergenceWarning, match="saddle"):
        result = EM(full_mixture, progress_bar=False).run(jax.random.PRNGKey(0), x, K=2)
    assert result.status == "saddle"
    return result, x


@pytest.fixture(scope="module")
def boundary_fit():
    """Latent class analysis where item 2 is always 1: its probability is fitted to exactly 1."""
    rng = np.random.default_rng(0)
    z = rng.integers(2, size=200)
    p = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.3]])
    x = (rng.random((200, 3)) < p[z]).astype(float)
    x[:, 2] = 1.0
    result = EM(models.bernoulli_mixture, restarts=2, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K=2)
    assert np.all(np.asarray(result.params["probs"])[:, 2] == 1.0)  # on the boundary
    return result, x


# -- the round trip -------------------------------------------------------------------------------
def assert_same(back, result):
    """Every number of ``result`` is in ``back``, bit for bit, with its dtype."""
    assert isinstance(back, EMResult)
    assert list(back.params) == list(result.params)
    for k, v in result.params.items():
        assert isinstance(back.params[k], jax.Array)
        assert back.params[k].dtype == v.dtype and back.params[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(back.params[k]), np.asarray(v))
    for name in ("objective", "log_likelihood", "log_prior", "n_iter", "best_restart"):
        assert getattr(back, name) == getattr(result, name), name
        assert type(getattr(back, name)) is type(getattr(result, name)), name
    assert back.status == result.status and isinstance(back.status, Status)
    assert back.restart_status == result.restart_status
    assert all(isinstance(s, Status) for s in back.restart_status)
    assert back.restart_messages == result.restart_messages and back.message == result.message
    assert list(back.restart_params) == list(result.restart_params)
    for k, v in result.restart_params.items():
        assert back.restart_params[k].dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(back.restart_params[k], v)
    for name in ("restart_objective", "restart_n_iter", "n_decreases", "n_evals", "n_accepted",
                 "n_fallbacks"):
        expected = np.asarray(getattr(result, name))
        assert getattr(back, name).dtype == expected.dtype, name
        np.testing.assert_array_equal(getattr(back, name), expected, err_msg=name)
    assert set(back.history) == set(result.history)
    for k, v in result.history.items():
        if k == "params":
            assert set(back.history[k]) == set(v)
            for site, values in v.items():
                np.testing.assert_array_equal(back.history[k][site], values)
        else:  # NaN tails after a restart stopped compare equal
            assert back.history[k].shape == v.shape
            np.testing.assert_array_equal(back.history[k], v, err_msg=k)
    for a, b in zip(back.sites.params, result.sites.params, strict=True):
        assert (a.name, a.kind, repr(a.constraint)) == (b.name, b.kind, repr(b.constraint))
        assert a.constraint == b.constraint  # NumPyro's own constraint objects
        np.testing.assert_array_equal(a.init, b.init)
    assert back.sites._replace(params=()) == result.sites._replace(params=())
    assert dict(back.mstep_paths) == dict(result.mstep_paths)
    assert repr(back) == repr(result)
    for k, v in result.posterior.items():
        np.testing.assert_array_equal(back.posterior[k], v)
        np.testing.assert_array_equal(back.most_probable[k], result.most_probable[k])
    assert_same_settings(back.settings, result.settings)


def assert_same_settings(a, b):
    assert set(a) == set(b)
    for k in b:
        if k in ("fixed", "init_values"):
            assert set(a[k]) == set(b[k])
            for site in b[k]:
                np.testing.assert_array_equal(a[k][site], b[k][site])
        else:
            assert a[k] == b[k], k


def test_gmm_round_trip(gmm_fit, tmp_path):
    result, x = gmm_fit
    path = result.save(tmp_path / "gmm.npz")
    assert path == tmp_path / "gmm.npz"
    back = EMResult.load(path)
    assert_same(back, result)
    assert "params" in back.history and back.n_restarts == 3
    # the settings are those EM was given, not defaults
    s = back.settings
    assert (s["restarts"], s["max_iter"], s["tol"], s["record_params"]) == (3, 100, 1e-10, True)
    assert (s["hard"], s["semiring"], s["closed_form"], s["init"]) == (False, "sum", True,
                                                                        "anchors")
    assert s["model"] == "bayes_em.models.gmm" and s["jax_enable_x64"] is True
    assert s["mstep"] == {"max_steps": 100, "gtol": None, "memory_size": 10}
    # provenance: the versions of the stack and the date
    meta = persist.metadata(path)
    assert meta["format"] == "bayes_em.EMResult" and meta["format_version"] == 1
    versions = meta["versions"]
    assert versions["bayes_em"] == bayes_em.__version__ and versions["jax"] == jax.__version__
    assert versions["numpyro"] == numpyro.__version__ and versions["numpy"] == np.__version__
    assert versions["funsor"] and versions["arviz"] and versions["python"].count(".") == 2
    date = datetime.datetime.fromisoformat(meta["date"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date).total_seconds() < 600
    # a warm start from the loaded parameters starts at the saved objective
    warm = EM(models.gmm, max_iter=1, tol=0.0, init_values=back.params,
              progress_bar=False).run(jax.random.PRNGKey(0), x, K=2)
    np.testing.assert_allclose(warm.history["objective"][0, 0], result.objective, rtol=1e-12)


def test_saddle_round_trip(saddle_fit, tmp_path):
    """A fit at a saddle has no Laplace approximation: the netCDF path refuses it and points to
    result.save, which keeps it exactly."""
    result, _ = saddle_fit
    with pytest.raises(ValueError, match="not positive definite"):
        D.laplace(result)
    with pytest.raises(ValueError, match=r"result\.save\(path\)"):
        D.save(result, tmp_path / "saddle.nc", num_samples=5, num_chains=1)
    back = EMResult.load(result.save(tmp_path / "saddle.npz"))
    assert_same(back, result)
    assert back.status == "saddle" and "saddle" in back.message
    np.testing.assert_array_equal(back.params["loc"][0], back.params["loc"][1])


def test_boundary_round_trip(boundary_fit, tmp_path):
    result, _ = boundary_fit
    with pytest.raises(ValueError, match="not positive definite"):
        D.laplace(result)
    back = EMResult.load(result.save(tmp_path / "boundary.npz"))
    assert_same(back, result)
    assert np.all(np.asarray(back.params["probs"])[:, 2] == 1.0)
    assert back.mstep_paths["probs"] == "closed-form bernoulli"


def test_settings_of_a_hard_fit_with_fixed_and_initial_values(tmp_path):
    x = two_clusters(n=60)
    fixed = {"w": jnp.array([0.25, 0.75])}
    init = {"loc": np.array([[-1.0, 0.0], [1.0, 0.0]])}
    result = EM(full_mixture, hard=True, fixed=fixed, init_values=init, max_iter=20,
                accelerate=False, closed_form=False, progress_bar=False).run(
        jax.random.PRNGKey(0), x, K=2)
    back = EMResult.load(result.save(tmp_path / "hard.npz"))
    assert_same(back, result)
    s = back.settings
    assert s["hard"] is True and s["semiring"] == "max" and s["closed_form"] is False
    assert s["model"].endswith("full_mixture")  # seen through the fixed= wrapper
    np.testing.assert_array_equal(s["fixed"]["w"], [0.25, 0.75])
    np.testing.assert_array_equal(s["init_values"]["loc"], init["loc"])
    assert "w" not in back.params


# -- a loaded result is like an unpickled one -----------------------------------------------------
def test_loaded_result_says_what_it_cannot_do(gmm_fit, tmp_path):
    result, x = gmm_fit
    back = EMResult.load(result.save(tmp_path / "fit.npz"))
    with pytest.raises(ValueError, match="loaded from a file"):
        back.predict_proba(x, K=2)
    with pytest.raises(ValueError, match="loaded from a file"):
        back.sample(jax.random.PRNGKey(0), x, K=2)
    with pytest.raises(ValueError, match="loaded from a file"):
        back.bic()
    with pytest.raises(ValueError, match="loaded from a file"):
        back.to_inference_data()
    # it pickles and saves again, numbers intact
    assert_same(pickle.loads(pickle.dumps(back)), result)
    again = EMResult.load(back.save(tmp_path / "again.npz"))
    assert_same(again, result)
    unpickled = pickle.loads(pickle.dumps(result))
    assert_same(EMResult.load(unpickled.save(tmp_path / "unpickled.npz")), result)


def test_posterior_left_out_when_it_cannot_be_computed(tmp_path):
    x = two_clusters(n=60)
    fresh = EM(models.gmm, max_iter=5, tol=0.0, progress_bar=False).run(
        jax.random.PRNGKey(0), x, K=2)
    lean = pickle.loads(pickle.dumps(fresh))  # posterior never computed, and no model now
    back = EMResult.load(lean.save(tmp_path / "lean.npz"))
    np.testing.assert_array_equal(back.params["loc"], fresh.params["loc"])
    with pytest.raises(ValueError, match="loaded from .*lean.npz"):
        back.posterior


# -- refusing to overwrite; other files -----------------------------------------------------------
def test_refuses_to_overwrite(saddle_fit, boundary_fit, tmp_path):
    path = tmp_path / "fit.npz"
    saddle_fit[0].save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        boundary_fit[0].save(path)
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        boundary_fit[0].save(str(path), overwrite=False)
    assert path.read_bytes() == before
    path.chmod(0o640)
    boundary_fit[0].save(path, overwrite=True)
    assert path.stat().st_mode & 0o777 == 0o640  # replaced, permissions kept
    assert_same(EMResult.load(path), boundary_fit[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.npz"]  # no temporary left


def test_netcdf_save_refuses_to_overwrite(gmm_fit, tmp_path):
    result, _ = gmm_fit
    idata = result.to_inference_data(num_samples=5, num_chains=1)
    path = tmp_path / "fit.nc"
    D.save(idata, path)
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        D.save(idata, path)
    D.save(idata, path, overwrite=True)
    assert D.load(path)["em_estimate"]["loc"].shape == (3, 2, 2)


def _rewrite(path, out, change):
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = change(persist.metadata(path))
    arrays["__metadata__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(out, **arrays)
    return out


def test_files_of_other_versions(boundary_fit, tmp_path):
    result, _ = boundary_fit
    path = result.save(tmp_path / "fit.npz")

    def older_package(meta):  # another bayes_em release, same file format: loads quietly
        meta["versions"]["bayes_em"] = "0.0.1"
        return meta

    def newer_format(meta):  # a later file format with fields unknown here: loads, warns
        meta["versions"]["bayes_em"] = "9.0"
        meta["format_version"] = 99
        meta["something_new"] = {"a": 1}
        return meta

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(EMResult.load(_rewrite(path, tmp_path / "old.npz", older_package)), result)
    with pytest.warns(UserWarning, match="bayes_em 9.0 in file format 99"):
        back = EMResult.load(_rewrite(path, tmp_path / "new.npz", newer_format))
    assert_same(back, result)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a file written by EMResult.save"):
        EMResult.load(tmp_path / "other.npz")


# -- the posterior predictive group ----------------------------------------------------------
def test_posterior_predictive_feeds_plot_ppc(gmm_fit):
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result, x = gmm_fit
    N, D_ = x.shape
    plain = result.to_inference_data(num_samples=10, num_chains=2)
    assert "posterior_predictive" not in plain.groups()
    idata = result.to_inference_data(num_samples=10, num_chains=2, posterior_predictive=True,
                                     num_predictive=40)
    pp = idata.posterior_predictive["x"]
    assert pp.shape == (2, 40, N, D_) and pp.dims[:3] == ("chain", "draw", "data")
    assert list(pp.dims[2:]) == list(idata.observed_data["x"].dims)
    np.testing.assert_array_equal(idata.observed_data["x"].values, np.asarray(x))
    draws = pp.values.reshape(-1, D_)
    assert not np.allclose(pp.values[0, 0], np.asarray(x))  # drawn, not the data
    # the draws follow the fitted mixture: its mean and covariance
    w, loc, cov = (np.asarray(result.params[k]) for k in ("weights", "loc", "cov"))
    mean = w @ loc
    second = np.einsum("k,kij->ij", w, cov + loc[:, :, None] * loc[:, None, :])
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.15)
    np.testing.assert_allclose(np.cov(draws.T), second - np.outer(mean, mean), rtol=0.06,
                               atol=0.1)
    axes = az.plot_ppc(idata, num_pp_samples=20)
    assert np.size(axes) >= 1
    plt.close("all")


def test_posterior_predictive_one_chain_per_restart(gmm_fit):
    result, _ = gmm_fit
    idata = result.to_inference_data(num_samples=5, restarts=[0, 2], posterior_predictive=True,
                                     num_predictive=3)
    pp = idata.posterior_predictive["x"]
    assert list(pp.chain.values) == [0, 2] and pp.shape[:2] == (2, 3)
    with pytest.raises(ValueError, match="num_predictive"):
        result.to_inference_data(num_samples=5, num_chains=1, posterior_predictive=True,
                                 num_predictive=0)


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow runs it
def test_posterior_predictive_of_an_hmm_matches_its_observed_data():
    """A scan HMM: observed data and draws both hold the whole sequence (time first)."""
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from shared_models import categorical_hmm

    rng = np.random.default_rng(0)
    z = np.cumsum(rng.random(300) < 0.1) % 2
    ys = np.where(z == 0, rng.choice(3, 300, p=[0.7, 0.2, 0.1]),
                  rng.choice(3, 300, p=[0.1, 0.2, 0.7]))
    start = dict(trans=jnp.array([[0.8, 0.2], [0.3, 0.7]]),
                 emit=jnp.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
    result = EM(categorical_hmm, init_values=start, max_iter=200, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(ys), K=2, V=3)
    idata = result.to_inference_data(num_samples=5, num_chains=2, posterior_predictive=True,
                                     num_predictive=10)
    np.testing.assert_array_equal(idata.observed_data["y"].values, ys)
    pp = idata.posterior_predictive["y"]
    assert pp.shape == (2, 10, 300) and set(np.unique(pp.values)) <= {0, 1, 2}
    assert pp.dims[2:] == idata.observed_data["y"].dims
    az.plot_ppc(idata, num_pp_samples=5, kind="scatter")
    plt.close("all")
