"""Chunked exact EM: the data plate processed C rows at a time (`EM(model, chunk_size=C)`).

When every latent lies in the data plate, the rows are independent given θ and

    log Z(θ) = Σ_chunks log Z_chunk(θ) + log p(θ),
    stats(θ; w_t) = Σ_chunks stats_chunk(θ; w_t)      (closed-form M-step statistics),
    Q(θ; θ_t) = Σ_chunks Q_chunk(θ; θ_t) + log p(θ)   (numeric M-step),

where w_t are the E-step weights at θ_t of the chunk's rows. Nothing N-sized is stored: each
pass over the chunks (a `fori_loop`, sums carried) recomputes the chunk's E-step weights at
θ_t. The priors of MAP sites (outside the plate) are counted once, from a trace of the whole
data of which XLA keeps only those factors.

Where every closed-form plan has additive statistics (`bayes_em.additive`: counts, rates,
Gaussian locations with their scales or covariances) an iteration is one pass: the E-pass at θ_t
sums the chunks' raw statistics with the objective, and the M-step maps their sum to θ_{t+1}
(locations, then the covariances at the new locations, as the unchunked M-step does).

Otherwise the closed-form plans are applied in order, each conditional on the ones before (ECM).
They are grouped into *stages*: a plan opens a new stage when one of its sites reads a parameter
updated earlier in the current stage, so the statistics of a stage can all be computed at one
θ. Per iteration (M-step, then the objective at θ_{t+1}):

- stage 1's statistics come with the E-pass that computed the objective at θ_t (the state
  carries them, parameter-sized, instead of the weights);
- every further stage is one pass over the chunks (E-step weights at θ_t, statistics at the
  current θ);
- the numeric sites' L-BFGS evaluates Q and its gradient by one pass per evaluation (the
  chunk's weights recomputed at θ_t: memory O(C), at the price of an E-step per evaluation);
- one E-pass at θ_{t+1}: its objective and the next stage 1's statistics.

(With stages, a full-covariance Gaussian mixture would take 2 passes per iteration: weights and
locations with the objective, covariances at the new locations; with additive statistics, 1.)

The last chunk is the last C rows, its rows already in the previous chunk masked out
(`numpyro.handlers.mask` semantics: latents pinned, observations count 0), so every chunk has
the same shape and one compiled body.

Refused: hard EM (max-product tie-breaks and its rounding grid depend on the whole data),
SQUAREM, sites outside the data plate other than MAP priors, parameters inside it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bayes_em import additive
from bayes_em.conjugate import _trace, plan_prior, plan_stats, plan_value
from bayes_em.estep import posterior_weights, projections
from bayes_em.gaussian import expansion_choice
from bayes_em.lbfgs import maximize
from bayes_em.predict import RowMask
from bayes_em.problem import EMProblem, constrain, factors, log_prior, unconstrain

__all__ = ["Chunks", "configure", "head", "stages", "e_pass", "m_step", "closed_form_step",
           "symmetric_latents", "check_chunk_size"]


class Chunks(NamedTuple):
    """Static layout of a chunked fit."""

    plate: str  # the data plate
    n_rows: int  # N, its size
    size: int  # C, rows per chunk
    rows: tuple  # indices of the data leaves whose leading axis is the plate
    first_stage: tuple = ()  # closed-form plans whose statistics the E-pass carries
    layout: Any = None  # additive.Layout: every closed-form plan from one pass (None: stages)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.size)




def check_chunk_size(chunk_size):
    """`chunk_size` is None or a positive integer."""
    if chunk_size is None:
        return None
    integral = isinstance(chunk_size, (int, np.integer)) or (
        isinstance(chunk_size, float) and chunk_size.is_integer())  # 1e5 reads as a float
    if isinstance(chunk_size, bool) or not integral or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    return int(chunk_size)


def _map_sites(problem):
    return {p.name for p in problem.sites.params if p.kind == "map"}


def _slice(problem: EMProblem, data: tuple, i):
    """The problem (rows of earlier chunks masked) and data of chunk `i` (traced)."""
    spec = problem.chunks
    if spec.n_rows % spec.size == 0:  # equal chunks: nothing to mask
        start, lo, model = i * spec.size, 0, problem.enum_model
    else:
        start = jnp.minimum(i * spec.size, spec.n_rows - spec.size)
        lo = i * spec.size - start
        model = RowMask(problem.enum_model, spec.plate, lo=lo)
    leaves = tuple(lax.dynamic_slice_in_dim(jnp.asarray(x), start, spec.size, 0)
                   if j in spec.rows else x for j, x in enumerate(data))
    return problem._replace(enum_model=model, chunks=None), leaves, lo


def head(problem: EMProblem, data: tuple) -> tuple:
    """The first chunk's data (the whole data unchunked)."""
    if problem.chunks is None:
        return data
    spec = problem.chunks
    return tuple(x[: spec.size] if j in spec.rows else x for j, x in enumerate(data))


