"""NumPyro `scan` bodies evaluated for all time steps at once, under enumeration.

Under parallel enumeration the carry of an HMM's `scan` is not a value but the enumerated
support of the previous state, the same tensor at every step. The T - 1 steps after the first
are then independent given the inputs `xs`, and NumPyro's sequential `lax.scan` can be
replaced by one `vmap` of the body over `xs`. Outputs that do not depend on the step (the
transition distribution `Categorical(trans[z_prev])` of a homogeneous chain) keep a time dim
of size 1 instead of T: the transition log-factor is (1, K, K), not (T, K, K), and its posterior
weight is the two-slice marginal summed over time, which is what the M-step needs.

The rewrite is exact when the body's new carry depends neither on the step's input, its index,
nor the carry it receives (checked on the body's jaxpr); otherwise, and whenever a random key
is threaded through the scan, NumPyro's `lax.scan` runs as usual.
"""

from __future__ import annotations

from contextlib import contextmanager

import jax
import jax.numpy as jnp
from numpyro.primitives import Messenger

from bayes_em._numpyro import NUMPYRO_VERSION
from bayes_em._numpyro import scan_module as _numpyro_scan

__all__ = ["TIME_NAME", "vectorize_scan"]

# infer key of a site evaluated by the vectorised scan: the name of its time dim
TIME_NAME = "_bayes_em_time"

