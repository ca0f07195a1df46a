"""The memory estimate counts what the fit builds (issue 15): a soft fit evaluates a homogeneous
chain's transition factor once (the vectorised scan), not once per step; hard EM builds it per
step. A default EM once refused every K = 16 HMM with T ≥ 3e5 in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_models import categorical_hmm

from bayes_em import EM

jax.config.update("jax_enable_x64", True)
K, V, T = 16, 4, 20_000


def test_soft_hmm_estimate_counts_the_transition_once():
    ys = jnp.asarray(np.random.default_rng(0).integers(0, V, T))
    per_step = 4 * T * K * K * 8  # the T×K×K factor in float64, four copies: 164 MB
    limit = per_step / 4  # 41 MB: over the emissions' T×K, under the per-step transitions
    start = dict(trans=(np.ones((K, K)) + np.eye(K)) / (K + 1),
                 emit=np.random.default_rng(1).dirichlet(np.ones(V), K))
    result = EM(categorical_hmm, init_values=start, max_iter=2, tol=0.0, memory_limit=limit,
                progress_bar=False).run(jax.random.PRNGKey(0), ys, K=K, V=V)
    assert np.isfinite(result.objective)
    with pytest.raises(MemoryError, match="'z'"):  # hard EM does build T×K×K
        EM(categorical_hmm, hard=True, max_iter=2, memory_limit=limit, progress_bar=False).run(
            jax.random.PRNGKey(0), ys, K=K, V=V)


def test_compiled_fit_is_checked_by_xla_memory_analysis():
    """Over the cheap pre-check (the log-factors once), the compiled fit's own memory by XLA's
    analysis is checked before it runs: the error says what dominates and names the sites."""
    from bayes_em import models

    x = np.random.default_rng(0).normal(size=(2000, 2))
    factors = 2 * 2000 * 3 * 8  # 'x' and 'z', N×K in float64: 96 kB, under the limit
    with pytest.raises(MemoryError, match="XLA's memory analysis.*temporaries.*'x'"):
        EM(models.gmm, max_iter=5, memory_limit=2 * factors, progress_bar=False).run(
            jax.random.PRNGKey(0), x, K=3)
