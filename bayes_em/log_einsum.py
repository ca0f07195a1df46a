"""Log-space einsum for funsor's JAX contractions, with a gradient that stays finite at zeros.

funsor contracts two log-factors as `log(einsum(exp(a - max a), exp(b - max b))) + shifts`.
Where a sum underflows to exactly 0 (a configuration no path reaches: a zero transition, a
state one step makes impossible), the reverse pass of `log` divides a zero cotangent by zero,
and the NaN spreads to every weight of the contraction (every posterior marginal of the chain's
first step went NaN this way). Here the derivative of `log` at 0 is taken as 0: the forward
value is unchanged and exact; a zero-probability configuration gets posterior weight 0.

`bayes_em._numpyro.install_log_einsum` makes funsor use this module for
`(logaddexp, add)` contractions of JAX arrays.
"""

import jax
import jax.numpy as jnp
from funsor.einsum.util import Tensordot


@jax.custom_jvp
def log0(x):
    """log x, with derivative 1/x where x > 0 and 0 where x = 0."""
    return jnp.log(x)


@log0.defjvp
def _log0_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    positive = x > 0
    return jnp.log(x), jnp.where(positive, t / jnp.where(positive, x, 1), 0)


def einsum(equation, *operands):
    """log einsum(exp operands): each operand shifted by its max over the contracted dims."""
    inputs, output = equation.split("->")
    if inputs == output:
        return operands[0][...]
    shifts, exps = [], []
    for dims, operand in zip(inputs.split(","), operands):
        shift = jax.lax.stop_gradient(operand)
        contracted = tuple(i for i, d in enumerate(dims) if d not in output)
        if contracted:
            shift = jnp.max(shift, axis=contracted, keepdims=True)
        shift = jnp.maximum(shift, jnp.finfo(shift.dtype).min)  # no -inf - -inf
        exps.append(jnp.exp(operand - shift))
        kept = [d for d in dims if d in output]
        shift = shift.reshape([n for n, d in zip(operand.shape, dims) if d in output])
        # align the shift with the output's dims
        shift = jnp.expand_dims(shift, tuple(range(len(output) - len(kept))))
        order = [d for d in output if d not in kept] + kept
        shifts.append(jnp.transpose(shift, [order.index(d) for d in output]))
    return sum(shifts) + log0(jnp.einsum(equation, *exps))


tensordot = Tensordot(einsum)


def transpose(x, axes):
    return jnp.transpose(x, axes)
