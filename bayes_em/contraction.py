"""The contraction of log-factors: log Z by sum-product (or max-product) over enumerated, plate
and Markov dims, pure array algebra over the factor arrays of :mod:`bayes_em.enumeration`.

Plates with per-element weights are reduced after their local latents are summed out; a Markov
chain (``scan``) is summed by a forward recursion (O(T·K²), one ``lax.scan``) where its structure
allows, else by funsor's contraction (parallel-in-time with ``parallel_time``).
``tests/test_enumeration.py`` and ``tests/test_vectorized_scan.py`` check it against brute force.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from functools import reduce

import funsor
import jax
import jax.numpy as jnp

from bayes_em import _numpyro as npi
from bayes_em._numpyro import UNITS, compute_markov_factors, get_shift, partition

__all__ = ["WEIGHT", "log_partition", "time_sizes", "pointwise_log_likelihood"]

# key prefix of a plate's per-element weights among the factor arrays
WEIGHT = "@weight:"


def _weighted_sum_product(sum_op, prod_op, factors, eliminate, plates, plate_weights):
    """funsor's ``sum_product`` with per-element plate weights: a factor is multiplied
    by ``w_p`` (in log space: raised to the power w_p) just before plate ``p`` is reduced, i.e.
    after the latents local to ``p`` are summed out; element n then counts w_n times."""
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
    """``array`` copied with its enumerated dims innermost (and ``dim_to_name`` to match).

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


def _pairwise_sum(x):
    """Σ over the leading axis by pairwise (tree) summation: round-off O(log n · eps)."""
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros_like(x[:1])])
        x = x[0::2] + x[1::2]
    return x[0]


def _matvec_step(const, dtype):
    """Forward step a_{t+1}(j) = log Σ_i exp(a_t(i) + C(i, j)) + m_t(j) for a transition part C
    constant over time, as a matrix-vector product: K exps and K² multiply-adds per step
    instead of K² exps (the scaled forward pass of Baum-Welch, kept in log space).

    With r_i = max_j C(i, j) and A = exp(C - r), a_{t+1} = log(exp(a_t + r - s) @ A) + s + m_t
    for any shift s (the max of a_t + r): an entry below e^-745 of the largest underflows and
    drops out, an error far below float64 round-off of the sum. A state no path reaches gets
    a finite stand-in for log 0 (as masked latents do), which keeps the gradient finite.
    """
    r = jax.lax.stop_gradient(jnp.max(const, axis=-1))
    r = jnp.where(jnp.isfinite(r), r, 0.0)
    trans = jnp.exp(const - r[..., None])
    log0 = jnp.finfo(dtype).min / 1e8

    def forward(a, m_t):
        u = a + r
        shift = jax.lax.stop_gradient(jnp.max(u, axis=-1, keepdims=True))
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        q = jnp.einsum("...i,...ij->...j", jnp.exp(u - shift), trans)
        reached = q > 0
        a_next = jnp.where(reached, jnp.log(jnp.where(reached, q, 1.0)), log0)
        return (a_next if m_t is None else a_next + m_t), shift

    return forward


