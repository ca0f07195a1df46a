"""Data-parallel fits (issue 15): data sharded over a mesh of (simulated) devices gives the
single-device fit, on ``jax.make_mesh``'s default mesh (``Explicit`` axes) and on an ``Auto``
mesh, with and without ``jax.set_mesh``; two processes under ``jax.distributed``, each passing
its own rows, give the one-process fit. Several devices need ``XLA_FLAGS`` before JAX starts:
each multi-device case runs in a subprocess that fits the single-device reference too."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_em import EM, fit

ROOT = pathlib.Path(__file__).resolve().parents[1]

PRELUDE = """
import contextlib, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[1]
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from numpyro.contrib.control_flow import scan
from bayes_em import EM, models


def hmm(ys, K, V):
    # a batch of sequences (S, T): the plate over sequences is the data-parallel axis
    init = numpyro.param("init", jnp.ones(K) / K, constraint=dist.constraints.simplex)
    trans = numpyro.param("trans", 0.5 * jnp.eye(K) + 0.5 / K,
                          constraint=dist.constraints.simplex)
    e = jnp.linspace(1.0, 2.0, K * V).reshape(K, V)
    emit = numpyro.param("emit", e / e.sum(-1, keepdims=True),
                         constraint=dist.constraints.simplex)
    n = ys.shape[0]
    with numpyro.plate("sequences", n, dim=-1):
        z0 = numpyro.sample("z0", dist.Categorical(init))
        numpyro.sample("y0", dist.Categorical(emit[z0]), obs=ys[:, 0])

    def step(z_prev, y):
        with numpyro.plate("sequences", n, dim=-1):
            z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
            numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    scan(step, z0, ys[:, 1:].T)


def problem(case):
    rng = np.random.default_rng(0)
    if case == "gmm":  # closed-form M-steps, random restarts (k-means++ anchors on rows)
        x = np.concatenate([rng.normal(m, 1.0, (500, 2)) for m in (-4.0, 0.0, 4.0, 8.0)])
        return EM(models.gmm, restarts=3, max_iter=15, tol=0, progress_bar=False), (x,), {"K": 3}
    if case == "numeric":  # coef and var by L-BFGS (no closed form), weights closed form
        N = 2000
        X = np.stack([np.ones(N), rng.normal(size=N)], 1)
        y = (np.where(rng.random(N) < 0.5, X @ [1.0, 2.0], X @ [-1.0, -0.5])
             + 0.3 * rng.normal(size=N))
        em = EM(models.mixture_of_regressions, restarts=2, max_iter=6, tol=0,
                progress_bar=False)
        return em, (X, y), {"K": 2}
    ys = rng.integers(0, 4, (64, 30))
    ys[:32] %= 2
    return EM(hmm, restarts=2, max_iter=15, tol=0, progress_bar=False), (ys,), {"K": 3, "V": 4}


def error(ref, res):
    err = max(float(np.max(np.abs(np.asarray(ref.params[k]) - np.asarray(res.params[k]))))
              for k in ref.params)
    hist = np.nanmax(np.abs(ref.history["objective"] - res.history["objective"]))
    return max(err, float(hist) / abs(ref.objective))
"""

MESHES = PRELUDE + """
em, args, kwargs = problem(sys.argv[2])
ref = em.run(jax.random.PRNGKey(0), *args, **kwargs)
ref_post = np.asarray(next(iter(ref.posterior.values())))
out = {}
for name, types in (("explicit", None), ("auto", (AxisType.Auto,))):
    mesh = (jax.make_mesh((4,), ("data",)) if types is None
            else jax.make_mesh((4,), ("data",), axis_types=types))
    sharded = tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args)
    for context in ("plain", "set_mesh"):
        with jax.set_mesh(mesh) if context == "set_mesh" else contextlib.nullcontext():
            res = em.run(jax.random.PRNGKey(0), *sharded, **kwargs)
            post = next(iter(res.posterior.values()))
        out[name + "/" + context] = dict(
            error=error(ref, res), status=str(res.status),
            posterior_error=float(np.max(np.abs(np.asarray(post) - ref_post))),
            posterior_sharded="data" in str(post.sharding.spec),
            posterior_devices=len(post.sharding.device_set))
print("RESULT " + json.dumps(dict(status=str(ref.status), out=out)))
"""

DISTRIBUTED = PRELUDE + """
port, pid = int(sys.argv[2]), int(sys.argv[3])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
em, (x,), kwargs = problem("gmm")
mesh = jax.make_mesh((4,), ("data",))  # 2 processes x 2 devices
n = len(x) // 2
xs = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                            x[pid * n:(pid + 1) * n])
res = em.run(jax.random.PRNGKey(0), xs, **kwargs)
post = res.posterior["z"]
# the single-process fit of all the rows, on this process's first device
with jax.default_device(jax.local_devices()[0]):
    ref = em.run(jax.random.PRNGKey(0), x, **kwargs)
