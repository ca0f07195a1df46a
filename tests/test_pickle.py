"""EMResult pickles (issue 16): the numbers round-trip; the repr is short."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_em import EM, models


def test_result_pickles_and_has_a_short_repr():
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-3, 1, (50, 2)), rng.normal(3, 1, (50, 2))]))
    result = EM(models.gmm, restarts=2, max_iter=50, progress_bar=False).run(
        jax.random.PRNGKey(0), x, K=2)
    posterior = result.posterior  # computed before pickling: kept
    back = pickle.loads(pickle.dumps(result))
    for k, v in result.params.items():
        np.testing.assert_array_equal(np.asarray(back.params[k]), np.asarray(v))
        assert isinstance(back.params[k], jax.Array)
    np.testing.assert_array_equal(back.history["objective"], result.history["objective"])
    assert back.status == result.status and back.restart_status == result.restart_status
    assert back.objective == result.objective
    assert [p.name for p in back.sites.params] == [p.name for p in result.sites.params]
    np.testing.assert_array_equal(back.posterior["z"], posterior["z"])
    text = repr(result)
    assert len(text) < 300 and "status='converged'" in text and "loc: (2, 2)" in text

    fresh = EM(models.gmm, max_iter=5, tol=0.0, progress_bar=False).run(
        jax.random.PRNGKey(0), x, K=2)
    lean = pickle.loads(pickle.dumps(fresh))  # posterior never computed: it says what to do
    with pytest.raises(ValueError, match="read result.posterior before pickling"):
        lean.posterior
    with pytest.raises(ValueError, match="unpickled"):
        lean.predict_proba(x, K=2)