def _forward_chain(time, factors, init_vars, markov_dims, others, sum_vars, prod_vars, history,
                   sum_op, prod_op):
    """The factors ``others`` with one Markov chain summed out by a forward recursion, or None
    when the chain does not have the simple form below (then funsor's log-depth contraction of
    the T transition matrices is used, O(T·K³) work).

    With M_t(prev, curr) the time-stacked factors of step t and a_0(prev) the sum-product of the
    non-time factors connected to the chain's first state,

        a_{t+1}(curr) = ⊕_prev a_t(prev) ⊗ M_t(prev, curr)       (O(T·K²), one lax.scan)

    and a_T replaces them all. Its gradient is the backward pass: the weights of M_t are the
    two-slice marginals. Needs history 1, one chain variable, and no enumerated latent besides
    the chain in M_t (other inputs are plates, which every factor of a_0 shares).

    M_t = C ⊗ E_t is kept in two parts: C from the factors constant over time (a homogeneous
    transition, (K, K) once), E_t from those that vary. When E_t does not depend on the previous
    state (emissions), a sum-product step is a matrix-vector product (:func:`_matvec_step`).
    """
    if history != 1 or len(init_vars) != 1:
        return None
    (prev,) = init_vars
    curr = prev[len("_PREV_"):]
    eliminate = (sum_vars | prod_vars) - markov_dims

    def contract(fs):
        if not fs:
            return None
        with funsor.interpretations.lazy:
            lazy = npi.sum_product(sum_op, prod_op, fs, eliminate=eliminate,
                                                  plates=prod_vars)
        return funsor.optimizer.apply_optimizer(lazy)

    # C and E_t are contracted apart unless a latent local to a step couples them
    fixed = [f for f in factors if time.name not in f.inputs]
    varying = [f for f in factors if time.name in f.inputs]

    def latents(fs):
        return frozenset().union(*(f.inputs for f in fs)) & eliminate & sum_vars

    if latents(fixed) & latents(varying):
        fixed, varying = [], factors
    parts = [p for p in (contract(fixed), contract(varying)) if p is not None]
    if not all(isinstance(p, funsor.Tensor) for p in parts):
        return None
    inputs = frozenset().union(*(p.inputs for p in parts))
    batch = inputs - {time.name, prev, curr}
    if {prev, curr} - inputs or batch & sum_vars:
        return None
    # the non-time factors connected to the first state through enumerated latents
    chain, rest, frontier = [], list(others), {prev}
    while frontier:
        linked = [f for f in rest if frontier & set(f.inputs)]
        if not linked:
            break
        rest = [f for f in rest if not any(f is g for g in linked)]
        chain += linked
        frontier = set().union(*(set(f.inputs) for f in linked)) & sum_vars
    if not chain or any(curr in f.inputs or not batch <= set(f.inputs) for f in chain):
        return None
    chain_inputs = frozenset().union(*(f.inputs for f in chain))
    with funsor.interpretations.lazy:
        lazy = npi.sum_product(
            sum_op, prod_op, chain,
            eliminate=((chain_inputs & sum_vars) - {prev}) | ((chain_inputs & prod_vars) - batch),
            plates=prod_vars)
    init = funsor.optimizer.apply_optimizer(lazy)
    if not isinstance(init, funsor.Tensor) or not set(init.inputs) <= batch | {prev}:
        return None
    names = tuple(sorted(batch)) + (prev, curr)
    size = {n: d.size for p in parts for n, d in p.inputs.items()}

    def aligned(f, order):
        """``f``'s data in ``order``, with size-1 dims for the inputs it lacks (no copies)."""
        present = tuple(n for n in order if n in f.inputs)
        return f.align(present).data.reshape(tuple(size[n] if n in f.inputs else 1 for n in order))

    dtype = jnp.result_type(*(p.data for p in parts))
    # at most one part of each kind: C (no time input) and E_t
    const, m = jnp.zeros((), dtype), None
    for p in parts:
        if time.name in p.inputs:
            m = aligned(p, (time.name,) + names)
        else:
            const = aligned(p, names)
    a0 = jnp.broadcast_to(aligned(init, names[:-1]), tuple(size[n] for n in names[:-1]))
    a0 = a0.astype(dtype)
    if sum_op is npi.logaddexp and jnp.ndim(const) >= 2 and (m is None or m.shape[-2] == 1):
        forward = _matvec_step(const, dtype)
        m = None if m is None else m[..., 0, :]
    else:
        reduce_ = jax.nn.logsumexp if sum_op is npi.logaddexp else jnp.max

        def forward(a, m_t):
            m_t = const if m_t is None else const + m_t
            shift = jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))
            shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
            return reduce_((a - shift)[..., :, None] + m_t, axis=-2), shift

    # Each step returns its message less a shift, and the shift: the carried values stay O(1),
    # so their round-off does not grow with log Z (a message carrying log Z itself adds eps·|log Z|
    # at each of the T steps); the shifts are summed pairwise at the end.
    a_last, shifts = jax.lax.scan(forward, a0, m, length=time.output.size)
    a_last = a_last + _pairwise_sum(shifts)
    out = OrderedDict((n, funsor.Bint[size[n]]) for n in names if n != prev)
    a_last = jnp.broadcast_to(a_last, tuple(d.size for d in out.values()))
    return rest + [funsor.Tensor(a_last, out)]


