"""One-pass EM (`bayes_em.fused`): the E-step's additive statistics carried in the state instead
of the weights, at once or over blocks of rows. Reference: a NumPy EM for a full-covariance
Gaussian mixture from the same start (float64), and the unfused numeric path's structure."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from shared_models import diag_gmm, full_gmm

from bayes_em import EM, additive, fused


def laplace_mixture(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Laplace(loc[z], 1.0), obs=x)


def numpy_em(x, w, mu, cov, n_iter):
    """Textbook EM for a full-covariance mixture (densities by Cholesky solves)."""
    N, D = x.shape
    for _ in range(n_iter):
        logp = np.empty((N, len(w)))
        for k in range(len(w)):
            L = np.linalg.cholesky(cov[k])
            y = np.linalg.solve(L, (x - mu[k]).T)
            logp[:, k] = (np.log(w[k]) - 0.5 * np.sum(y**2, 0) - np.log(np.diag(L)).sum()
                          - 0.5 * D * np.log(2 * np.pi))
        m = logp.max(1, keepdims=True)
        r = np.exp(logp - m)
        r /= r.sum(1, keepdims=True)
        n = r.sum(0)
        w, mu = n / N, (r.T @ x) / n[:, None]
        cov = np.stack([((x - mu[k]).T * r[:, k]) @ (x - mu[k]) / n[k] for k in range(len(w))])
    return w, mu, cov


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    K, D, N = 3, 3, 1000
    centres = rng.normal(size=(K, D)) * 3 + 50.0  # away from the origin: the references matter
    x = centres[rng.integers(K, size=N)] + rng.normal(size=(N, D))
    init = dict(w=np.ones(K) / K, loc=x[:K].copy(), cov=np.stack([np.eye(D) * 2.0] * K))
    return x, init


@pytest.mark.parametrize("block_rows,equal", [(0, True), (None, True), (128, True), (333, False)])
def test_one_pass_matches_numpy_em(data, block_rows, equal, monkeypatch):
    """At once, in blocks from the byte budget (1024 rows: one block), in equal blocks (128 →
    125 rows), in blocks of 333 with a masked last one."""
    x, init = data
    monkeypatch.setattr(fused, "BLOCK_ROWS", block_rows)
    if not equal:
        monkeypatch.setattr(fused, "_equal_blocks", lambda n, target: target)
    result = EM(full_gmm, max_iter=6, tol=0.0, init_values=init, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), 3)
    plan = result.problem.fused
    assert plan is not None and (plan.blocks is None) == (block_rows in (0, None))
    if block_rows:
        assert plan.blocks.size == (125 if equal else 333)
    w, mu, cov = numpy_em(x, init["w"], init["loc"], init["cov"], 6)
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-9)
    np.testing.assert_allclose(result.params["loc"], mu, rtol=1e-9)
    np.testing.assert_allclose(result.params["cov"], cov, rtol=1e-9)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_numeric_parameters_keep_the_weights():
    x = np.random.default_rng(0).laplace(size=200)
    result = EM(laplace_mixture, max_iter=3, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), 2)
    assert result.problem.fused is None


def test_block_sizes():
    assert fused._equal_blocks(10**6, 9709) == 10000  # a divisor near the budget: no mask
    assert fused._equal_blocks(999983, 8192) == 8130  # a prime: 123 blocks, the last masked
    assert fused._equal_blocks(20011, 16384) == 10006  # two blocks, not 16384 + 5627
    assert fused._equal_blocks(20000, 16384) == 10000
    lay = additive.layout(())
    assert fused._block_rows(lay, {"w": jnp.ones(3)}) == 16384  # counts only: the cap


def test_recentre_matches_sums_about_the_new_reference():
    """Raw statistics about one reference moved to another equal the sums taken about it."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(50, 3)) + 7.0, rng.uniform(size=(2, 50))
    a, b = np.array([[7.5, 6.0, 8.0]]), np.array([[0.3, -1.0, 2.0]])

    def sums(c):
        d = x - c
        return {"s0": w.sum(1)[:, None], "s1": (w @ d)[:, None],
                "s2": np.einsum("kn,ni,nj->kij", w, d, d)[:, None]}

    group = additive.Group(("x",), _Plan("loc"), _Plan("cov"), True)
    lay = additive.Layout((), (), (group,))

    def summed(st):  # s2 is kept summed over the location rows
        return {**st, "s2": st["s2"].sum(0)}

    got = additive.recentre(lay, {group.key: summed(sums(a))}, {"loc": jnp.asarray(a)},
                            {"loc": jnp.asarray(b)})[group.key]
    want = summed(sums(b))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12)


