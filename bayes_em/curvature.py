"""Is a stopping point a saddle? The extreme curvatures of the objective by Lanczos.

At a local maximum of f(v) = log p(X|θ(v)) + log p(θ(v)) (v unconstrained) every eigenvalue of
the Hessian ∇²f is ≤ 0; a saddle has one > 0: a direction along which EM's fixed point is a
minimum (splitting two identical mixture components, for instance). Lanczos (Golub & Van Loan
§10.1) with full reorthogonalisation finds the extreme eigenvalues from a few Hessian-vector
products, each about the cost of two E-steps, so it is only run where a cheap test (two latent
values with identical posteriors) suggests a symmetric point.
"""

from __future__ import annotations

import numpy as np

__all__ = ["extreme_eigenvalues", "is_saddle"]


def extreme_eigenvalues(hvp, n, steps=40, seed=0):
    """(smallest, largest) eigenvalue estimates of the symmetric n×n operator `hvp`."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(n)
    q /= np.linalg.norm(q)
    basis, alphas, betas = [q], [], []
    for _ in range(min(steps, n)):
        w = np.asarray(hvp(basis[-1]), dtype=float)
        if not np.all(np.isfinite(w)):
            raise FloatingPointError("the Hessian-vector product is not finite")
        alpha = float(w @ basis[-1])
        alphas.append(alpha)
        for b in basis:  # full reorthogonalisation
            w = w - (w @ b) * b
        beta = float(np.linalg.norm(w))
        if beta <= 1e-12 * max(1.0, abs(alpha)) or len(basis) == n:
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    t = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    eig = np.linalg.eigvalsh(t)
    return float(eig[0]), float(eig[-1])


def is_saddle(hvp, n, rtol=1e-6):
    """Whether the Hessian has a positive eigenvalue beyond `rtol` of its largest magnitude
    (flat directions, such as a weight that two identical components share, give ≈ 0)."""
    low, high = extreme_eigenvalues(hvp, n)
    return high > rtol * max(abs(low), abs(high), 1e-300), (low, high)
