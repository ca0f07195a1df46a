"""The fit as pure functions: the problem from a model and its data, the restarts' starts, and
the one compiled program that runs them all (`EM` is a thin object over these).

    problem, params0, data = build(model, x, options=Options(max_iter=200))
    states = jax.jit(program(problem, options))(params0, data, jax.random.PRNGKey(0))

`states` is an `bayes_em.em.EMState` with a leading restart axis and no E-step
weights (`weights={}`: N-sized, they stay inside the program); `em.run` on one state is
the EM loop alone.

Data sharded over a mesh (`jax.sharding`) is fitted data-parallel by XLA's partitioner: the
engine's programs are written for automatic partitioning, so [`on_mesh`][bayes_em.fit.on_mesh]
relabels the data's mesh with `Auto` axes (no copy) and [`mesh_context`][bayes_em.fit.mesh_context]
runs the programs under it (`jax.set_mesh`). See `docs/distributed.md`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bayes_em import chunked, fused
from bayes_em import em as core
from bayes_em.compiled import quick
from bayes_em.lbfgs import LBFGS
from bayes_em.sites import discover_sites, split_data
from bayes_em.validation import check_arguments

__all__ = ["Options", "build", "problem_for", "program", "on_mesh", "mesh_context"]


class Options(NamedTuple):
    """Settings of a fit (the static part of [`bayes_em.EM`][bayes_em.api.EM]'s arguments)."""

    restarts: int = 1
    init: Any = "anchors"  # "anchors", "noise", or init(rng_key, params) -> dict
    max_iter: int = 500
    tol: float = 1e-8
    hard: bool = False
    strict: bool = False
    mstep: LBFGS = LBFGS()
    closed_form: bool = True
    accelerate: bool = False
    record_params: bool = False
    parallel_time: bool = False
    restart_noise: float = 1.0
    memory_limit: float = 2 * 2**30
    chunk_size: int | None = None  # rows of the data plate per chunk (bayes_em.chunked)


def _auto(mesh: Mesh) -> Mesh:
    """`mesh` with every axis `Auto` (sharding propagated by XLA, not typed by JAX)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def _mesh_of(leaf):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.Array) and isinstance(sharding, NamedSharding):
        return sharding.mesh  # one device too: its axes may be Explicit
    return None


def _relabel(leaf, mesh: Mesh):
    """`leaf` on `mesh` (the same devices, axes typed `Auto`): its shards as they are,
    no copy, so that it works for an array whose shards live on other processes too; a leaf on
    one device (a key, an initial value) is replicated over the mesh."""
    if _mesh_of(leaf) is None:
        if not isinstance(leaf, jax.Array):
            return leaf
        if mesh.is_multi_process:  # a host copy: the programs take it as replicated (the same
            return np.asarray(leaf)  # value in every process, as SPMD requires)
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))
    sharding = leaf.sharding
    if sharding.mesh == mesh:
        return leaf
    target = NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)
    return jax.make_array_from_single_device_arrays(
        leaf.shape, target, [shard.data for shard in leaf.addressable_shards])


def on_mesh(tree) -> tuple:
    """`(tree, mesh)`: every `jax.Array` in `tree` (the model's arguments, the key,
    initial values) sharded over a mesh (`NamedSharding`) relabelled onto that mesh with
    `Auto` axes, and that mesh (None when every array is on one device). The engine's
    programs then run data-parallel under automatic partitioning (XLA inserts the all-reduces
    of the statistics), whatever the axis types the data came with (`jax.make_mesh`'s default
    `Explicit` included)."""
    leaves, treedef = jax.tree.flatten(tree)
    meshes = {_auto(m) for m in map(_mesh_of, leaves) if m is not None}
    if not meshes:
        return tree, None
    if len(meshes) > 1:
        raise ValueError(f"The model's arguments are sharded over different meshes {meshes}: "
                         "put every sharded argument on one mesh.")
    mesh = meshes.pop()
    return jax.tree.unflatten(treedef, [_relabel(leaf, mesh) for leaf in leaves]), mesh


def devices_of(data) -> int:
    """The number of devices the data leaves are spread over (1 unless sharded)."""
    meshes = [m for m in map(_mesh_of, jax.tree.leaves(data)) if m is not None]
    return max((m.size for m in meshes), default=1)


def mesh_context(mesh: Mesh | None):
    """The context the engine's programs are traced and run in: `jax.set_mesh(mesh)` (the
    data's mesh with `Auto` axes from [`on_mesh`][bayes_em.fit.on_mesh]); for data on one device, no
    mesh (a mesh the caller set with `jax.set_mesh` does not apply to them)."""
    if mesh is None and jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


def problem_for(model: Callable, sites, rebuild: Callable, data: tuple,
                options: Options) -> core.EMProblem:
    """The static problem of `model` (sites already discovered), with its closed-form plans
    (decided at the sites' initial values)."""
    problem = core.make_problem(model, sites, rebuild, options.max_iter, options.tol,
                                options.hard, options.strict, options.mstep)
    problem = problem._replace(accelerate=options.accelerate,
                               record_params=options.record_params,
                               parallel_time=options.parallel_time)
    init = {p.name: p.init for p in sites.params}
    problem = chunked.configure(problem, init, data, options.chunk_size)
    if options.closed_form:
        from bayes_em.conjugate import detect_closed_forms

        args, kwargs = rebuild(chunked.head(problem, data))  # chunked: its first chunk
        closed, refused = detect_closed_forms(problem, init, args, kwargs)
        problem = problem._replace(closed=closed, refused=refused)
    problem = chunked.with_stages(problem)
    if quick(*data):  # a small fit: the two-pass iteration traces and compiles less
        return problem
    return fused.configure(problem, init, data, _block_rows(data))


def _block_rows(data: tuple) -> int | None:
    """Rows per block of a one-pass iteration (`bayes_em.fused`): blocks on one CPU device
    (they keep a block's intermediates in cache; None: sized by `fused.BLOCK_BYTES`); 0 (at
    once) on accelerators or sharded data."""
    platforms = {d.platform for x in jax.tree.leaves(data) if isinstance(x, jax.Array)
                 for d in x.devices()}
    if devices_of(data) > 1 or (platforms or {jax.default_backend()}) != {"cpu"}:
        return 0
    return fused.BLOCK_ROWS


def build(model: Callable, *args, options: Options = Options(), init_values: dict | None = None,
          rng_key=None, **kwargs) -> tuple:
    """`(problem, params0, data)` for `model(*args, **kwargs)`: the data checked and split
    into array leaves, the sites discovered (`init_values` override their starts), the
    enumeration's size checked against `options.memory_limit`. Sharded data come back on
    their mesh with `Auto` axes ([`on_mesh`][bayes_em.fit.on_mesh]): run the program under
    `mesh_context(mesh)` where a `jax.set_mesh` of your own is active."""
    from bayes_em.checks import check_enumeration

    check_arguments(args, kwargs)
    (args, kwargs), mesh = on_mesh((args, kwargs))
    with mesh_context(mesh):
        data, rebuild, _ = split_data(args, kwargs)
        rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        sites = discover_sites(model, args, kwargs, dict(init_values or {}), rng_key, {})
        params0 = {p.name: p.init for p in sites.params}
        bare = core.make_problem(model, sites, rebuild, options.max_iter, options.tol,
                                 options.hard)
        checked = chunked.head(chunked.configure(bare, params0, data, options.chunk_size), data)
        check_enumeration(bare, params0, checked, options.memory_limit, devices_of(data))
        return problem_for(model, sites, rebuild, data, options), params0, data


def _draw(problem, options, params0, data, key):
    """A random start (restarts after the first): `options.init` applied to `params0`."""
    init = options.init
    if callable(init):
        drawn = init(key, params0)
        unknown = sorted(set(drawn) - set(params0))
        if unknown:
            raise ValueError(f"init returned values for {unknown}, which are not fitted sites "
                             f"({sorted(params0)}).")
        return {**params0, **{n: jnp.broadcast_to(jnp.asarray(v, jnp.result_type(params0[n])),
                                                  jnp.shape(params0[n]))
                              for n, v in drawn.items()}}
    return core.random_start(problem, params0, data, key, options.restart_noise, init)


def starts(problem: core.EMProblem, options: Options, params0: dict, data: tuple,
           rng_key, abstract=None) -> core.EMState:
    """Pending states of every restart (leading axis): restart 0 at `params0`, the others
    drawn by `options.init`; their first E-step is the loop's. `abstract`: the factors'
    shapes ([`bayes_em.em.abstract_factors`][bayes_em.em.abstract_factors]), if known."""
    if options.restarts == 1:
        return jax.tree.map(lambda x: x[None], core.pending(problem, params0, data, abstract))
    keys = jax.random.split(jax.random.fold_in(rng_key, 1), options.restarts)

    def one(i_key):
        i, k = i_key
        params = lax.cond(i == 0, lambda: params0,
                          lambda: _finite_or(_draw(problem, options, params0, data, k), params0))
        return core.pending(problem, params, data, abstract)

    return lax.map(one, (jnp.arange(options.restarts), keys))


def _finite_or(drawn: dict, params0: dict) -> dict:
    """A drawn start, each site that came out non-finite (an M-step under made-up weights on
    degenerate data: a zero scatter) at its declared value: a restart starts finite."""
    return {k: jnp.where(jnp.all(jnp.isfinite(v)), v, params0[k]) for k, v in drawn.items()}


def weights_at(problem: core.EMProblem, state: core.EMState, data: tuple) -> core.EMState:
    """`state` with its E-step weights, recomputed at its parameters (a state from
    [`program`][bayes_em.fit.program] comes without them)."""
    return state._replace(weights=core.e_step(problem, state.params, data)[2])


def fallback(problem: core.EMProblem, state: core.EMState, data: tuple) -> core.EMState:
    """A restart stopped by the guard, continued: the rejected iteration numerically, then the
    EM loop; returned without weights, as [`program`][bayes_em.fit.program] returns its states."""
    problem = fused.unfused(problem)  # the state holds E-step weights from here on
    state = core.fallback_step(problem, weights_at(problem, state, data), data)[0]
    return core.run(problem, state, data)._replace(weights={})


def program(problem: core.EMProblem, options: Options,
            show: Callable | None = None) -> Callable:
    """`fit(params0, data, rng_key) -> states`: the starts and every restart's EM loop, one
    program to `jax.jit`; the final states come without their E-step weights (`{}`:
    [`weights_at`][bayes_em.fit.weights_at] recomputes them where needed).
    `show(restart, n_iter, objective, stopped)`, if given, is called on the host about every 1% of
    `max_iter` and when a restart stops (a progress bar)."""
    every = max(1, options.max_iter // 100)

    def fit(params0, data, rng_key):
        # the factors' shapes and metas, traced once for every start and loop
        abstract = None if problem.chunks is not None else core.abstract_factors(
            problem, params0, data)

        def one(i_state):
            i, state = i_state
            report = None
            if show is not None:
                def report(s):
                    jax.debug.callback(show, i, s.n_iter, s.objective,
                                       s.status != core.RUNNING)
            # the E-step weights are N-sized (sharded with the data): they stay in the program
            return core.run(problem, state, data, report=report, every=every,
                            metas=None if abstract is None else abstract.metas)._replace(weights={})

        if options.restarts == 1:  # no loop over the restarts
            state = core.pending(problem, params0, data, abstract)
            return jax.tree.map(lambda x: x[None], one((jnp.zeros((), jnp.int32), state)))
        states = starts(problem, options, params0, data, rng_key, abstract)
        return lax.map(one, (jnp.arange(options.restarts), states))

    return fit