class _Plan:
    def __init__(self, param):
        self.param = param


def tied_gmm(x, K):
    """A Gaussian mixture sharing one covariance (fewer precisions than locations)."""
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    cov = numpyro.param("cov", jnp.eye(D), constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov), obs=x)


def numpy_tied_em(x, w, mu, cov, n_iter):
    """Textbook EM for a mixture with one shared covariance."""
    N, D = x.shape
    for _ in range(n_iter):
        L = np.linalg.cholesky(cov)
        logp = np.stack([np.log(w[k]) - 0.5 * np.sum(np.linalg.solve(L, (x - mu[k]).T) ** 2, 0)
                         for k in range(len(w))], 1)
        r = np.exp(logp - logp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        n = r.sum(0)
        w, mu = n / N, (r.T @ x) / n[:, None]
        cov = sum(((x - mu[k]).T * r[:, k]) @ (x - mu[k]) for k in range(len(w))) / N
    return w, mu, cov


@pytest.mark.parametrize("n", [20011, 20000])  # a prime (a masked last block), equal blocks
@pytest.mark.parametrize("tied", [False, True])
def test_default_blocks_match_numpy_em(n, tied):
    """Default settings at a size where the one-pass iteration runs in blocks of rows."""
    rng = np.random.default_rng(2)
    K, D = 3, 3
    centres = rng.normal(size=(K, D)) * 3 - 20.0
    x = centres[rng.integers(K, size=n)] + rng.normal(size=(n, D))
    cov0 = np.eye(D) * 2.0 if tied else np.stack([np.eye(D) * 2.0] * K)
    init = dict(w=np.ones(K) / K, loc=x[:K].copy(), cov=cov0)
    result = EM(tied_gmm if tied else full_gmm, max_iter=5, tol=0.0, init_values=init,
                progress_bar=False).run(jax.random.PRNGKey(0), jnp.asarray(x), K)
    blocks = result.problem.fused.blocks
    assert blocks is not None and (n % blocks.size == 0) == (n == 20000)
    ref = (numpy_tied_em if tied else numpy_em)(x, init["w"], init["loc"], init["cov"], 5)
    for name, want in zip(("w", "loc", "cov"), ref):
        np.testing.assert_allclose(result.params[name], want, rtol=1e-9, atol=1e-12)


def poisson_mixture(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.linspace(1.0, 10.0, K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Poisson(rate[z]), obs=x)


def test_counts_in_blocks_match_numpy_em():
    """A mixture with no Gaussian site, in blocks (the byte budget: 16384 rows; 40000 rows in
    equal blocks of 10000)."""
    rng = np.random.default_rng(3)
    x = rng.poisson(np.array([1.0, 4.0, 12.0])[rng.integers(3, size=40000)]).astype(float)
    result = EM(poisson_mixture, max_iter=5, tol=0.0, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), 3)
    assert result.problem.fused.blocks.size == 10000
    w, rate = np.ones(3) / 3, np.linspace(1.0, 10.0, 3)
    for _ in range(5):
        logp = np.log(w) + x[:, None] * np.log(rate) - rate
        r = np.exp(logp - logp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        w, rate = r.mean(0), (r.T @ x) / r.sum(0)
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-9)
    np.testing.assert_allclose(result.params["rate"], rate, rtol=1e-9)


@pytest.mark.parametrize("n", [20011, 1500])  # in blocks (the last masked); at once
def test_diagonal_one_pass_matches_numpy_em(n):
    """Univariate statistics as matrix products about each column's mean, moved to the
    locations (columns far apart: −50 and 300)."""
    rng = np.random.default_rng(4)
    K, D = 3, 2
    centres = rng.normal(size=(K, D)) * 3 + np.array([-50.0, 300.0])
    x = centres[rng.integers(K, size=n)] + rng.normal(size=(n, D)) * np.array([1.0, 0.2])
    init = dict(w=np.ones(K) / K, loc=x[:K].copy(), scale=np.ones((K, D)))
    result = EM(diag_gmm, max_iter=5, tol=0.0, init_values=init, progress_bar=False).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K)
    assert (result.problem.fused.blocks is None) == (n == 1500)
    w, mu, var = init["w"], init["loc"], init["scale"] ** 2
    for _ in range(5):
        logp = np.log(w) - 0.5 * np.sum(np.log(2 * np.pi * var)[None]
                                        + (x[:, None] - mu[None]) ** 2 / var[None], -1)
        r = np.exp(logp - logp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        n_k = r.sum(0)
        w, mu = n_k / len(x), (r.T @ x) / n_k[:, None]
        var = np.einsum("nk,nkd->kd", r, (x[:, None] - mu[None]) ** 2) / n_k[:, None]
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-9)
    np.testing.assert_allclose(result.params["loc"], mu, rtol=1e-9)
    np.testing.assert_allclose(result.params["scale"], np.sqrt(var), rtol=1e-9)