def time_sizes(metas):
    """{time dim name: number of steps}; a factor constant over the steps of a vectorised
    ``scan`` has a time dim of size 1, so the size is the largest among the factors."""
    sizes = {}
    for meta in metas:
        for dim, name in meta.dim_to_name:
            if name.startswith("_time"):
                sizes[name] = max(sizes.get(name, 1), meta.shape[dim])
    return sizes


def _lazy_contraction(arrays, metas, sum_op, prod_op, parallel_time=False):
    log_factors_, sum_vars, prod_vars = [], frozenset(), frozenset()
    time_to_factors = defaultdict(list)
    time_to_init_vars = defaultdict(frozenset)
    time_to_markov_dims = defaultdict(frozenset)
    history = 0
    dim_to_name_of = {m.name: OrderedDict(m.dim_to_name) for m in metas}
    sizes = time_sizes(metas)
    for meta in metas:
        dim_to_name = dim_to_name_of[meta.name]
        log_prob = arrays[meta.name]
        if not any(n.startswith("_time") for n in dim_to_name.values()):
            log_prob, dim_to_name = _enumerated_last(log_prob, dim_to_name, meta.plates)
        factor = funsor.to_funsor(log_prob, output=funsor.Real, dim_to_name=dim_to_name)
        time_dim = None
        for dim, name in dim_to_name.items():
            if name.startswith("_time"):
                time_dim = funsor.Variable(name, funsor.Bint[sizes[name]])
                history = max(history, max(get_shift(s) for s in dim_to_name.values()))
                if history == 0:
                    log_factors_.append(factor)
                    prod_vars |= frozenset({name})
                else:
                    time_to_factors[time_dim].append(factor)
                time_to_init_vars[time_dim] |= frozenset(
                    s for s in dim_to_name.values() if s.startswith("_PREV_")
                )
                break
        if time_dim is None:
            log_factors_.append(factor)
        if not meta.is_observed:
            sum_vars |= frozenset({meta.name})
        prod_vars |= meta.plates
    for time_dim, init_vars in time_to_init_vars.items():
        for var in init_vars:
            curr = var[len("_PREV_") * get_shift(var):]
            names = dim_to_name_of[curr].values()
            if var in names:
                time_to_markov_dims[time_dim] |= frozenset(names)
    plate_weights = {}
    for key, w in arrays.items():
        if key.startswith(WEIGHT):
            plate = key[len(WEIGHT):]
            plate_weights[plate] = funsor.to_funsor(w, output=funsor.Real,
                                                    dim_to_name=OrderedDict([(-1, plate)]))
    for time_dim, factors in time_to_factors.items():
        inside = {p for f in factors for p in f.inputs if p in plate_weights}
        if inside - time_to_markov_dims[time_dim]:
            raise NotImplementedError(
                f"Plate(s) {sorted(inside - time_to_markov_dims[time_dim])} are weighted inside a "
                "Markov chain (scan/markov); bayes_em weights plates outside chains only."
            )
    for time_dim in list(time_to_factors) if not parallel_time else ():
        fused = _forward_chain(time_dim, time_to_factors[time_dim], time_to_init_vars[time_dim],
                               time_to_markov_dims[time_dim], log_factors_, sum_vars, prod_vars,
                               history, sum_op, prod_op)
        if fused is not None:
            log_factors_ = fused
            del time_to_factors[time_dim]
    for time_dim, factors in time_to_factors.items():
        if not any(time_dim.name in f.inputs for f in factors):  # constant over time: repeat it
            zeros = jnp.zeros(time_dim.output.size, jnp.result_type(factors[0].data))
            factors.append(funsor.Tensor(zeros, OrderedDict([(time_dim.name, time_dim.output)])))
    if time_to_factors:
        log_factors_ = log_factors_ + compute_markov_factors(
            time_to_factors,
            time_to_init_vars,
            time_to_markov_dims,
            sum_vars,
            prod_vars,
            history,
            sum_op,
            prod_op,
        )
    # factors over the same variables are multiplied first: one tensor, not an einsum per pair
    # (for a mixture, log p(z) + log p(x | z) over (z, n): a batched dot of N tiny vectors)
    same_scope = {}
    for f in log_factors_:
        key = frozenset(f.inputs)
        same_scope[key] = f if key not in same_scope else same_scope[key] + f
    log_factors_ = list(same_scope.values())
    with funsor.interpretations.lazy:
        if plate_weights:
            return _weighted_sum_product(sum_op, prod_op, log_factors_, sum_vars | prod_vars,
                                         prod_vars, plate_weights)
        return npi.sum_product(
            sum_op, prod_op, log_factors_, eliminate=sum_vars | prod_vars, plates=prod_vars
        )


