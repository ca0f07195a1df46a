"""The contraction of log-factors: log Z by sum-product (or max-product) over enumerated, plate
and Markov dims, pure array algebra over [`bayes_em.factors.Factors`][bayes_em.factors.Factors].

Plates with per-element weights are reduced after their local latents are summed out; a Markov
chain (`scan`) is summed by a forward recursion (O(T·K²), one `lax.scan`) where its structure
allows, else by funsor's contraction (parallel-in-time with `parallel_time`).
`tests/test_enumeration.py` and `tests/test_vectorized_scan.py` check it against brute force.
"""

from __future__ import annotations

import functools
from collections import OrderedDict, defaultdict
from functools import reduce
from typing import NamedTuple

import funsor
import jax
import jax.numpy as jnp
from jax import Array

from bayes_em import _numpyro as npi
from bayes_em._numpyro import UNITS, compute_markov_factors, partition
from bayes_em.compiled import classic_emitters
from bayes_em.factors import Factors, time_sizes
from bayes_em.forward import forward_scan
from bayes_em.viterbi import max_first, viterbi_scan

__all__ = ["log_partition", "pointwise_log_likelihood"]


def _weighted_sum_product(sum_op, prod_op, factors, eliminate, plates, plate_weights):
    """funsor's `sum_product` with per-element plate weights: a factor is multiplied
    by `w_p` (in log space: raised to the power w_p) just before plate `p` is reduced, i.e.
    after the latents local to `p` are summed out; element n then counts w_n times."""
    plates = plates & eliminate
    sum_vars = eliminate - plates
    var_to_ordinal, ordinal_to_factors = {}, defaultdict(list)
    for f in factors:
        ordinal = plates.intersection(f.inputs)
        ordinal_to_factors[ordinal].append(f)
        for var in sum_vars.intersection(f.inputs):
            var_to_ordinal[var] = var_to_ordinal.get(var, ordinal) & ordinal
    ordinal_to_vars = defaultdict(set)
    for var, ordinal in var_to_ordinal.items():
        ordinal_to_vars[ordinal].add(var)

    def reduce_plates(f, reduced):
        for p in sorted(reduced & frozenset(plate_weights)):
            f = f * plate_weights[p]
        return f.reduce(prod_op, reduced)

    results = []
    while ordinal_to_factors:
        leaf = max(ordinal_to_factors, key=len)
        for group, group_vars in partition(ordinal_to_factors.pop(leaf), ordinal_to_vars[leaf]):
            f = reduce(prod_op, group).reduce(sum_op, group_vars & eliminate)
            remaining = sum_vars.intersection(f.inputs)
            if not remaining:
                results.append(reduce_plates(f, leaf))
                continue
            new_plates = frozenset().union(*(var_to_ordinal[v] for v in remaining))
            if new_plates == leaf:
                raise ValueError(
                    f"The latents {sorted(remaining)} make the contraction intractable.")
            ordinal_to_factors[new_plates].append(reduce_plates(f, leaf - new_plates))
    return reduce(prod_op, results, funsor.Number(UNITS[prod_op]))


def _enumerated_last(array, dim_to_name, plates):
    """`array` copied with its enumerated dims innermost (and `dim_to_name` to match).

    NumPyro puts enumerated dims on the left; a reduction over them (the sum over z_n of a
    mixture's (K, N) factor) then runs across the major axis, which XLA on CPU does several
    times slower than over the minor one. The barrier makes the transposed copy physical, so
    the contraction (and its gradient) reduce over contiguous memory.
    """
    nd = jnp.ndim(array)
    names = {nd + d: n for d, n in dim_to_name.items()}
    enumerated = [ax for ax in sorted(names) if names[ax] not in plates]
    perm = [ax for ax in range(nd) if ax not in enumerated] + enumerated
    if not enumerated or perm == list(range(nd)):
        return array, dim_to_name
    moved = jax.lax.optimization_barrier(jnp.transpose(array, perm))
    return moved, OrderedDict((i - nd, names[ax]) for i, ax in enumerate(perm) if ax in names)


class _Graph(NamedTuple):
    """The funsor factors of one contraction, grouped: `free` (no Markov chain, or already
    summed), `chains` ({time Variable: its time-stacked factors}) with each chain's previous-
    step variables `init_vars` and the variables of its Markov factors `markov_dims`; the
    variables to sum (latents) and multiply (plates, independent steps); `history` is the
    longest lag; `lag_site` maps a previous-step variable to its site."""

    free: list
    chains: dict
    init_vars: dict
    markov_dims: dict
    sum_vars: frozenset
    prod_vars: frozenset
    history: int
    lag_site: dict
    plate_weights: dict


