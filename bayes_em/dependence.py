"""Structural dependence of a function's outputs on its inputs, read from the jaxpr.

For every output array and every input group (a fitted parameter) this answers, for *all*
values of the inputs, not at one point:

- `depends`: the output is computed from the group (any path through the program);
- `selects`: every path from the group to the output moves values without arithmetic
  (gather, broadcast, reshape, slice, concatenate, `select_n` on a predicate that does not
  depend on the group, ...), so each output entry is one entry of the group or a value that
  does not depend on it.

`mu[k]` selects `mu`; `mu[k] + beta * x` selects `mu` but depends on `beta` too (even
when `beta` is 0 now); `2 * mu[k]` and `jnp.maximum(mu[k], 0)` depend on `mu` without
selecting it. Primitives not listed below count as arithmetic (a conservative answer: a closed
form refused, never a wrong one).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Literal

__all__ = ["Dependence", "dependence"]


class Dependence(NamedTuple):
    """Bit sets over the input groups: `depends` ⊇ `selects`."""

    depends: int = 0
    selects: int = 0

    @property
    def other(self) -> int:
        """Groups reached through arithmetic."""
        return self.depends & ~self.selects


NONE = Dependence()


def _join(*deps):
    """Dependence of a value that may come from any of `deps` (a selection stays one only if
    no branch reaches that group by arithmetic)."""
    depends = 0
    other = 0
    for d in deps:
        depends |= d.depends
        other |= d.other
    return Dependence(depends, depends & ~other)


def _arith(*deps):
    depends = 0
    for d in deps:
        depends |= d.depends
    return Dependence(depends, 0)


def _index(data, index):
    """Moving `data` at positions computed from `index`: a group the index reads is
    arithmetic."""
    d = _join(*data)
    idx = _arith(*index)
    return Dependence(d.depends | idx.depends, d.selects & ~idx.depends)


# primitive -> positions of the operands that only choose where values go (the rest are data)
_MOVES = {
    "broadcast_in_dim": (), "reshape": (), "squeeze": (), "expand_dims": (), "transpose": (),
    "rev": (), "slice": (), "copy": (), "copy_p": (), "concatenate": (), "pad": (),
    "sharding_constraint": (), "device_put": (), "optimization_barrier": (),
    "reduce_precision": (),
}
_INDEXED = {"gather": (1,), "dynamic_slice": "rest", "dynamic_update_slice": "rest",
            "scatter": (1,), "select_n": (0,)}


def _eqn_deps(eqn, ins):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if name in _MOVES:
        return [_join(*ins)] * n_out
    if name == "convert_element_type":
        keep = jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact)
        return [_join(*ins) if keep else _arith(*ins)] * n_out
    if name in _INDEXED:
        pos = _INDEXED[name]
        if pos == "rest":
            data_pos = {0, 1} if name == "dynamic_update_slice" else {0}
            pos = tuple(i for i in range(len(ins)) if i not in data_pos)
        data = [d for i, d in enumerate(ins) if i not in pos]
        index = [d for i, d in enumerate(ins) if i in pos]
        return [_index(data, index)] * n_out
    if name in ("scan", "while", "cond"):
        return _control_flow(eqn, ins)
    sub = _subjaxpr(eqn)
    if sub is not None and len(sub.jaxpr.invars) == len(ins) and len(sub.jaxpr.outvars) == n_out:
        return _propagate(sub, ins)
    return [_arith(*ins)] * n_out


def _subjaxpr(eqn):
    """The called jaxpr of a call-like primitive (jit, custom_jvp_call, remat, ...)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr):
            return sub
        if sub is not None and hasattr(sub, "eqns"):
            return ClosedJaxpr(sub, ())
    return None


def _fixpoint(body, consts, carry, xs):
    """Carries of a loop: iterate the body's transfer until the carry dependences settle."""
    for _ in range(64):
        outs = body(consts + carry + xs)
        new = [_join(c, o) for c, o in zip(carry, outs[: len(carry)])]
        if new == carry:
            return outs
        carry = new
    return [_arith(*(consts + carry + xs))] * len(outs)


def _control_flow(eqn, ins):
    p = eqn.params
    n_out = len(eqn.outvars)
    if eqn.primitive.name == "scan":
        nc, ncar = p["num_consts"], p["num_carry"]
        outs = _fixpoint(lambda v: _propagate(p["jaxpr"], v), ins[:nc], ins[nc:nc + ncar],
                         ins[nc + ncar:])
        # carries out: the settled carries; stacked ys: selections per step stay selections
        return outs
    if eqn.primitive.name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
        outs = _fixpoint(lambda v: _propagate(p["body_jaxpr"], v), bconsts, carry, [])
        # the trip count reads the predicate: whatever it depends on reaches every carry
        pred = _propagate(p["cond_jaxpr"], cconsts + [_join(c, o) for c, o in zip(carry, outs)])
        return [_index([o], pred) for o in outs]
    # cond: the index chooses a branch
    branches = [_propagate(b, ins[1:]) for b in p["branches"]]
    return [_index([b[i] for b in branches], [ins[0]]) for i in range(n_out)]


def _propagate(closed: ClosedJaxpr, ins):
    jaxpr = closed.jaxpr
    env = {}
    for v in jaxpr.constvars:
        env[v] = NONE
    for v, d in zip(jaxpr.invars, ins):
        env[v] = d

    def read(v):
        return NONE if isinstance(v, Literal) else env.get(v, NONE)

    for eqn in jaxpr.eqns:
        outs = _eqn_deps(eqn, [read(v) for v in eqn.invars])
        for v, d in zip(eqn.outvars, outs):
            env[v] = d
    return [read(v) for v in jaxpr.outvars]


def dependence(fn, groups: dict, *args, **kwargs):
    """Dependence of each output leaf of `fn(groups, *args, **kwargs)` on each key of
    `groups` (a dict of arrays): a pytree like the output, of
    [`Dependence`][bayes_em.dependence.Dependence] with bit i for the i-th key (in the order of
    `groups`). Traces `fn` once (nothing runs)."""
    names = list(groups)
    closed, out_shape = jax.make_jaxpr(
        lambda g: fn(g, *args, **kwargs), return_shape=True
    )({k: groups[k] for k in names})
    leaves = jax.tree_util.tree_flatten_with_path({k: groups[k] for k in names})[0]
    bits = [1 << names.index(path[0].key) for path, _ in leaves]
    outs = _propagate(closed, [Dependence(b, b) for b in bits])
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