def configure(problem: EMProblem, params: dict, data: tuple, chunk_size) -> EMProblem:
    """`problem` chunked along its data plate in chunks of `chunk_size` rows (unchanged if
    `chunk_size` is None or at least the plate's size); refuses what chunking cannot do
    exactly, naming the sites."""
    from bayes_em.predict import _data_plate, _plate_size

    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is None:
        return problem
    if problem.hard:
        raise ValueError("chunk_size does not combine with hard=True: the max-product's "
                         "tie-breaks are drawn over the whole data. Fit without chunk_size.")
    if problem.accelerate:
        raise ValueError("chunk_size does not combine with accelerate=True (SQUAREM).")
    metas = jax.eval_shape(lambda p, d: factors(problem, p, d), params, data).metas
    plate = _data_plate(metas, problem.sites.observed, problem.sites.plate_order)
    if plate is None:
        raise ValueError("chunk_size needs a data plate (a plate shared by every observed "
                         "site); this model has none.")
    n = _plate_size(metas, plate)
    if n is None or chunk_size >= n:  # None: a plate of size 1 has no dim
        return problem
    map_sites = _map_sites(problem)
    inside = sorted(m.name for m in metas if m.name in problem.sites.param_names
                    and plate in m.plates)
    if inside:
        raise ValueError(f"chunk_size: the fitted sites {inside} lie in the data plate "
                         f"'{plate}' (one value per row); chunking needs every parameter "
                         "outside it.")
    outside = sorted(m.name for m in metas if m.name not in map_sites and plate not in m.plates)
    if outside:
        raise ValueError(
            f"chunk_size: the sites {outside} lie outside the data plate '{plate}': they couple "
            "its rows (or would be counted once per chunk), so the fit does not split into "
            "chunks of rows. Fit without chunk_size.")
    rows = tuple(j for j, x in enumerate(data) if jnp.ndim(x) >= 1 and jnp.shape(x)[0] == n)
    spec = Chunks(plate, int(n), chunk_size, rows)
    chunked = problem._replace(chunks=spec)
    sliced, leaves, _ = _slice(chunked, data, 0)
    got = _plate_size(jax.eval_shape(lambda p, d: factors(sliced, p, d), params, leaves).metas,
                      plate)
    if got != chunk_size:
        raise ValueError(f"chunk_size: the data plate '{plate}' does not follow the leading axis "
                         "of the data arrays (a chunk of them gave a plate of size "
                         f"{got}, not {chunk_size}); pass the data with the plate's rows first.")
    return chunked


def stages(plans: tuple) -> tuple:
    """The plans grouped in order into stages: a plan opens a new stage when one of its sites
    reads a parameter updated earlier in the stage."""
    out, current, read = [], [], set()
    for plan in plans:
        if current and set(plan.sites) & read:
            out.append(tuple(current))
            current, read = [], set()
        current.append(plan)
        read |= set(plan.users) | set(plan.sites)
    if current:
        out.append(tuple(current))
    return tuple(out)


def with_stages(problem: EMProblem) -> EMProblem:
    """Record how the closed forms get their statistics: all from the E-pass (additive
    statistics), else the first stage of `problem.closed` from it and a pass per later stage."""
    if problem.chunks is None or not problem.closed:
        return problem
    try:
        return problem._replace(chunks=problem.chunks._replace(
            layout=additive.layout(problem.closed)))
    except ValueError:
        first = stages(problem.closed)[0]
        return problem._replace(chunks=problem.chunks._replace(first_stage=first))


def _sum_over_chunks(problem, fn):
    """Σ_i fn(i) over the chunks, one at a time. Where fn holds float32 Gaussian expansions
    (`gaussian.expansion_cond`), whether they fit is decided once for all chunks: a first
    loop evaluates only their conditions (XLA drops the rest of fn), then the pass runs with
    the expansion everywhere or with the exact form everywhere."""
    conditions = []
    with expansion_choice(conditions):
        shapes = jax.eval_shape(fn, jnp.zeros((), jnp.int32))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    n = problem.chunks.n_chunks

    def total():
        return lax.fori_loop(0, n, lambda i, acc: jax.tree.map(jnp.add, acc, fn(i)), init)

    if not conditions:
        return total()

    def fits(i, ok):
        found = []
        with expansion_choice(found):
            fn(i)
        return ok & jnp.all(jnp.stack(found))

    def choose(choice):
        def run():
            with expansion_choice(choice):
                return total()
        return run

    return lax.cond(lax.fori_loop(0, n, fits, jnp.asarray(True)), choose(True), choose(False))


