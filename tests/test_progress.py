"""The progress bar (issue 16): "Compiling.." first, the restart index while fitting, and 100% at
the end with the best restart's status, even when every restart converges early."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from bayes_em import EM, models


def test_progress_bar_labels_and_closes_at_100(capfd, monkeypatch):
    from bayes_em import api, progress

    class Unthrottled(progress.Progress):  # every update printed (tqdm skips those < 0.1 s apart)
        def __init__(self, restarts, max_iter):
            super().__init__(restarts, max_iter, mininterval=0, miniters=1)

    monkeypatch.setattr(api, "Progress", Unthrottled)
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-3, 1, (100, 1)), rng.normal(3, 1, (100, 1))]))
    result = EM(models.gmm, restarts=3, max_iter=500, progress_bar=True).run(
        jax.random.PRNGKey(0), x, K=2)
    err = capfd.readouterr().err
    frames = re.split(r"[\r\n]", err)
    assert any(f.startswith("Compiling..") for f in frames)
    assert any("EM restart 3/3" in f for f in frames)
    last = [f for f in frames if f.strip()][-1]
    assert "100%" in last and f"{1500}/{1500}" in last, last
    assert f"status={result.status} at {result.n_iter}" in last
    assert result.n_iter < 500  # converged early, and the bar still ends at 100%