def shared_over_columns(x, K):
    """One location and scale per component for every column of the row."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros(K))
    scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z][..., None], scale[z][..., None]).to_event(1),
                       obs=x)


def test_location_shared_by_columns_matches_numpy_em():
    """A location read by two columns with different means (the statistics' reference is then
    one centre for both): one pass in blocks against a NumPy EM."""
    rng = np.random.default_rng(5)
    n, K = 20011, 3
    means = np.array([-4.0, 2.0, 8.0])
    x = means[rng.integers(K, size=n)][:, None] + rng.normal(size=(n, 2)) + np.array([0.0, 3.0])
    init = dict(w=np.ones(K) / K, loc=np.array([-3.0, 1.0, 6.0]), scale=np.ones(K))
    result = EM(shared_over_columns, max_iter=5, tol=0.0, init_values=init,
                progress_bar=False).run(jax.random.PRNGKey(0), jnp.asarray(x), K)
    assert result.problem.fused.blocks is not None
    w, mu, var = init["w"], init["loc"], init["scale"] ** 2
    for _ in range(5):
        sq = (x[:, None, :] - mu[None, :, None]) ** 2  # (n, K, 2)
        logp = np.log(w) - np.log(2 * np.pi * var) - 0.5 * sq.sum(-1) / var
        r = np.exp(logp - logp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        n_k = r.sum(0)
        w, mu = n_k / n, (r.T @ x.sum(1)) / (2 * n_k)
        var = np.einsum("nk,nkd->k", r, (x[:, None, :] - mu[None, :, None]) ** 2) / (2 * n_k)
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-9)
    np.testing.assert_allclose(result.params["loc"], mu, rtol=1e-9)
    np.testing.assert_allclose(result.params["scale"], np.sqrt(var), rtol=1e-9)


@pytest.mark.parametrize("loc_shape,scale_shape", [
    ((3, 1, 2), (3, 1, 2)), ((3, 1, 1), (3, 1, 1)), ((3, 1, 2), (3, 1, 1)), ((3, 1, 1), (3, 1, 2)),
    ((3, 1, 2), ())])
def test_gaussian_log_prob_matches_numpyro(loc_shape, scale_shape):
    """The matrix-product log-densities (`bayes_em.gaussian.log_prob`) against NumPyro's own,
    for diagonal normals whose location or scale is shared by the event's entries (size 1)."""
    from bayes_em import gaussian

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(40, 2)) * 3 + np.array([5.0, -20.0]))
    loc = jnp.asarray(rng.normal(size=loc_shape) * 4)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=scale_shape))
    fn = dist.Normal(loc, scale).to_event(1)
    np.testing.assert_allclose(gaussian.log_prob(fn, x), fn.log_prob(x), rtol=1e-12)
    cov = np.stack([np.diag(rng.uniform(0.5, 2.0, size=2)) for _ in range(3)])[:, None]
    mvn = dist.MultivariateNormal(jnp.asarray(rng.normal(size=(3, 1, 2))), jnp.asarray(cov))
    np.testing.assert_allclose(gaussian.log_prob(mvn, x), mvn.log_prob(x), rtol=1e-12)
