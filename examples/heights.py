"""Mitchell's heights (Machine Learning, 1997, section 6.12): the heights of a class of students
are a mixture of two normal distributions, one per sex, and nobody wrote down who is who.

EM fits the two-component mixture (bayes_em.models.gmm on 1-D data; as in Mitchell, both components
share one standard deviation: covariance="tied") and gives each student's probability of being
male or female.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bayes_em import EM, models


def simulate(seed=0, n_male=18, n_female=22):
    rng = np.random.default_rng(seed)
    male = rng.normal(178.0, 6.0, n_male)
    female = rng.normal(163.0, 6.0, n_female)
    heights = np.round(np.concatenate([male, female]), 1)
    sex = np.array(["male"] * n_male + ["female"] * n_female)
    order = rng.permutation(len(heights))  # the class register is not sorted by sex
    return heights[order], sex[order]


def main():
    heights, sex = simulate()
    x = jnp.asarray(heights)[:, None]  # (N, 1): one coordinate
    result = EM(models.gmm, restarts=4, tol=1e-10, progress_bar=False).run(
        jax.random.PRNGKey(0), x, K=2, covariance="tied"
    )
    loc = np.asarray(result.params["loc"][:, 0])
    sd = np.sqrt(np.asarray(result.params["cov"][0, 0])) * np.ones(2)  # shared
    w = np.asarray(result.params["weights"])
    male, female = int(np.argmax(loc)), int(np.argmin(loc))  # the taller component is "male"
    print(f"{len(heights)} students; EM: {result.n_iter} iterations, {result.status}, "
          f"log-likelihood {result.log_likelihood:.3f}")
    for name, k in (("male", male), ("female", female)):
        print(f"  {name:6s}  share {w[k]:.3f}   mean {loc[k]:6.2f} cm   sd {sd[k]:5.2f} cm")
    p = np.asarray(result.posterior["z"])
    print("\n  height   P(male)  P(female)   (simulated as)")
    for h, pm, pf, s in sorted(zip(heights, p[:, male], p[:, female], sex)):
        print(f"  {h:6.1f}   {pm:7.3f}  {pf:9.3f}   {s}")
    guessed = np.where(p[:, male] > 0.5, "male", "female")
    print(f"\nclassified as simulated: {np.mean(guessed == sex):.0%} of the students")


if __name__ == "__main__":
    main()