def _chunk_e_step(problem, params, data, i):
    """Chunk i: its problem, data, log Z (MAP priors left out), weights and factors."""
    sliced, leaves, lo = _slice(problem, data, i)
    fs = factors(sliced, params, leaves, vectorized=True)
    drop = _map_sites(problem)
    fs = fs.select([m.name for m in fs.metas if m.name not in drop])
    log_z, weights = posterior_weights(fs, "sum", problem.parallel_time)
    return sliced, leaves, lo, log_z, weights, fs.metas


def _stats(sliced, plans, params, weights, leaves):
    args, kwargs = sliced.rebuild(leaves)
    return {plan.param: plan_stats(sliced, plan, params, weights, args, kwargs)
            for plan in plans}


def _whole(problem):
    return problem._replace(chunks=None)


def _log_prior(problem, params, data):
    """log p(θ) from the whole data's trace (only the MAP priors' factors are evaluated)."""
    if not _map_sites(problem):
        return jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
    return log_prior(problem, factors(_whole(problem), params, data, vectorized=True))


def _references(problem, params, data):
    """The Gaussian statistics' references at θ (`additive.references`, from chunk 0)."""
    sliced, leaves, _ = _slice(problem, data, 0)
    args, kwargs = sliced.rebuild(leaves)
    return additive.references(problem.chunks.layout, params,
                               _trace(sliced.enum_model, params, args, kwargs))


def _additive_stats(problem, params, data, i, reference):
    """Chunk i's log Z and raw statistics at θ = `params`, about `reference`. A shared centre
    is the chunk's own data mean first (the one its Gaussian log-densities expand about, so
    XLA forms the chunk's x ⊗ x once for both), moved to `reference` after the sums."""
    sliced, leaves, _, log_z, weights, _ = _chunk_e_step(problem, params, data, i)
    args, kwargs = sliced.rebuild(leaves)
    tr = _trace(sliced.enum_model, params, args, kwargs)
    lay = problem.chunks.layout
    local = additive.references(lay, params, tr)
    stats = additive.stats(sliced, lay, params, weights, local, args, kwargs, tr)
    return log_z, additive.recentre(lay, stats, local, reference)


def e_pass(problem: EMProblem, params: dict, data: tuple) -> tuple:
    """`(log Z, log p(θ), stats)` at θ = `params`: one pass over the chunks; `stats` are
    the closed-form statistics at θ (the state's `weights`): every plan's additive ones, or
    the first stage's."""
    first = problem.chunks.first_stage
    if problem.chunks.layout is not None:
        reference = _references(problem, params, data)
        one = lambda i: _additive_stats(problem, params, data, i, reference)  # noqa: E731
    else:
        def one(i):
            sliced, leaves, _, log_z, weights, _ = _chunk_e_step(problem, params, data, i)
            return log_z, _stats(sliced, first, params, weights, leaves)

    log_z, stats = _sum_over_chunks(problem, one)
    lp = _log_prior(problem, params, data)
    return log_z + lp.astype(log_z.dtype), lp.astype(log_z.dtype), stats


def _priors(problem, plans, params, data):
    """Plan param -> its prior, from the whole data's trace (XLA keeps only the priors)."""
    if not any(plan.prior for plan in plans):
        return {}
    args, kwargs = problem.rebuild(data)
    tr = _trace(problem.enum_model, params, args, kwargs)
    return {plan.param: plan_prior(plan, tr) for plan in plans if plan.prior}


def _apply(problem, plans, params, stats, data):
    """The plans' new values from their summed statistics."""
    params, priors = dict(params), _priors(problem, plans, params, data)
    for plan in plans:
        params[plan.param] = plan_value(plan, params[plan.param], stats[plan.param],
                                        priors.get(plan.param))
    return params


def _additive_step(problem, params, data, carried):
    """Every closed form from the additive statistics at θ_t (`carried`, else one pass)."""
    reference = _references(problem, params, data)
    if carried is None:
        carried = _sum_over_chunks(
            problem, lambda i: _additive_stats(problem, params, data, i, reference))[1]
    priors = _priors(problem, problem.closed, params, data)
    return additive.m_step(problem.chunks.layout, params, carried, reference, priors)