def log_partition(arrays, metas, semiring="sum", parallel_time=False):
    """log Z: sum-product (``"sum"``) or max-product (``"max"``) of the log-factors.

    Markov chains are summed out by a forward recursion (O(T·K²) work, T sequential steps) where
    their structure allows, or with ``parallel_time`` by funsor's parallel-in-time contraction
    (pairs of steps multiplied in log₂ T rounds: O(T·K³) work, log depth; for accelerators)."""
    sum_op = npi.logaddexp if semiring == "sum" else npi.max_op
    lazy = _lazy_contraction(arrays, metas, sum_op, npi.add, parallel_time)
    result = funsor.optimizer.apply_optimizer(lazy)
    if result.inputs:
        raise ValueError(
            "The enumerated log-density did not reduce to a scalar; check the plates of sites "
            f"{sorted({k.split('__BOUND')[0] for k in result.inputs})}."
        )
    return result.data


def pointwise_log_likelihood(arrays, metas, plate=None, drop=()):
    """log p(x_n | θ) for every index n of ``plate``, latents summed out (sum-product).

    The contraction of :func:`log_partition`, with ``plate`` left as a free (batch) input instead
    of a product: Σ_n of the result is log Z less the dropped factors ``drop`` (e.g. the priors of
    MAP sites). Every remaining factor must lie in ``plate``, else its points are coupled and a
    pointwise log-likelihood is undefined. ``plate=None`` gives the whole log Z, shape ``(1,)``.
    """
    kept = tuple(m for m in metas if m.name not in set(drop))
    if plate is not None:
        outside = sorted(m.name for m in kept if plate not in m.plates)
        if outside:
            raise ValueError(
                f"Sites {outside} lie outside plate '{plate}': they couple its points, so the "
                "log-likelihood does not split into one term per point."
            )
        kept = tuple(m._replace(plates=m.plates - {plate}) for m in kept)
    lazy = _lazy_contraction({m.name: arrays[m.name] for m in kept}, kept, npi.logaddexp,
                             npi.add)
    result = funsor.optimizer.apply_optimizer(lazy)
    expected = frozenset() if plate is None else frozenset({plate})
    if frozenset(result.inputs) != expected:
        raise ValueError(
            f"The pointwise contraction over plate '{plate}' left inputs {sorted(result.inputs)}."
        )
    return result.data[None] if plate is None else result.align((plate,)).data
