"""Wall time of whole small fits, compile included, in this (fresh) process after imports:
the three-coin model, and a 1-D two-component mixture of 300 points against scikit-learn.

    python benchmarks/small.py
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from bayes_em import EM  # noqa: E402


def three_coins(y):
    pi = numpyro.param("pi", 0.4, constraint=constraints.unit_interval)
    p = numpyro.param("p", 0.6, constraint=constraints.unit_interval)
    q = numpyro.param("q", 0.7, constraint=constraints.unit_interval)
    with numpyro.plate("tosses", y.shape[0]):
        a = numpyro.sample("a", dist.Bernoulli(pi))
        numpyro.sample("y", dist.Bernoulli(jnp.where(a == 1, p, q)), obs=y)


def mixture(x):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    scale = numpyro.param("scale", jnp.array([1.0, 1.0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def clock(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def main():
    y = jnp.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=jnp.float64)
    em = EM(three_coins, tol=1e-8, progress_bar=False)
    t_first, r = clock(lambda: em.run(jax.random.PRNGKey(0), y))
    t_again, _ = clock(lambda: em.run(jax.random.PRNGKey(0), y))

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, 180), rng.normal(1.5, 0.7, 120)])
    em2 = EM(mixture, tol=1e-8, progress_bar=False)
    t_mix, r2 = clock(lambda: em2.run(jax.random.PRNGKey(0), jnp.asarray(x)))
    t_mix2, _ = clock(lambda: em2.run(jax.random.PRNGKey(0), jnp.asarray(x)))
    gm = GaussianMixture(2, tol=1e-8 * 300, max_iter=1000, reg_covar=0.0, weights_init=[0.5, 0.5],
                         means_init=[[-1.0], [1.0]], precisions_init=[[[1.0]], [[1.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_sk, _ = clock(lambda: gm.fit(x[:, None]))
    print(f"# Whole fits, compile included (jax {jax.__version__}, {os.cpu_count()} cores)\n")
    print("| fit | bayes_em first run s | bayes_em second run s | scikit-learn s | "
          "iterations (ours / sklearn) |")
    print("|---|---|---|---|---|")
    print(f"| three coins | {t_first:.2f} | {t_again:.3f} | – | {r.n_iter} / – |")
    print(f"| 1-D mixture, 300 points | {t_mix:.2f} | {t_mix2:.3f} | {t_sk:.4f} | "
          f"{r2.n_iter} / {gm.n_iter_} |")


if __name__ == "__main__":
    main()