def closed_form_step(problem: EMProblem, params: dict, data: tuple, carried=None) -> dict:
    """The closed-form updates from θ_t = `params`, stage by stage (`carried`: the first
    stage's statistics at θ_t, else a pass computes them)."""
    if problem.chunks.layout is not None:
        return _additive_step(problem, params, data, carried)
    theta_t = params
    for k, stage in enumerate(stages(problem.closed)):
        if k == 0 and carried is not None and stage == problem.chunks.first_stage:
            stats = carried
        else:
            current = params

            def one(i, stage=stage, current=current):
                sliced, leaves, _, _, weights, _ = _chunk_e_step(problem, theta_t, data, i)
                return _stats(sliced, stage, current, weights, leaves)

            stats = _sum_over_chunks(problem, one)
        params = _apply(problem, stage, params, stats, data)
    return params


def m_step(problem: EMProblem, params: dict, carried: dict, data: tuple) -> dict:
    """θ_{t+1}: the closed forms stage by stage, then L-BFGS on Q + log p over the numeric
    sites, Q and its gradient summed over the chunks (weights recomputed at θ_t)."""
    theta_t = params
    closed = {c.param for c in problem.closed}
    if closed:
        params = closed_form_step(problem, params, data, carried)
    numeric = {p.name: params[p.name] for p in problem.sites.params if p.name not in closed}
    if not numeric:
        return params
    fixed = params

    def value_and_grad(u):
        def one(i):
            sliced, leaves, _, _, weights, _ = _chunk_e_step(problem, theta_t, data, i)
            weights = lax.stop_gradient(weights)

            def q(u):
                logs = factors(sliced, {**fixed, **constrain(problem, u)}, leaves,
                               vectorized=True).logs
                return sum(jnp.sum(weights[k] * jnp.where(weights[k] > 0, logs[k], 0.0))
                           for k in weights)

            return jax.value_and_grad(q)(u)

        value, grad = _sum_over_chunks(problem, one)
        lp, glp = jax.value_and_grad(
            lambda u: _log_prior(problem, {**fixed, **constrain(problem, u)}, data))(u)
        return value + lp, jax.tree.map(jnp.add, grad, glp)

    @jax.custom_vjp
    def objective(u):
        return value_and_grad(u)[0]

    def forward(u):
        return value_and_grad(u)

    def backward(grad, ct):
        return (jax.tree.map(lambda g: ct * g, grad),)

    objective.defvjp(forward, backward)
    sub, _ = maximize(objective, unconstrain(problem, numeric), problem.solver)
    return {**params, **constrain(problem, sub)}


def symmetric_latents(problem: EMProblem, params: dict, data: tuple, rtol: float = 1e-6):
    """[`bayes_em.estep.symmetric_latents`][bayes_em.estep.symmetric_latents] summed over the chunks
    (one pass): whether two values of a latent have the same posterior wherever it has mass,
    compared by two fixed pseudo-random projections (`estep.projections`, each chunk's entries
    its own) of each value's weights; repeated rows masked out."""
    latents, plate = set(problem.sites.latents), problem.chunks.plate

    def one(i):
        _, _, lo, _, weights, metas = _chunk_e_step(problem, params, data, i)
        out = {}
        for m in metas:
            own = [d for d, n in m.dim_to_name if n == m.name]
            w = weights.get(m.name)
            if m.name not in latents or not own or w is None or jnp.ndim(w) != len(m.shape):
                continue
            if plate in m.names:  # a plate of size 1 has no dim (and no repeated row)
                d = m.names[plate]
                keep = jnp.arange(m.shape[d]) >= lo
                w = w * keep.reshape((m.shape[d],) + (1,) * (-d - 1)).astype(w.dtype)
            w = jnp.moveaxis(w, len(m.shape) + own[0], 0).reshape(m.shape[own[0]], -1)
            if w.shape[0] < 2:
                continue
            r = projections(w.shape[1], w.dtype, i * w.shape[1])  # per chunk: its own entries
            out[m.name] = w @ r.T  # (K, 2): positive where a value has mass
        return out

    found = jnp.zeros((), bool)
    for sig in _sum_over_chunks(problem, one).values():
        close = jnp.abs(sig[:, None, :] - sig[None, :, :]) <= rtol * jnp.maximum(
            sig[:, None, :], sig[None, :, :])
        pair = jnp.all(close, -1) & (sig[:, None, 0] > 0) & (sig[None, :, 0] > 0)
        found = found | jnp.any(pair & ~jnp.eye(sig.shape[0], dtype=bool))
    return found
