"""Unchunked EM in one pass per iteration, where every parameter has a closed form with additive
statistics (`bayes_em.additive`: counts, rates, Gaussian locations with
their scales or covariances):

    E-pass at θ_t:  (log Z(θ_t), s_t = Σ_rows E[t(x, z) | x, θ_t])   (one program, no N-sized state)
    M-step:         θ_{t+1} = M(s_t)                                   (parameter-sized)

The raw statistics are read right after the E-step's weights, from the same trace and the same
hoisted data products (x ⊗ x about the data mean for float64 multivariate normals), so the
loop's state carries the statistics instead of the rows × components weights: no separate
M-step pass re-reading the data, and no N-sized select per iteration. The M-step is the batch
M-step's ECM order (locations, then covariances at the new locations): the same θ_{t+1}.

Where the rows of a data plate are independent given θ, the pass runs over blocks of rows
(chunked EM's one-pass iteration, `bayes_em.chunked`; on one CPU device, `fit._block_rows`) sized
to stay in cache (`BLOCK_BYTES`), equal where a divisor of the rows allows (no mask).

Used by [`bayes_em.em`][bayes_em.em] when the problem's `fused` plan is set
([`configure`][bayes_em.fused.configure]): soft EM, no SQUAREM, no chunks, no numeric M-step.
Whatever needs the weights themselves (the saddle check, diagnostics, the numeric fallback)
recomputes them at θ.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from bayes_em import additive, chunked
from bayes_em.conjugate import _trace, plan_prior
from bayes_em.estep import e_step
from bayes_em.problem import EMProblem

__all__ = ["Fused", "BLOCK_ROWS", "configure", "unfused", "e_pass", "m_step"]

# rows per block of the data plate: None, from `BLOCK_BYTES`; 0, the pass at once. On the 2-core
# VM a full-covariance mixture (N = 1e6, D = 8, K = 16, float64) took 161-173 ms per iteration
# in blocks of 8000 rows (9709 by the budget: 10000 equal blocks), 169 in blocks of 15625,
# 226 in blocks of 4000 (a block's fixed cost) and 190-295 at once
BLOCK_ROWS = None
# bytes of a block's row-sized intermediates (x ⊗ x packed, x, a few rows × components arrays),
# about what a core's L2 and its share of L3 hold; clamped to [1024, 16384] rows
BLOCK_BYTES = 8 << 20


class Fused(NamedTuple):
    """How the one-pass iteration runs."""

    layout: Any  # additive.Layout of the closed forms
    blocks: Any = None  # chunked.Chunks: the data plate in blocks of rows (None: at once)


def configure(problem: EMProblem, params: dict, data: tuple,
              block_rows: int | None = None) -> EMProblem:
    """`problem` with its `fused` plan where one pass per iteration gives the exact EM
    iteration: unchunked soft EM without SQUAREM, every parameter in closed form, every closed
    form with additive statistics (else unchanged). Where the rows of a data plate are
    independent given θ (chunked EM's conditions) the pass runs over blocks of `block_rows`
    rows (default `BLOCK_ROWS`, None: from `BLOCK_BYTES`; 0: at once)."""
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    closed = {plan.param for plan in problem.closed}
    if (problem.chunks is not None or problem.hard or problem.accelerate or not closed
            or any(p.name not in closed for p in problem.sites.params)):
        return problem
    try:
        lay = additive.layout(problem.closed)
    except ValueError:
        return problem
    if any(not g.multivariate and g.loc is None for g in lay.groups):
        # a Normal scale about a location not fitted: its raw statistics are formed per entry
        # and component (rows × components × D for a diagonal mixture: 3.4 GiB of temporaries
        # at N = 1e6, D = 8, K = 16); with the location fitted they are matrix products
        return problem
    if block_rows is None:
        block_rows = _block_rows(lay, params)
    blocks = None
    if block_rows:
        try:
            blocks = chunked.configure(problem, params, data, block_rows).chunks
        except ValueError:
            blocks = None
        if blocks is not None and blocks.n_rows % blocks.size:
            blocks = blocks._replace(size=_equal_blocks(blocks.n_rows, block_rows))
    return problem._replace(fused=Fused(lay, blocks and blocks._replace(layout=lay)))


def _block_rows(lay: additive.Layout, params: dict) -> int:
    """Rows per block from `BLOCK_BYTES`: per row, each Gaussian group's packed x ⊗ x, x and
    four arrays of its location (or covariance) rows' size; the counts and rates' own
    statistics are a few numbers per row."""
    itemsize = jnp.dtype(jnp.result_type(*params.values())).itemsize
    width = 1
    for g in lay.groups:
        value = jnp.asarray(params[(g.loc or g.spread).param])
        D = value.shape[-1] if value.ndim else 1
        rows = value.shape[0] if value.ndim > (1 if g.loc else 2) else 1
        width += D * (D + 1) // 2 + D + 4 * rows
    return int(np.clip(BLOCK_BYTES // (itemsize * width), 1024, 16384))


def _equal_blocks(n: int, target: int) -> int:
    """Rows per block for `n` rows and at most about `target`: as many blocks as `target` needs,
    as equal as possible, and a divisor of `n` (below `n`) within a factor 1.5 of that size where
    one exists, the nearest (equal blocks need no mask; otherwise chunked EM's last block
    repeats, masked, fewer rows than there are blocks)."""
    size = -(-n // -(-n // target))
    near = [d for d in range(max(1, int(size / 1.5)), min(int(size * 1.5), n - 1) + 1)
            if n % d == 0]
    return min(near, key=lambda d: abs(d - size)) if near else size


def unfused(problem: EMProblem) -> EMProblem:
    """`problem` with E-step weights in its state (for code that reads them)."""
    return problem._replace(fused=None)


def e_pass(problem: EMProblem, params: dict, data: tuple) -> tuple:
    """`(log Z, log p(θ), raw statistics)` at θ = `params`: the E-step, then every closed
    form's additive statistics under its weights."""
    if problem.fused.blocks is not None:
        return chunked.e_pass(_blocked(problem), params, data)
    params = {k: jnp.asarray(v) for k, v in params.items()}  # host arrays index like the model's
    log_z, lp, weights = e_step(problem, params, data)
    args, kwargs = problem.rebuild(data)
    tr = _trace(problem.enum_model, params, args, kwargs)
    lay = problem.fused.layout
    reference = additive.references(lay, params, tr)
    stats = additive.stats(problem, lay, params, weights, reference, args, kwargs, tr)
    return log_z, lp, stats


def m_step(problem: EMProblem, params: dict, stats: dict, data: tuple) -> dict:
    """θ_{t+1} from the raw statistics at θ_t = `params` (each plan's ML / conjugate MAP
    mode, in the batch M-step's order)."""
    if problem.fused.blocks is not None:  # the blocks' references (chunk 0's data mean)
        return chunked.closed_form_step(_blocked(problem), params, data, stats)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    args, kwargs = problem.rebuild(data)
    tr = _trace(problem.enum_model, params, args, kwargs)
    lay = problem.fused.layout
    reference = additive.references(lay, params, tr)
    priors = {plan.param: plan_prior(plan, tr) for plan in problem.closed if plan.prior}
    return additive.m_step(lay, params, stats, reference, priors)


def _blocked(problem: EMProblem) -> EMProblem:
    """The problem as chunked EM over the fused plan's blocks."""
    return problem._replace(chunks=problem.fused.blocks, fused=None)