def _graph(factors) -> _Graph:
    """Group the log-factors of `factors` (a [`bayes_em.factors.Factors`][bayes_em.factors.Factors])
    for the contraction, as NumPyro's `_enum_log_density` does; dims of factors outside chains are
    reordered so that reductions run over contiguous memory."""
    free, chains = [], defaultdict(list)
    init_vars, markov_dims = defaultdict(frozenset), defaultdict(frozenset)
    sum_vars, prod_vars, history, lag_site = frozenset(), frozenset(), 0, {}
    sizes = time_sizes(factors.metas)
    dim_to_name_of = {m.name: OrderedDict(m.dim_to_name) for m in factors.metas}
    for meta in factors.metas:
        dim_to_name, log_prob = dim_to_name_of[meta.name], factors.logs[meta.name]
        if meta.time is None:
            log_prob, dim_to_name = _enumerated_last(log_prob, dim_to_name, meta.plates)
        factor = funsor.to_funsor(log_prob, output=funsor.Real, dim_to_name=dim_to_name)
        if meta.time is None:
            free.append(factor)
        else:
            time = funsor.Variable(meta.time, funsor.Bint[sizes[meta.time]])
            history = max(history, *(shift for _, _, shift in meta.lags), 0)
            if history == 0:  # steps without a Markov dependence: a plate over time
                free.append(factor)
                prod_vars |= {meta.time}
            else:
                chains[time].append(factor)
            init_vars[time] |= frozenset(name for name, _, _ in meta.lags)
            lag_site.update({name: site for name, site, _ in meta.lags})
        if not meta.is_observed:
            sum_vars |= {meta.name}
        prod_vars |= meta.plates
    for time, names in init_vars.items():
        for var in names:
            curr = dim_to_name_of.get(lag_site[var], {}).values()
            if var in curr:
                markov_dims[time] |= frozenset(curr)
    single = sorted(p for p, w in factors.plate_weights.items() if jnp.shape(w) == (1,))
    if single:  # funsor drops size-1 dims: the weight would silently not apply
        raise NotImplementedError(
            f"Plate(s) {single} have one element and per-element weights: bayes_em weights the "
            "elements of plates with two or more.")
    plate_weights = {p: funsor.to_funsor(w, output=funsor.Real,
                                         dim_to_name=OrderedDict([(-1, p)]))
                     for p, w in factors.plate_weights.items()}
    for time, fs in chains.items():
        inside = {p for f in fs for p in f.inputs if p in plate_weights} - markov_dims[time]
        if inside:
            raise NotImplementedError(
                f"Plate(s) {sorted(inside)} are weighted inside a Markov chain (scan/markov); "
                "bayes_em weights plates outside chains only.")
    return _Graph(free, dict(chains), dict(init_vars), dict(markov_dims), sum_vars, prod_vars,
                  history, lag_site, plate_weights)


def _chain_parts(graph, time, sum_op, prod_op):
    """The chain's time-stacked factors contracted into at most two tensors: C, constant over
    time (a homogeneous transition), and E_t (emissions, time-varying transitions), contracted
    apart unless a latent local to a step couples them. None if funsor leaves them lazy."""
    factors = graph.chains[time]
    eliminate = (graph.sum_vars | graph.prod_vars) - graph.markov_dims[time]

    def contract(fs):
        if not fs:
            return None
        with funsor.interpretations.lazy:
            lazy = npi.sum_product(sum_op, prod_op, fs, eliminate=eliminate,
                                   plates=graph.prod_vars)
        return funsor.optimizer.apply_optimizer(lazy)

    fixed = [f for f in factors if time.name not in f.inputs]
    varying = [f for f in factors if time.name in f.inputs]

    def latents(fs):
        return frozenset().union(*(f.inputs for f in fs)) & eliminate & graph.sum_vars

    if latents(fixed) & latents(varying):
        fixed, varying = [], factors
    parts = [p for p in (contract(fixed), contract(varying)) if p is not None]
    return parts if all(isinstance(p, funsor.Tensor) for p in parts) else None


# the largest joint table of a chain's first factors maximised with back-pointers (entries)
_START_LIMIT = 2**22


