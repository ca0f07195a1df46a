"""No tracer leaks into a public result (issue 14): prior and constraint arguments given as
arrays are traced inside the compiled site discovery, and must come out as concrete values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from bayes_em import EM


def model(x):
    p = numpyro.sample("p", dist.Uniform(jnp.asarray(0.05), jnp.asarray(0.95)))
    q = numpyro.param("q", 0.5, constraint=constraints.interval(jnp.asarray(0.01),
                                                                jnp.asarray(0.99)))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Bernoulli(jnp.where(z == 1, p, q)), obs=x)


def tracers(obj, path="result", seen=None):
    """Paths of every JAX tracer reachable from ``obj`` (dataclass fields, named tuples, dicts,
    sequences, and pytree leaves such as a constraint's arguments)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, jax.core.Tracer):
        return [path]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = [(k, getattr(obj, k)) for k in obj._fields]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif isinstance(obj, (np.ndarray, jax.Array, str, int, float, type(None))) or callable(obj):
        return []
    else:
        leaves = jax.tree.leaves(obj)
        items = [] if leaves == [obj] else list(enumerate(leaves))
    found = []
    for key, value in items:
        found += tracers(value, f"{path}.{key}", seen)
    return found


def test_no_tracer_in_the_result():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, 40).astype(float))
    result = EM(model, max_iter=20, progress_bar=False).run(jax.random.PRNGKey(0), x)
    assert tracers(result) == []
    by_name = {p.name: p for p in result.sites.params}
    assert float(by_name["p"].constraint.lower_bound) == np.float32(0.05)
    assert float(by_name["q"].constraint.upper_bound) == np.float32(0.99)
    assert tracers(dict(result.mstep_paths)) == []