def _depends(jaxpr, seeds):
    """For every output of `jaxpr`: does it depend on one of the input variables `seeds`?
    (An equation's outputs depend on all of its inputs: a conservative answer.)"""
    dep = set(seeds)
    for eqn in jaxpr.eqns:
        if any(type(v).__name__ != "Literal" and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return [type(v).__name__ != "Literal" and v in dep for v in jaxpr.outvars]


def _sequential(body, init, xs, length=None, reverse=False, unroll=1):
    """`lax.scan` with the stacked trace in the order the steps run.

    With `reverse=True` `lax.scan` aligns its outputs with `xs`, so the time-stacked
    factors of NumPyro's enumerated trace come last step first, and the contraction over time
    (which takes index t as step t) chains them backwards: a wrong log-likelihood (numpyro
    0.22). Flipped here, the chain is in step order; the body's own outputs stay aligned with
    `xs`.
    """
    carry, (trace, ys) = jax.lax.scan(body, init, xs, length, reverse, unroll)
    if reverse:
        trace = jax.tree.map(lambda a: a[::-1], trace)
    return carry, (trace, ys)


def _scan_all_at_once(body, init, xs, length=None, reverse=False, unroll=1):
    """`lax.scan(body, init, xs, length, reverse)` for NumPyro's enumerated scan body, as one
    `vmap` over the steps when the carry is the same at every step (see the module doc); the
    stacked trace is in step order, as in `_sequential`."""
    i0, key, carry = init
    x_leaves = jax.tree.leaves(xs)
    if key is not None or not x_leaves or length is None or length < 1:
        return _sequential(body, init, xs, length, reverse, unroll)
    i0 = jnp.asarray(i0)
    x0 = jax.tree.map(lambda a: a[0], xs)

    trees = []

    def step(i, x, c):
        """The body's (new carry, trace, ys) as one flat list of leaves (metadata set aside)."""
        (_, _, new_carry), (trace, ys) = body((i, key, c), x)
        out = (new_carry, trace, ys)
        trees.append(tuple(jax.tree.structure(o) for o in out))
        return [leaf for o in out for leaf in jax.tree.leaves(o)]

    closed = jax.make_jaxpr(step)(i0, x0, carry)
    n_x = len(x_leaves)
    invars = closed.jaxpr.invars
    on_step = _depends(closed.jaxpr, invars[: 1 + n_x])
    on_carry = _depends(closed.jaxpr, invars[1 + n_x:])
    n_new, n_trace = (trees[-1][0].num_leaves, trees[-1][1].num_leaves)
    if any(on_step[:n_new]) or any(on_carry[:n_new]):
        return _sequential(body, init, xs, length, reverse, unroll)
    # trace leaves that do not vary over steps stay unbatched (size-1 time dim); the body's own
    # outputs ys are returned at full length, as the user expects
    axes = ([None] * n_new + [0 if d else None for d in on_step[n_new: n_new + n_trace]]
            + [0] * (len(on_step) - n_new - n_trace))

    def flat_step(i, x):
        return step(i, x, carry)

    steps = i0 + jnp.arange(length, dtype=i0.dtype)
    if reverse:
        xs = jax.tree.map(lambda a: a[::-1], xs)
    leaves = jax.vmap(flat_step, in_axes=(0, 0), out_axes=axes)(steps, xs)
    leaves = [a if ax is not None else a[None] for a, ax in zip(leaves, axes)]
    if reverse:  # the body's outputs aligned with xs again; the trace stays in step order
        n_ys = n_new + n_trace
        leaves = leaves[:n_ys] + [a[::-1] for a in leaves[n_ys:]]
    new_tree, trace_tree, ys_tree = trees[-1]
    new_carry = jax.tree.unflatten(new_tree, [a[0] for a in leaves[:n_new]])
    trace = jax.tree.unflatten(trace_tree, leaves[n_new: n_new + n_trace])
    # NumPyro names the time dim after the body's first sample site; a size-1 time dim gets no
    # name in the packed trace, so the name is kept here for ``enumeration.log_factors``
    samples = [n for n, site in trace.trace.items() if site["type"] == "sample"]
    for name in samples:
        trace.trace[name]["infer"][TIME_NAME] = "_time_" + samples[0]
    ys = jax.tree.unflatten(ys_tree, leaves[n_new + n_trace:])
    return (i0 + length, key, new_carry), (trace, ys)


class _Lax:
    """`jax.lax` as NumPyro's scan module sees it while `vectorize_scan` is active."""

    def __init__(self, scan):
        self.scan = scan

    def __getattr__(self, name):
        return getattr(jax.lax, name)


@contextmanager
def _scan_by(scan):
    saved = _numpyro_scan.lax
    _numpyro_scan.lax = _Lax(scan)
    try:
        yield
    finally:
        _numpyro_scan.lax = saved


class PatchNotInEffect(RuntimeError):
    """NumPyro's enumerated scan ran without calling the `lax.scan` bayes_em put in place."""


def _checked(wrapped, scan, args, kwargs):
    """Run NumPyro's `scan_wrapper` with `scan` as its `lax.scan`, and check that it was
    used: NumPyro unrolls the first 2·history − 1 steps and calls `lax.scan` for the rest. If a
    NumPyro version calls `jax.lax.scan` directly, the patch would do nothing, silently, and
    both the speed-up and the `reverse=True` fix would vanish: raise instead."""
    calls = []

    def recorded(*a, **k):
        calls.append(True)
        return scan(*a, **k)

    with _scan_by(recorded):
        out = wrapped(*args, **kwargs)
    _f, _init, xs, length, *_ = args + (None,) * 5
    if length is None:
        leaves = jax.tree.leaves(xs)
        length = jnp.shape(leaves[0])[0] if leaves else 0
    history = kwargs.get("history", 1)
    if not calls and int(length) > min(2 * history - 1, int(length)):
        raise PatchNotInEffect(
            f"NumPyro {NUMPYRO_VERSION}'s enumerated scan did not call lax.scan through "
            "numpyro.contrib.control_flow.scan.lax, which bayes_em replaces to evaluate the steps "
            "of a chain at once and to order a reverse=True scan's steps. Without it HMM fits "
            "would be slow and reverse scans wrong: use numpyro==0.22.0, or report this."
        )
    return out


class vectorize_scan(Messenger):
    """Evaluate the enumerated `scan` bodies of a model all steps at once (module doc); with
    `vectorized=False` step by step. Either way a `reverse=True` scan's trace is put in step
    order (see `_sequential`); NumPyro's use of the patch is checked at every scan."""

    def __init__(self, fn=None, vectorized=True):
        self.vectorized = vectorized
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "control_flow" and msg["fn"] is _numpyro_scan.scan_wrapper:
            wrapped = msg["fn"]
            scan = _scan_all_at_once if self.vectorized else _sequential

            def fn(*args, **kwargs):
                if not kwargs.get("enum", False):
                    return wrapped(*args, **kwargs)
                return _checked(wrapped, scan, args, kwargs)

            msg["fn"] = fn