def _chain_start(graph, prev, curr, batch, sum_op, prod_op):
    """`(a_0, rest, exact)`: a_0(prev), the sum-product of the chain-free factors connected to
    the chain's first state through enumerated latents, and the factors not connected; None if
    they do not have that form. With the max-product the latents before the chain are maximised
    out of their joint table with back-pointers (`bayes_em.viterbi.max_first`) where it is
    small and no plate is reduced there (`exact`: the gradient of a_0 is then one optimum)."""
    chain, rest, frontier = [], list(graph.free), {prev}
    while frontier:
        linked = [f for f in rest if frontier & set(f.inputs)]
        if not linked:
            break
        rest = [f for f in rest if not any(f is g for g in linked)]
        chain += linked
        frontier = set().union(*(set(f.inputs) for f in linked)) & graph.sum_vars
    if not chain or any(curr in f.inputs or not batch <= set(f.inputs) for f in chain):
        return None
    inputs = frozenset().union(*(f.inputs for f in chain))
    if sum_op is npi.max_op:
        start = _max_start(chain, inputs, prev, batch, graph)
        if start is not None:
            return start, rest, True
    with funsor.interpretations.lazy:
        lazy = npi.sum_product(
            sum_op, prod_op, chain,
            eliminate=((inputs & graph.sum_vars) - {prev}) | ((inputs & graph.prod_vars) - batch),
            plates=graph.prod_vars)
    init = funsor.optimizer.apply_optimizer(lazy)
    if not isinstance(init, funsor.Tensor) or not set(init.inputs) <= batch | {prev}:
        return None
    return init, rest, False


def _max_start(chain, inputs, prev, batch, graph):
    """max over the latents before the chain of the sum of the factors `chain`, kept over
    `prev` and the batch plates, by `bayes_em.viterbi.max_first` on their joint table;
    None where a plate would be reduced or the table is large."""
    if (inputs & graph.prod_vars) - batch:
        return None
    joint = reduce(npi.add, chain)
    if not isinstance(joint, funsor.Tensor):
        return None
    eliminated = tuple(sorted(set(joint.inputs) - batch - {prev}))
    kept = tuple(n for n in sorted(batch) if n in joint.inputs) + (prev,)
    if eliminated and joint.data.size > _START_LIMIT:
        return None
    data = joint.align(kept + eliminated).data
    sizes = tuple(joint.inputs[n].size for n in kept)
    if eliminated:
        data = max_first(data.reshape(sizes + (-1,)))
    return funsor.Tensor(data.reshape(sizes), OrderedDict((n, joint.inputs[n]) for n in kept))


def _forward_chain(graph, time, sum_op, prod_op):
    """`(free, a_T, exact)`: the chain-free factors with the chain along `time` summed out by
    a forward recursion (the last of them, a_T, its result), or None when the chain does not
    have the simple form below (then funsor's log-depth
    contraction of the T transition matrices is used, O(T·K³) work).

    With M_t(prev, curr) = C ⊗ E_t (`_chain_parts`) and a_0 (`_chain_start`),

        a_{t+1}(curr) = ⊕_prev a_t(prev) ⊗ M_t(prev, curr)       (O(T·K²), one lax.scan)

    and a_T replaces them all. Its gradient is the backward pass: the weights of M_t are the
    two-slice marginals. Needs history 1, one chain variable, and no enumerated latent besides
    the chain in M_t (other inputs are plates, which every factor of a_0 shares). When E_t does
    not depend on the previous state (emissions), a sum-product step is a matrix-vector product
    (`bayes_em.forward.matvec_step`). The max-product records back-pointers
    (`bayes_em.viterbi.viterbi_scan`); `exact`: its gradient is the indicator of one
    optimal path through the chain and its start (no latent local to a step maximised apart).
    """
    if graph.history != 1 or len(graph.init_vars[time]) != 1:
        return None
    (prev,) = graph.init_vars[time]
    curr = graph.lag_site[prev]
    parts = _chain_parts(graph, time, sum_op, prod_op)
    if parts is None:
        return None
    inputs = frozenset().union(*(p.inputs for p in parts))
    batch = inputs - {time.name, prev, curr}
    if {prev, curr} - inputs or batch & graph.sum_vars:
        return None
    start = _chain_start(graph, prev, curr, batch, sum_op, prod_op)
    if start is None:
        return None
    init, rest, exact = start
    local = frozenset().union(*(f.inputs for f in graph.chains[time])) & graph.sum_vars
    exact = exact and not local - graph.markov_dims[time]
    names = tuple(sorted(batch)) + (prev, curr)
    size = {n: d.size for p in parts for n, d in p.inputs.items()}

    def aligned(f, order):
        """`f`'s data in `order`, with size-1 dims for the inputs it lacks (no copies)."""
        present = tuple(n for n in order if n in f.inputs)
        return f.align(present).data.reshape(tuple(size[n] if n in f.inputs else 1 for n in order))

    dtype = jnp.result_type(*(p.data for p in parts))
    const, m = jnp.zeros((), dtype), None  # at most one part of each kind: C and E_t
    for p in parts:
        if time.name in p.inputs:
            m = aligned(p, (time.name,) + names)
        else:
            const = aligned(p, names)
    a0 = jnp.broadcast_to(aligned(init, names[:-1]), tuple(size[n] for n in names[:-1]))
    if sum_op is npi.max_op:  # the max-product keeps back-pointers (bayes_em.viterbi)
        const = jnp.reshape(const, (1,) * (jnp.ndim(a0) + 1)) if jnp.ndim(const) == 0 else const
        a_last = viterbi_scan(a0.astype(dtype), const, m, time.output.size)
    else:
        a_last = forward_scan(a0.astype(dtype), const, m, time.output.size)
    out = OrderedDict((n, funsor.Bint[size[n]]) for n in names if n != prev)
    a_last = funsor.Tensor(jnp.broadcast_to(a_last, tuple(d.size for d in out.values())), out)
    return rest + [a_last], a_last, exact


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def log_sum_exp(a, axes: tuple):
    """log Σ exp(a) over `axes` (as `jax.nn.logsumexp`), its derivative Σ softmax(a) · ȧ
    from the same exp, reading a once more so that XLA does not write the exp of a − max a
    over a: XLA:CPU's classic emitters (`compiled.classic_emitters`) run an elementwise loop
    that writes over its own input as scalar code (a run-time overlap check), which made the
    E-step's exp of a mixture's log-weights 2.3× slower than a vectorised one (a mid-size
    float64 mixture 21–29% per iteration)."""
    return _log_sum_exp(a, axes)[0]


