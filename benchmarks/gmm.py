"""Gaussian-mixture EM: bayes_em (an ordinary NumPyro model) vs a hand-written sufficient-statistics
JAX EM and scikit-learn, from the same initial parameters, in the same run.

    python benchmarks/gmm.py [--quick] [--f32] [--sizes 1e4,1e5] [--cov full,diag,tied,spherical]
        [--iters 20]

Prints a markdown table: ms/iteration (median of repeats, compile excluded), compile time,
final log-likelihood and ratios to scikit-learn. Threads pinned to one BLAS thread per process.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--f32", action="store_true", help="float32 (default float64)")
    ap.add_argument("--sizes", default=None, help="comma-separated N values")
    ap.add_argument("--dims", default="2,8")
    ap.add_argument("--ks", default="4,16")
    ap.add_argument("--cov", default="full,diag", help="of full, diag, tied, spherical")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sklearn", action="store_true",
                    help="skip scikit-learn (its columns: nan)")
    return ap.parse_args()


ARGS = parse()
jax.config.update("jax_enable_x64", not ARGS.f32)

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from bayes_em import EM  # noqa: E402

DTYPE = jnp.float32 if ARGS.f32 else jnp.float64


def gmm_full(x, K):
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    cov = numpyro.param("cov", jnp.broadcast_to(jnp.eye(D), (K, D, D)),
                        constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov[z]), obs=x)


def gmm_diag(x, K):
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    scale = numpyro.param("scale", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]).to_event(1), obs=x)


def gmm_tied(x, K):
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    cov = numpyro.param("cov", jnp.eye(D), constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov), obs=x)


def gmm_spherical(x, K):
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z][:, None]).to_event(1), obs=x)


# ---- the hand-written reference: sufficient statistics as matrix products -------------------
def precision_terms(mu, cov):
    """P = Σ⁻¹, P μ and log |Σ| per component."""
    L = jnp.linalg.cholesky(cov)
    P = jnp.linalg.inv(cov)
    logdet = 2 * jnp.log(jnp.diagonal(L, axis1=1, axis2=2)).sum(-1)
    return P, jnp.einsum("kde,ke->kd", P, mu), logdet


def ss_em_full(x, w, mu, cov, n_iter):
    """EM for a full-covariance GMM: log-densities and statistics from X, X⊗X matrix products."""
    N, D = x.shape
    xx = (x[:, :, None] * x[:, None, :]).reshape(N, D * D)

    def step(carry, _):
        w, mu, cov = carry
        P, Pm, logdet = precision_terms(mu, cov)
        maha = xx @ P.reshape(-1, D * D).T - 2 * x @ Pm.T + jnp.einsum("kd,kd->k", mu, Pm)
        logp = jnp.log(w) - 0.5 * (maha + logdet + D * jnp.log(2 * jnp.pi))
        ll = jax.nn.logsumexp(logp, axis=1)
        r = jnp.exp(logp - ll[:, None])
        n = r.sum(0)
        mu = (r.T @ x) / n[:, None]
        s2 = (r.T @ xx).reshape(-1, D, D) / n[:, None, None]
        cov = s2 - mu[:, :, None] * mu[:, None, :]
        return (n / N, mu, cov), ll.sum()

    (w, mu, cov), lls = jax.lax.scan(step, (w, mu, cov), None, length=n_iter)
    return w, mu, cov, lls


def ss_em_full_blocked(x, w, mu, cov, n_iter, block=8000):
    """The same EM in one pass over blocks of rows (the floor for XLA on a CPU): per block, the
    features [x ⊗ x packed, x] in cache, the log-densities as one product with them, the
    statistics as one product of the weights with them; N must be a multiple of `block`."""
    N, D = x.shape
    i, j = np.triu_indices(D)
    double = jnp.asarray(np.where(i == j, 1.0, 2.0), x.dtype)
    xb = x.reshape(-1, block, D)

    def features(rows):
        return jnp.concatenate([rows[:, k:k + 1] * rows[:, k:] for k in range(D)] + [rows], 1)

    def step(carry, _):
        w, mu, cov = carry
        P, Pm, logdet = precision_terms(mu, cov)
        coef = jnp.concatenate([-0.5 * P[:, i, j] * double, Pm], 1)
        const = jnp.log(w) - 0.5 * (jnp.einsum("kd,kd->k", mu, Pm) + logdet
                                    + D * jnp.log(2 * jnp.pi))

        def body(b, acc):
            f = features(lax.dynamic_index_in_dim(xb, b, 0, keepdims=False))
            logp = f @ coef.T + const
            ll = jax.nn.logsumexp(logp, axis=1)
            r = jnp.exp(logp - ll[:, None])
            return acc[0] + r.sum(0), acc[1] + r.T @ f, acc[2] + ll.sum()

        n, s, ll = lax.fori_loop(0, xb.shape[0], body, (
            jnp.zeros(len(w), x.dtype), jnp.zeros((len(w), len(i) + D), x.dtype),
            jnp.zeros((), x.dtype)))
        mu = s[:, len(i):] / n[:, None]
        s2 = jnp.zeros((len(w), D, D), x.dtype).at[:, i, j].set(s[:, :len(i)])
        s2 = (s2 + jnp.swapaxes(s2, 1, 2) - s2 * jnp.eye(D, dtype=x.dtype)) / n[:, None, None]
        return (n / N, mu, s2 - mu[:, :, None] * mu[:, None, :]), ll

    (w, mu, cov), lls = lax.scan(step, (w, mu, cov), None, length=n_iter)
    return w, mu, cov, lls


def ss_em_diag(x, w, mu, var, n_iter):
    def step(carry, _):
        w, mu, var = carry
        prec = 1.0 / var
        logp = (jnp.log(w) - 0.5 * (jnp.log(2 * jnp.pi * var).sum(1) + (mu**2 * prec).sum(1))
                - 0.5 * (x**2) @ prec.T + x @ (mu * prec).T)
        ll = jax.nn.logsumexp(logp, axis=1)
        r = jnp.exp(logp - ll[:, None])
        n = r.sum(0)
        mu = (r.T @ x) / n[:, None]
        var = (r.T @ x**2) / n[:, None] - mu**2
        return (n / x.shape[0], mu, var), ll.sum()

    (w, mu, var), lls = jax.lax.scan(step, (w, mu, var), None, length=n_iter)
    return w, mu, var, lls


def ss_em_tied(x, w, mu, cov, n_iter, block=None):
    """Tied covariance: log-densities −½ xᵀPx + xᵀPμ_k − ½ μ_kᵀPμ_k (one (N, D) × (D, K)
    product and xᵀPx); statistics Σ r, rᵀx, and Σ x xᵀ once (it does not change); `block`: in
    one pass over blocks of rows (N a multiple of it)."""
    N, D = x.shape
    sxx = x.T @ x
    xb = x.reshape(-1, block or N, D)

    def step(carry, _):
        w, mu, cov = carry
        P = jnp.linalg.inv(cov)
        Pm = mu @ P
        const = jnp.log(w) - 0.5 * (jnp.sum(mu * Pm, 1) + jnp.linalg.slogdet(cov)[1]
                                    + D * jnp.log(2 * jnp.pi))

        def body(b, acc):
            rows = lax.dynamic_index_in_dim(xb, b, 0, keepdims=False)
            logp = rows @ Pm.T - 0.5 * jnp.sum((rows @ P) * rows, 1, keepdims=True) + const
            ll = jax.nn.logsumexp(logp, axis=1)
            r = jnp.exp(logp - ll[:, None])
            return acc[0] + r.sum(0), acc[1] + r.T @ rows, acc[2] + ll.sum()

        n, sx, ll = lax.fori_loop(0, xb.shape[0], body, (
            jnp.zeros(len(w), x.dtype), jnp.zeros((len(w), D), x.dtype), jnp.zeros((), x.dtype)))
        mu = sx / n[:, None]
        return (n / N, mu, (sxx - (mu * n[:, None]).T @ mu) / N), ll

    (w, mu, cov), lls = lax.scan(step, (w, mu, cov), None, length=n_iter)
    return w, mu, cov, lls


def ss_em_spherical(x, w, mu, var, n_iter, block=None):
    """Spherical covariances σ_k² I: log-densities from one product with [x, ‖x‖²]; statistics
    rᵀ[x, ‖x‖²]; `block`: in one pass over blocks of rows (N a multiple of it)."""
    N, D = x.shape
    xb = x.reshape(-1, block or N, D)

    def step(carry, _):
        w, mu, var = carry
        coef = jnp.concatenate([mu / var[:, None], -0.5 / var[:, None]], 1)
        const = jnp.log(w) - 0.5 * (jnp.sum(mu**2, 1) / var + D * jnp.log(2 * jnp.pi * var))

        def body(b, acc):
            rows = lax.dynamic_index_in_dim(xb, b, 0, keepdims=False)
            f = jnp.concatenate([rows, jnp.sum(rows**2, 1, keepdims=True)], 1)
            logp = f @ coef.T + const
            ll = jax.nn.logsumexp(logp, axis=1)
            r = jnp.exp(logp - ll[:, None])
            return acc[0] + r.sum(0), acc[1] + r.T @ f, acc[2] + ll.sum()

        n, sf, ll = lax.fori_loop(0, xb.shape[0], body, (
            jnp.zeros(len(w), x.dtype), jnp.zeros((len(w), D + 1), x.dtype),
            jnp.zeros((), x.dtype)))
        mu = sf[:, :D] / n[:, None]
        return (n / N, mu, (sf[:, D] / n - jnp.sum(mu**2, 1)) / D), ll

    (w, mu, var), lls = lax.scan(step, (w, mu, var), None, length=n_iter)
    return w, mu, var, lls


# seconds XLA spends compiling (JAX's monitoring event; tracing is not counted: its events nest)
COMPILE_SECONDS = [0.0]


def _on_event(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILE_SECONDS[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def bench(N, D, K, cov_type, n_iter, repeats):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(K, D)) * 4
    z = rng.integers(K, size=N)
    x = (centres[z] + rng.normal(size=(N, D))).astype(DTYPE)
    w0 = np.ones(K) / K
    m0 = x[rng.choice(N, K, replace=False)].astype(np.float64)
    c0 = np.broadcast_to(np.eye(D) * 2.0, (K, D, D)).copy()
    row = {"N": N, "D": D, "K": K, "cov": cov_type}

    # scikit-learn
    if ARGS.no_sklearn:
        row["sklearn"] = row["ll_sklearn"] = float("nan")
    else:
        sklearn_fit(row, x, K, cov_type, n_iter, w0, m0, c0)
    return bench_jax(row, x, K, cov_type, n_iter, repeats, w0, m0, c0)


def sklearn_fit(row, x, K, cov_type, n_iter, w0, m0, c0):
    N, D = x.shape
    gm = GaussianMixture(K, covariance_type=cov_type, reg_covar=0.0, tol=0.0, max_iter=n_iter,
                         weights_init=w0, means_init=m0,
                         precisions_init={"full": np.linalg.inv(c0),
                                          "tied": np.linalg.inv(c0[0]),
                                          "diag": 0.5 * np.ones((K, D)),
                                          "spherical": 0.5 * np.ones(K)}[cov_type])
    xs = np.asarray(x, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_sk, _ = timed(lambda: gm.fit(xs), 1)
    row["sklearn"] = 1e3 * t_sk / n_iter
    row["ll_sklearn"] = gm.score(xs) * N


def bench_jax(row, x, K, cov_type, n_iter, repeats, w0, m0, c0):
    D = x.shape[1]
    # hand-written sufficient-statistics JAX EM
    xj = jnp.asarray(x)
    spread0 = {"full": c0, "tied": c0[0], "diag": 2.0 * np.ones((K, D)),
               "spherical": 2.0 * np.ones(K)}[cov_type]
    hand = {"full": ss_em_full, "tied": ss_em_tied, "diag": ss_em_diag,
            "spherical": ss_em_spherical}[cov_type]
    ref = jax.jit(hand, static_argnums=4)
    args = (xj, jnp.asarray(w0, DTYPE), jnp.asarray(m0, DTYPE), jnp.asarray(spread0, DTYPE),
            n_iter)
    t0 = time.perf_counter()
    jax.block_until_ready(ref(*args))
    row["compile_ref"] = time.perf_counter() - t0
    t_ref, _ = timed(lambda: ref(*args), repeats)
    row["ref"] = 1e3 * t_ref / n_iter
    row["blocked"] = float("nan")
    # the one-pass, blocked hand-written EM
    blocked = {"full": (ss_em_full_blocked, 8000), "tied": (ss_em_tied, 10000),
               "spherical": (ss_em_spherical, 10000)}.get(cov_type)
    if blocked and x.shape[0] % blocked[1] == 0:
        fn = jax.jit(functools.partial(blocked[0], block=blocked[1]), static_argnums=4)
        jax.block_until_ready(fn(*args))
        t_blocked, out = timed(lambda: fn(*args), repeats)
        row["blocked"] = 1e3 * t_blocked / n_iter

    # bayes_em: the same model as a NumPyro program
    model = {"full": gmm_full, "tied": gmm_tied, "diag": gmm_diag,
             "spherical": gmm_spherical}[cov_type]
    init = dict(w=w0, loc=m0, **({"cov": spread0} if cov_type in ("full", "tied")
                                 else {"scale": np.sqrt(spread0)}))
    init = {k: jnp.asarray(v, DTYPE) for k, v in init.items()}
    em = EM(model, max_iter=n_iter, tol=0.0, init_values=init, progress_bar=False)
    t0, c0 = time.perf_counter(), COMPILE_SECONDS[0]
    result = em.run(jax.random.PRNGKey(0), xj, K=K)
    row["first_run"] = time.perf_counter() - t0
    row["xla"] = COMPILE_SECONDS[0] - c0
    t_run, result = timed(lambda: em.run(jax.random.PRNGKey(0), xj, K=K), repeats)
    row["paths"] = sorted(set(result.mstep_paths.values()))
    # per iteration: warm whole runs of n_iter and of 1 iteration, the difference per iteration
    em1 = EM(model, max_iter=1, tol=0.0, init_values=init, progress_bar=False)
    em1.run(jax.random.PRNGKey(0), xj, K=K)
    t_one, _ = timed(lambda: em1.run(jax.random.PRNGKey(0), xj, K=K), repeats)
    row["bayes_em"] = 1e3 * (t_run - t_one) / (n_iter - 1)
    row["overhead"] = t_one
    row["compile"] = row["first_run"] - t_run
    row["ll_bayes_em"] = result.log_likelihood
    return row


def main():
    sizes = [int(float(s)) for s in ARGS.sizes.split(",")] if ARGS.sizes else (
        [10_000] if ARGS.quick else [10_000, 100_000, 1_000_000])
    dims = [int(d) for d in ARGS.dims.split(",")]
    ks = [int(k) for k in ARGS.ks.split(",")]
    print(f"# GMM EM, {'float32' if ARGS.f32 else 'float64'}, {ARGS.iters} iterations, "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print("| N | D | K | cov | sklearn ms/it | hand JAX ms/it | hand blocked ms/it | bayes_em ms/it"
          " | bayes_em / sklearn | bayes_em / hand | bayes_em / hand blocked"
          " | compile s (ours / hand) | of which XLA compile s | warm 1-iteration run s"
          " | Δ loglik vs sklearn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for N in sizes:
        for D in dims:
            for K in ks:
                for cov in ARGS.cov.split(","):
                    r = bench(N, D, K, cov, ARGS.iters, ARGS.repeats)
                    print(f"| {N:.0e} | {D} | {K} | {cov} | {r['sklearn']:.1f} | {r['ref']:.1f} | "
                          f"{r['blocked']:.1f} | "
                          f"{r['bayes_em']:.1f} | {r['bayes_em'] / r['sklearn']:.2f} | "
                          f"{r['bayes_em'] / r['ref']:.2f} | {r['bayes_em'] / r['blocked']:.2f} | "
                          f"{r['compile']:.1f} / {r['compile_ref']:.1f} | {r['xla']:.1f} | "
                          f"{r['overhead']:.2f} | {r['ll_bayes_em'] - r['ll_sklearn']:.2e} |",
                          flush=True)


if __name__ == "__main__":
    main()
