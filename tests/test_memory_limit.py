"""The memory estimate counts what the fit builds (issue 15): a soft fit evaluates a homogeneous
chain's transition factor once (the vectorised scan), not once per step; hard EM builds it per
step. A default EM once refused every K = 16 HMM with T ≥ 3e5 in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from bayes_em import EM

jax.config.update("jax_enable_x64", True)
K, V, T = 16, 4, 20_000


def hmm(ys):
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", (jnp.ones((K, K)) + jnp.eye(K)) / (K + 1),
                          constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.ones((K, V)) / V + jnp.linspace(-0.1, 0.1, K)[:, None]
                         * jnp.linspace(-1, 1, V) / V, constraint=constraints.simplex)

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    z0 = numpyro.sample("z0", dist.Categorical(init))
    scan(step, z0, ys)


def test_soft_hmm_estimate_counts_the_transition_once():
    ys = jnp.asarray(np.random.default_rng(0).integers(0, V, T))
    per_step = 4 * T * K * K * 8  # the T×K×K factor in float64, four copies: 164 MB
    limit = per_step / 4  # 41 MB: over the emissions' T×K, under the per-step transitions
    result = EM(hmm, max_iter=2, tol=0.0, memory_limit=limit, progress_bar=False).run(
        jax.random.PRNGKey(0), ys)
    assert np.isfinite(result.objective)
    with pytest.raises(MemoryError, match="'z'"):  # hard EM does build T×K×K
        EM(hmm, hard=True, max_iter=2, memory_limit=limit, progress_bar=False).run(
            jax.random.PRNGKey(0), ys)
