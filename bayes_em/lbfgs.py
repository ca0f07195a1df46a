"""Numeric M-step: maximise Q(θ) + log p(θ) over unconstrained parameters by L-BFGS.

The objective is evaluated at the constrained value with no Jacobian term, so the optimum is the
mode of the model's own density. A partial maximisation is a valid generalised EM step; the
result is only accepted if it does not lower the objective.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax import lax

__all__ = ["LBFGS", "maximize"]


class LBFGS(NamedTuple):
    """Inner solver settings: at most `max_steps` L-BFGS steps per EM iteration, stopping
    early once `‖∇‖ ≤ gtol · max(1, |Q|)` (`gtol=None`: `eps ** 0.6` of the dtype)."""

    max_steps: int = 100
    gtol: float | None = None
    memory_size: int = 10


def maximize(objective, u0, solver: LBFGS = LBFGS()):
    """Approximately maximise `objective(u)` from `u0`; return `(u, n_steps)`.

    Returns `u0` unchanged if the solver's end point is non-finite or lowers the objective.
    """
    dtype = jnp.result_type(*jax.tree.leaves(u0))
    gtol = solver.gtol if solver.gtol is not None else float(jnp.finfo(dtype).eps) ** 0.6

    def loss(u):
        return -objective(u)

    opt = optax.lbfgs(memory_size=solver.memory_size)
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry):
        u, state = carry
        value, grad = value_and_grad(u, state=state)
        updates, state = opt.update(grad, state, u, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(u, updates), state

    def cond(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        value = otu.tree_get(state, "value")
        err = otu.tree_norm(otu.tree_get(state, "grad"))
        small = err <= gtol * jnp.maximum(1.0, jnp.abs(value))
        return (count == 0) | ((count < solver.max_steps) & ~small & jnp.isfinite(value))

    u, state = lax.while_loop(cond, body, (u0, opt.init(u0)))
    f0, f1 = loss(u0), loss(u)
    finite = jnp.isfinite(f1) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(u)])
    )
    accept = finite & (f1 <= f0)
    u = jax.tree.map(lambda new, old: jnp.where(accept, new, old), u, u0)
    return u, otu.tree_get(state, "count")
