"""The progress bar of a fit, fed from inside the compiled program by a host callback.

NumPyro's conventions: "Compiling.." until the first iteration reports, then the restart being
fitted ("EM restart 2/4"), its iteration, its objective and the best objective so far; a restart
that stops early jumps to its end; the bar closes at 100% with the best restart's status.
"""

from __future__ import annotations

import math

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over `restarts × max_iter` iterations."""

    def __init__(self, restarts: int, max_iter: int, **tqdm_kwargs):
        from tqdm.auto import tqdm

        self.restarts, self.max_iter = restarts, max_iter
        self.best = -math.inf
        self.bar = tqdm(total=restarts * max_iter, desc="Compiling..", unit="it", **tqdm_kwargs)

    def show(self, restart, n_iter, objective, stopped):
        """Host side of the compiled loop's report (every ~1% of max_iter, and at a stop)."""
        r, n, value = int(restart), int(n_iter), float(objective)
        done = (r + 1) * self.max_iter if bool(stopped) else r * self.max_iter + n
        self.bar.set_description(f"EM restart {r + 1}/{self.restarts}", refresh=False)
        if math.isfinite(value):
            self.best = max(self.best, value)
        self.bar.set_postfix(iter=n, objective=f"{value:.6g}", best=f"{self.best:.6g}",
                             refresh=False)
        self.bar.update(max(done - self.bar.n, 0))

    def close(self, result=None):
        """Fill the bar to 100% and say how the fit ended (`result=None`: it failed)."""
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.set_description("EM", refresh=False)
        if result is not None:
            self.bar.set_postfix(best=f"{result.objective:.6g}",
                                 status=f"{result.status} at {result.n_iter}", refresh=False)
        self.bar.close()
