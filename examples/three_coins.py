"""Three coins (Li Hang, Statistical Learning Methods, Example 9.1) fitted by EM.

Coin A (heads probability pi) picks coin B (p) on heads or coin C (q) on tails; only the second
toss is seen. From pi = p = q = 0.5 EM stops at pi = 0.5, p = q = 0.6; other starts stop elsewhere
with the same likelihood, since only pi*p + (1-pi)*q = 0.6 is identified.
"""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em import EM


def three_coins(y):
    pi = numpyro.param("pi", 0.5, constraint=constraints.unit_interval)
    p = numpyro.param("p", 0.5, constraint=constraints.unit_interval)
    q = numpyro.param("q", 0.5, constraint=constraints.unit_interval)
    with numpyro.plate("tosses", y.shape[0]):
        a = numpyro.sample("a", dist.Bernoulli(pi))  # which coin: latent
        numpyro.sample("y", dist.Bernoulli(jnp.where(a == 1, p, q)), obs=y)


def main():
    y = jnp.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], dtype=jnp.float32)
    for start in [dict(pi=0.5, p=0.5, q=0.5), dict(pi=0.4, p=0.6, q=0.7)]:
        result = EM(three_coins, init_values=start, tol=1e-6, progress_bar=False).run(
            jax.random.PRNGKey(0), y
        )
        fitted = ", ".join(f"{k}={float(v):.4f}" for k, v in result.params.items())
        print(f"start {start}")
        print(f"  -> {fitted}   log p(y) = {result.log_likelihood:.6f}   "
              f"({result.n_iter} iterations, {result.status})")
        print(f"  pi*p + (1-pi)*q = "
              f"{float(result.params['pi'] * result.params['p'] + (1 - result.params['pi']) * result.params['q']):.4f}")  # noqa: E501


if __name__ == "__main__":
    main()
