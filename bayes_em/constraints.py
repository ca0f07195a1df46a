"""Constraints with a floor, for maximum likelihood that cannot collapse.

`positive_definite_floor(c)`: symmetric matrices whose every eigenvalue is at least `c` (a
closed set). For a Gaussian covariance the constrained maximiser of the weighted likelihood
−n/2 (log|Σ| + tr(Σ⁻¹ S)) is S's eigenvectors with eigenvalues max(λ_i, c), so the closed-form
M-step stays exact (an ECM step) and the likelihood stays bounded. The scalar analogue, a scale
σ ≥ c, is NumPyro's `constraints.greater_than_eq(c)`, with the update max(σ̂, c).
"""

from __future__ import annotations

import jax.numpy as jnp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import (
    CholeskyTransform,
    ComposeTransform,
    LowerCholeskyTransform,
    Transform,
    biject_to,
)

__all__ = ["positive_definite_floor", "floor_of", "clip_eigenvalues"]


class _PositiveDefiniteFloor(constraints.Constraint):
    event_dim = 2

    def __init__(self, floor: float):
        self.floor = float(floor)  # static: never a traced value

    def __call__(self, x):
        symmetric = jnp.all(jnp.isclose(x, jnp.swapaxes(x, -2, -1)), axis=(-2, -1))
        # a relative tolerance: the closed-form update puts eigenvalues exactly at the floor
        low = jnp.linalg.eigvalsh(x)[..., 0]
        return symmetric & (low >= self.floor * (1 - 1e-6))

    def __repr__(self):
        return f"PositiveDefiniteFloor(floor={self.floor})"

    def feasible_like(self, prototype):
        return jnp.broadcast_to((1.0 + self.floor) * jnp.eye(prototype.shape[-1]), prototype.shape)

    def tree_flatten(self):
        return (), ((), {"floor": self.floor})

    def eq(self, other, static=False):
        return isinstance(other, _PositiveDefiniteFloor) and other.floor == self.floor


positive_definite_floor = _PositiveDefiniteFloor


class _AddDiagonal(Transform):
    """Σ ↦ Σ + c·I (positive definite onto the matrices with eigenvalues above c)."""

    domain = constraints.positive_definite

    def __init__(self, floor: float):
        self.floor = float(floor)

    @property
    def codomain(self):
        return _PositiveDefiniteFloor(self.floor)

    def __call__(self, x):
        return x + self.floor * jnp.eye(x.shape[-1], dtype=x.dtype)

    def _inverse(self, y):
        return y - self.floor * jnp.eye(y.shape[-1], dtype=y.dtype)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        return jnp.zeros(jnp.shape(x)[:-2], jnp.result_type(x))

    def tree_flatten(self):
        return (), ((), {"floor": self.floor})

    def eq(self, other):
        return isinstance(other, _AddDiagonal) and other.floor == self.floor


@biject_to.register(_PositiveDefiniteFloor)
def _transform_to_positive_definite_floor(constraint):
    return ComposeTransform([LowerCholeskyTransform(), CholeskyTransform().inv,
                             _AddDiagonal(constraint.floor)])


def floor_of(constraint) -> float | None:
    """The static lower bound a closed-form scale / covariance update must respect: 0.0 for
    `positive` / `positive_definite`, `c` for `greater_than(_eq)(c)` (c ≥ 0, a number) and
    `positive_definite_floor(c)`; None for any other constraint."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    if isinstance(constraint, _PositiveDefiniteFloor):
        return constraint.floor
    if constraint is constraints.positive_definite:
        return 0.0
    if isinstance(constraint, constraints._GreaterThan):
        try:
            bound = float(constraint.lower_bound)
        except TypeError:  # an array or traced bound: not a static floor
            return None
        return bound if bound >= 0 else None
    return None


def clip_eigenvalues(cov, floor):
    """The nearest-in-likelihood covariance with eigenvalues ≥ `floor`: V max(Λ, floor) Vᵀ."""
    lam, vec = jnp.linalg.eigh(cov)
    clipped = (vec * jnp.maximum(lam, floor)[..., None, :]) @ jnp.swapaxes(vec, -1, -2)
    return 0.5 * (clipped + jnp.swapaxes(clipped, -1, -2))
