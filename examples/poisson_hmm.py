"""A Poisson hidden Markov model for the annual counts of major earthquakes, fitted by EM.

The data: the number of earthquakes of magnitude 7 or more in the world in each year from 1900
to 2006 (107 values), the series of Zucchini, MacDonald & Langrock, *Hidden Markov Models for
Time Series: An Introduction Using R* (2nd ed., CRC Press 2016), Table 1.1, compiled from the
U.S. Geological Survey's earthquake catalogue. The same series ships with hmmlearn's and dynamax's
Poisson-HMM examples; no small installable package ships it as data, so it is written out here.

The model is an ordinary NumPyro program: the hidden state of each year is a discrete latent in a
``scan``; EM sums it out exactly (forward-backward), which makes this Baum-Welch. With three
states the fit reproduces the book's three-state model with an estimated initial distribution
(rates 13.13, 19.71 and 29.71 a year, log-likelihood -328.527); hmmlearn's ``PoissonHMM`` from
the same start reaches the same values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from bayes_em import EM

jax.config.update("jax_enable_x64", True)  # float64: converge to the book's digits

YEARS = np.arange(1900, 2007)
EARTHQUAKES = np.array([
    13, 14, 8, 10, 16, 26, 32, 27, 18, 32, 36, 24, 22, 23, 22, 18, 25, 21, 21, 14,  # 1900-1919
    8, 11, 14, 23, 18, 17, 19, 20, 22, 19, 13, 26, 13, 14, 22, 24, 21, 22, 26, 21,  # 1920-1939
    23, 24, 27, 41, 31, 27, 35, 26, 28, 36, 39, 21, 17, 22, 17, 19, 15, 34, 10, 15,  # 1940-1959
    22, 18, 15, 20, 15, 22, 19, 16, 30, 27, 29, 23, 20, 16, 21, 21, 25, 16, 18, 15,  # 1960-1979
    18, 14, 10, 15, 8, 15, 6, 11, 8, 7, 18, 16, 13, 12, 13, 20, 15, 16, 12, 18,  # 1980-1999
    15, 16, 13, 15, 16, 11, 11,  # 2000-2006
])


def poisson_hmm(counts, K):
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", 0.8 * jnp.eye(K) + 0.2 / K, constraint=constraints.simplex)
    rates = numpyro.param("rates", jnp.linspace(10.0, 30.0, K), constraint=constraints.positive)

    z0 = numpyro.sample("z0", dist.Categorical(init))  # the state of 1900 ...
    numpyro.sample("y0", dist.Poisson(rates[z0]), obs=counts[0])  # ... emits the 1900 count

    def year(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Poisson(rates[z]), obs=y)
        return z, None

    scan(year, z0, counts[1:])


def main():
    counts = jnp.asarray(EARTHQUAKES, dtype=float)
    assert counts.shape == (107,)
    K = 3
    result = EM(poisson_hmm, max_iter=1000, tol=1e-9, progress_bar=False).run(
        jax.random.PRNGKey(0), counts, K=K
    )
    order = np.argsort(np.asarray(result.params["rates"]))  # states from calm to active
    rates = np.asarray(result.params["rates"])[order]
    trans = np.asarray(result.params["trans"])[np.ix_(order, order)]
    print(f"{K}-state Poisson HMM, {result.status} after {result.n_iter} EM iterations")
    print(f"log-likelihood: {result.log_likelihood:.3f}")
    print("rates (earthquakes per year):", "  ".join(f"{r:6.2f}" for r in rates))
    print("transition matrix (rows: from, columns: to):")
    for row in trans:
        print("   " + "  ".join(f"{p:6.3f}" for p in row))

    path = np.concatenate([[int(result.most_probable["z0"])],
                           np.asarray(result.most_probable["z"])])
    rank = np.argsort(order)[path]  # decoded state of each year, 0 = calmest
    print("most probable states (Viterbi), one digit per year, 0 = calmest:")
    for start in range(0, len(YEARS), 20):
        digits = "".join(str(s) for s in rank[start:start + 20])
        print(f"   {YEARS[start]}-{YEARS[min(start + 19, len(YEARS) - 1)]}  {digits}")
    posterior = np.concatenate([np.asarray(result.posterior["z0"])[None],
                                np.asarray(result.posterior["z"])])[:, order]
    print(f"P(most active state | data) in 1943: {posterior[1943 - 1900, -1]:.3f}, "
          f"in 2006: {posterior[-1, -1]:.3f}")


if __name__ == "__main__":
    main()