local = np.concatenate([np.asarray(s.data) for s in sorted(
    post.addressable_shards, key=lambda s: s.index[0].start)])
post_err = float(np.max(np.abs(local - np.asarray(ref.posterior["z"])[pid * n:(pid + 1) * n])))
print("RESULT " + json.dumps(dict(
    pid=pid, error=error(ref, res), posterior_error=post_err, status=str(res.status),
    global_posterior=not post.is_fully_addressable, shape=list(post.shape))))
"""


def _run(script, *argv, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", [  # numeric and hmm (~18 s each) in the slow run (CI time)
    "gmm", pytest.param("numeric", marks=pytest.mark.slow),
    pytest.param("hmm", marks=pytest.mark.slow)])
def test_rows_sharded_over_four_devices_give_the_single_device_fit(case):
    """Rows (sequences for the HMM) sharded over 4 devices: EM.run unchanged, parameters and
    every iteration's objective equal the single-device fit's, the posterior stays a global
    array sharded like the data."""
    got = _result(_run(MESHES, 4, case))
    assert set(got["out"]) == {"explicit/plain", "explicit/set_mesh", "auto/plain",
                               "auto/set_mesh"}
    for variant, r in got["out"].items():
        assert r["error"] < 1e-9, (variant, r)
        assert r["posterior_error"] < 1e-9, (variant, r)
        assert r["status"] == got["status"], (variant, r)
        assert r["posterior_sharded"] and r["posterior_devices"] == 4, (variant, r)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_single_process_fit():
    """``jax.distributed`` on 127.0.0.1, 2 processes x 2 CPU devices, each passing its own rows
    (``jax.make_array_from_process_local_data``): EM.run ends (nothing N-sized fetched), its
    parameters equal the single-process fit's, and the posterior is a global array whose local
    rows are this process's."""
    port = _free_port()
    procs = [_run(DISTRIBUTED, 2, port, pid) for pid in (0, 1)]
    try:
        got = [_result(p, timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in got:
        assert r["error"] < 1e-9, r
        assert r["posterior_error"] < 1e-9, r
        assert r["global_posterior"] and r["shape"] == [2000, 3], r


def _mixture(x):
    import numpyro
    import numpyro.distributions as dist

    w = numpyro.param("w", jnp.ones(2) / 2, constraint=dist.constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def test_the_compiled_fit_returns_no_weights():
    """The program's final states carry no E-step weights (N-sized): parameters, statuses and
    histories only; ``weights_at`` recomputes them."""
    x = jnp.asarray(np.random.default_rng(0).normal([-2.0, 2.0], 1.0, (50, 2)).ravel())
    options = fit.Options(restarts=2, max_iter=20)
    problem, params0, data = fit.build(_mixture, x, options=options)
    states = jax.jit(fit.program(problem, options))(params0, data, jax.random.PRNGKey(0))
    assert states.weights == {}
    assert all(np.size(leaf) < x.size for leaf in jax.tree.leaves(states))
    one = jax.tree.map(lambda v: v[0], states)
    weights = fit.weights_at(problem, one, data).weights
    assert x.size in weights["z"].shape


def test_data_on_one_device_has_no_mesh():
    """Unsharded data (NumPy, a jax.Array on one device) is left as it is, and no mesh is set
    around the engine's programs."""
    x = np.arange(6.0)
    tree = ((x, jnp.asarray(x)), {"K": 2})
    out, mesh = fit.on_mesh(tree)
    assert mesh is None and out is tree


def test_a_nonfinite_restart_is_still_diagnosed():
    """A restart that ends non-finite is named as a collapse from E-step weights recomputed at
    its last finite parameters (the compiled fit no longer returns them)."""
    import numpyro
    import numpyro.distributions as dist

    def model(x):
        loc = numpyro.param("loc", jnp.array([0.0, 10.0]))
        scale = numpyro.param("scale", jnp.array([1.0, 1e-3]),
                              constraint=dist.constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("x", dist.Normal(loc[z], scale[z]), obs=x)

    x = jnp.array([-0.5, 0.0, 0.3, 0.7, 10.0])
    with pytest.warns(Warning):
        result = EM(model, max_iter=50, progress_bar=False).run(jax.random.PRNGKey(0), x)
    assert result.status == "collapsed"
    assert "site 'scale'[1]: its normal_scale update has no finite maximum" in result.message


def test_docs_recipe_mentions_the_pieces():
    text = (ROOT / "docs" / "distributed.md").read_text()
    for needed in ("jax.distributed.initialize", "make_array_from_process_local_data",
                   "NamedSharding", "all-reduce"):
        assert needed in textwrap.dedent(text), needed
