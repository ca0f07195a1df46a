"""A 1-D Gaussian mixture fitted by MAP-EM, written as an ordinary NumPyro model.

The weights have a Dirichlet prior and the scales an inverse-gamma prior (MAP: the priors keep a
component from collapsing onto one point); the locations are maximum-likelihood parameters.
"""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from bayes_em import EM


def mixture(x, K):
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))  # MAP: it has a prior
    with numpyro.plate("components", K):
        loc = numpyro.param("loc", jnp.linspace(-1.0, 1.0, K))  # ML: no prior
        scale = numpyro.sample("scale", dist.InverseGamma(2.0, 1.0))  # MAP
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))  # discrete latent, enumerated
        numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def simulate(key, n=600):
    k1, k2 = jax.random.split(key)
    z = jax.random.categorical(k1, jnp.log(jnp.array([0.5, 0.3, 0.2])), shape=(n,))
    loc, scale = jnp.array([-3.0, 2.0, 6.0]), jnp.array([1.0, 0.5, 0.3])
    return loc[z] + scale[z] * jax.random.normal(k2, (n,)), z


def main():
    x, _ = simulate(jax.random.PRNGKey(1))
    em = EM(mixture, restarts=8, max_iter=500, tol=1e-7)
    result = em.run(jax.random.PRNGKey(0), x, K=3)
    order = jnp.argsort(result.params["loc"])
    print(f"status: {result.status} after {result.n_iter} iterations "
          f"(best of {result.n_restarts} restarts: restart {result.best_restart})")
    print(f"log p(x | θ) = {result.log_likelihood:.3f}   log p(θ) = {result.log_prior:.3f}")
    print("component   weight    loc     scale")
    for k in order:
        print(f"{int(k):9d}   {float(result.params['w'][k]):.3f}  "
              f"{float(result.params['loc'][k]):7.3f}"
              f"  {float(result.params['scale'][k]):.3f}")
    print("final objective of every restart:",
          " ".join(f"{float(o):.2f}" for o in result.restart_objective))
    print("responsibilities of the first 3 points:\n", result.posterior["z"][:3].round(3))


if __name__ == "__main__":
    main()