def _log_sum_exp(a, axes):
    m = jax.lax.stop_gradient(jnp.max(a, axes, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(a - m)
    s = jnp.sum(e, axes, keepdims=True)
    return jnp.squeeze(jnp.log(s) + m, axes), e, s


@log_sum_exp.defjvp
def _log_sum_exp_jvp(axes, primals, tangents):
    a, = primals
    out, e, s = _log_sum_exp(a, axes)
    # e where a > -inf (0 there anyway): reading a after the exp keeps XLA from writing the
    # exp over a
    e = jnp.where(a == -jnp.inf, 0.0, e)
    return out, jnp.squeeze(jnp.sum(e * tangents[0], axes, keepdims=True) / s, axes)


def _sum_out(f, sum_op, names):
    """`f.reduce(sum_op, names)`; under the classic emitters a log-sum-exp by `log_sum_exp`
    (under XLA's default ones funsor's measured 10% faster on a diagonal mixture)."""
    if (sum_op is not npi.logaddexp or not isinstance(f, funsor.Tensor)
            or not classic_emitters()):
        return f.reduce(sum_op, names)
    axes = tuple(i for i, n in enumerate(f.inputs) if n in names)
    if not axes or jnp.ndim(f.data) != len(f.inputs):
        return f.reduce(sum_op, names)
    return funsor.Tensor(log_sum_exp(f.data, axes),
                         OrderedDict((n, d) for n, d in f.inputs.items() if n not in names))


def _lazy_contraction(factors, sum_op, prod_op, parallel_time=False, report=None):
    """The lazy funsor expression of the contraction of `factors` over every latent, plate
    and time dim: chains summed by `_forward_chain` where it applies (not with
    `parallel_time`), the others by NumPyro's Markov contraction, then one sum-product over
    plates (weighted plates by `_weighted_sum_product`; a single factor left is reduced at
    once, the same two reductions that funsor's sum-product makes of it).

    `report` (a dict, max-product): `report["one_optimum"]` is set to whether the gradient
    is the indicator of one optimal configuration whatever the ties: every chain went through
    the back-pointer recursion exactly, and every other factor left has no latent but a
    chain's last state (see
    [`bayes_em.estep.posterior_weights`][bayes_em.estep.posterior_weights])."""
    graph = _graph(factors)
    chains = dict(graph.chains)
    exact, outputs = True, []
    for time in list(chains) if not parallel_time else ():
        fused = _forward_chain(graph._replace(chains=chains), time, sum_op, prod_op)
        if fused is not None:
            free, a_last, fused_exact = fused
            graph = graph._replace(free=free)
            exact, outputs = exact and fused_exact, outputs + [a_last]
            del chains[time]
    free = list(graph.free)
    if report is not None:
        report["one_optimum"] = exact and not chains and not any(
            graph.sum_vars & frozenset(f.inputs) and not any(f is o for o in outputs)
            for f in free)
    for time, fs in chains.items():
        if not any(time.name in f.inputs for f in fs):  # constant over time: repeat it
            zeros = jnp.zeros(time.output.size, jnp.result_type(fs[0].data))
            fs.append(funsor.Tensor(zeros, OrderedDict([(time.name, time.output)])))
    if chains:
        free += compute_markov_factors(chains, graph.init_vars, graph.markov_dims,
                                       graph.sum_vars, graph.prod_vars, graph.history, sum_op,
                                       prod_op)
    # factors over the same variables are multiplied first: one tensor, not an einsum per pair
    # (for a mixture, log p(z) + log p(x | z) over (z, n): a batched dot of N tiny vectors)
    same_scope = {}
    for f in free:
        key = frozenset(f.inputs)
        same_scope[key] = f if key not in same_scope else same_scope[key] + f
    free = list(same_scope.values())
    eliminate = graph.sum_vars | graph.prod_vars
    if len(free) == 1 and not graph.plate_weights:
        # one factor (a mixture, the three coins): its latents summed out, then its plates, as
        # sum_product does with it, without funsor's lazy interpretation and optimiser
        inputs = frozenset(free[0].inputs)
        return _sum_out(free[0], sum_op, graph.sum_vars & inputs).reduce(
            prod_op, graph.prod_vars & inputs)
    with funsor.interpretations.lazy:
        if graph.plate_weights:
            return _weighted_sum_product(sum_op, prod_op, free, eliminate, graph.prod_vars,
                                         graph.plate_weights)
        return npi.sum_product(sum_op, prod_op, free, eliminate=eliminate,
                               plates=graph.prod_vars)


def log_partition(factors: Factors, semiring: str = "sum", parallel_time: bool = False,
                  report: dict | None = None) -> Array:
    """log Z: sum-product (`"sum"`) or max-product (`"max"`) of `factors`
    ([`bayes_em.factors.Factors`][bayes_em.factors.Factors]).

    Markov chains are summed out by a forward recursion (O(T·K²) work, T sequential steps) where
    their structure allows, or with `parallel_time` by funsor's parallel-in-time contraction
    (pairs of steps multiplied in log₂ T rounds: O(T·K³) work, log depth; for accelerators).
    `report`: see `_lazy_contraction`."""
    sum_op = npi.logaddexp if semiring == "sum" else npi.max_op
    result = funsor.optimizer.apply_optimizer(
        _lazy_contraction(factors, sum_op, npi.add, parallel_time, report))
    if result.inputs:
        raise ValueError(
            "The enumerated log-density did not reduce to a scalar; check the plates of sites "
            f"{sorted({k.split('__BOUND')[0] for k in result.inputs})}."
        )
    return result.data


def pointwise_log_likelihood(factors: Factors, plate: str | None = None, drop=()) -> Array:
    """log p(x_n | θ) for every index n of `plate`, latents summed out (sum-product).

    The contraction of [`log_partition`][bayes_em.contraction.log_partition], with `plate` left as a
    free (batch) input instead of a product: Σ_n of the result is log Z less the dropped factors
    `drop` (e.g. the priors of MAP sites). Every remaining factor must lie in `plate`, else its
    points are coupled and a pointwise log-likelihood is undefined. `plate=None` gives the whole log
    Z, shape `(1,)`.
    """
    drop = set(drop)
    kept = factors.select([m.name for m in factors.metas if m.name not in drop])
    if plate is not None:
        outside = sorted(m.name for m in kept.metas if plate not in m.plates)
        if outside:
            raise ValueError(
                f"Sites {outside} lie outside plate '{plate}': they couple its points, so the "
                "log-likelihood does not split into one term per point."
            )
        kept = kept.replace(metas=tuple(m._replace(plates=m.plates - {plate})
                                        for m in kept.metas), plate_weights={})
    result = funsor.optimizer.apply_optimizer(
        _lazy_contraction(kept, npi.logaddexp, npi.add))
    expected = frozenset() if plate is None else frozenset({plate})
    if frozenset(result.inputs) != expected:
        raise ValueError(
            f"The pointwise contraction over plate '{plate}' left inputs {sorted(result.inputs)}."
        )
    return result.data[None] if plate is None else result.align((plate,)).data
