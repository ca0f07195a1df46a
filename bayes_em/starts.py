"""Random starts: one M-step under posterior weights made up for the purpose.

A start must break the symmetry between the values of each latent: weights that are random per
row average out over many rows, every component gets the data mean, and EM stays at that
saddle. The default start anchors each latent value on a data row instead:

- **anchors** (default): for every latent with observed children, the rows of its plates (and
  time steps) get features from the children's values (standardised); K anchor rows are drawn by
  greedy k-means++ (Arthur & Vassilvitskii 2007, the seeding scikit-learn uses), and row r gets
  evidence −‖x_r − a_k‖² / 2h² for value k (h² the mean squared distance to the nearest anchor):
  posterior weights concentrated on neighbourhoods of the anchors. The weights are the
  marginals of one joint distribution (the model's latent factors times the evidence, the
  likelihood switched off), so they are consistent for any structure: mixtures, nested plates,
  Markov chains. Latents without observed children in a plate get Gumbel noise.
- **noise**: Gumbel noise of scale `noise` on every latent factor (the likelihood switched off).

Either way the start is one M-step from the declared values under those weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from bayes_em.estep import posterior_weights
from bayes_em.factors import FactorMeta, log_factors

__all__ = ["kmeans_plus_plus", "start_weights", "INITS"]

INITS = ("anchors", "noise")


def _row(x, i):
    """Row `i` (traced) of `x`. Under a mesh (data sharded over devices, see
    `fit.mesh_context`) as a masked sum over rows: `x[i]` would gather all of `x` onto
    every device, the sum is local plus an all-reduce of one row (exact: every other term is
    0). On one device, the plain index (the masked sum costs a pass over `x`)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x[i]
    return jnp.sum(jnp.where((jnp.arange(x.shape[0]) == i)[:, None], x, 0), axis=0)


def kmeans_plus_plus(x, k, rng_key):
    """Greedy k-means++ seeding: `k` rows of `x` (R, F), each drawn with probability ∝ its
    squared distance to the nearest one drawn before, the best of 2 + ⌊ln k⌋ candidates."""
    n_trials = 2 + int(math.log(k))
    keys = jax.random.split(rng_key, k)

    def dist2(c):
        return jnp.sum(jnp.square(x - c), -1)

    first = jax.random.randint(keys[0], (), 0, x.shape[0], dtype=jnp.int32)
    d2 = dist2(_row(x, first))
    idx = jnp.zeros(k, jnp.int32).at[0].set(first)

    def body(i, carry):
        idx, d2 = carry
        total = jnp.sum(d2)
        logits = jnp.where(total > 0, jnp.log(jnp.maximum(d2, 0.0)), 0.0)
        cand = jax.random.categorical(keys[i], logits, shape=(n_trials,))
        new = jnp.minimum(d2[None, :], jax.vmap(lambda c: dist2(_row(x, c)))(cand))
        best = jnp.argmin(jnp.sum(new, -1))
        return idx.at[i].set(cand[best].astype(jnp.int32)), new[best]

    idx, _ = lax.fori_loop(1, k, body, (idx, d2))
    return lax.map(lambda i: _row(x, i), idx)


def _features(children, values, row_names):
    """(R, F) features of the rows of `row_names` from the observed children's values, and the
    rows' sizes; None if a child does not carry every row dim."""
    blocks, sizes = [], None
    for child in children:
        dims = {n: d for d, n in child.dim_to_name}
        if not all(n in dims for n in row_names):
            return None
        value, event_dim = values[child.name]
        rank = len(child.shape)
        value = jnp.asarray(value)
        value = value.reshape((1,) * (rank + event_dim - value.ndim) + value.shape)
        axes = [rank + dims[n] for n in row_names]
        row_sizes = tuple(child.shape[rank + dims[n]] for n in row_names)
        shape = list(value.shape)
        for a, s in zip(axes, row_sizes):
            shape[a] = s
        value = jnp.broadcast_to(value, shape)
        value = jnp.moveaxis(value, axes, range(len(axes)))
        if sizes is not None and row_sizes != sizes:
            return None
        sizes = row_sizes
        blocks.append(value.reshape(math.prod(row_sizes), -1))
    x = jnp.concatenate(blocks, axis=1).astype(jnp.result_type(float))
    mean = jnp.nanmean(x, 0)
    sd = jnp.nanstd(x, 0)
    x = (x - mean) / jnp.where(sd > 0, sd, 1.0)
    return jnp.nan_to_num(x, nan=0.0), sizes


def _evidence(meta, metas, values, rng_key, dtype):
    """The anchor evidence factor for latent factor `meta`: `(FactorMeta, array)` or None."""
    own = {n: d for d, n in meta.dim_to_name}
    if meta.name not in own:
        return None
    k = meta.shape[len(meta.shape) + own[meta.name]]
    children = [m for m in metas if m.is_observed and m.name in values
                and meta.name in {n for _, n in m.dim_to_name}]
    row_names = tuple(n for _, n in sorted(meta.dim_to_name)
                      if n in meta.plates or n == meta.time)
    if not children or not row_names:
        return None
    found = _features(children, values, row_names)
    if found is None:
        return None
    x, sizes = found
    if x.shape[0] < 2:
        return None
    anchors = kmeans_plus_plus(x, k, rng_key)
    d2 = jnp.sum(jnp.square(x[:, None, :] - anchors[None]), -1)  # (R, K)
    h2 = jnp.mean(jnp.min(d2, 1)) + jnp.finfo(x.dtype).tiny
    ev = (-0.5 * d2 / h2).astype(dtype).reshape(sizes + (k,))
    child_dims = {n: d for child in children for d, n in child.dim_to_name}
    names = row_names + (meta.name,)
    dims = [child_dims[n] for n in row_names] + [own[meta.name]]
    order = sorted(range(len(names)), key=lambda i: dims[i])
    ev = jnp.transpose(ev, order)
    rank = -min(dims)
    shape = [1] * rank
    for i in order:
        shape[rank + dims[i]] = ev.shape[order.index(i)]
    ev = ev.reshape(shape)
    dim_to_name = tuple((dims[i], names[i]) for i in order)
    plates = frozenset(n for n in row_names if n in meta.plates)
    time = meta.time if meta.time in row_names else None
    return FactorMeta("@anchor:" + meta.name, dim_to_name, True, plates, tuple(shape), time), ev


def start_weights(enum_model, params, args, kwargs, latents, rng_key, init="anchors",
                  noise=1.0, parallel_time=False):
    """Posterior weights for a random start (see the module docstring): the likelihood switched
    off, anchor evidence (`init="anchors"`) or Gumbel noise on the latent factors."""
    fs, values = log_factors(enum_model, params, args, kwargs, vectorized=True,
                             observed_values=True)
    metas = fs.metas
    keys = jax.random.split(rng_key, 2 * len(metas))
    out, extra_metas = {}, []
    for i, meta in enumerate(metas):
        a = fs.logs[meta.name]
        if meta.is_observed:  # switched off (a · 0, not a constant XLA would fold)
            out[meta.name] = jnp.where(jnp.isfinite(a), a * 0.0, 0.0)
            continue
        out[meta.name] = a
        found = None
        if init == "anchors":
            found = _evidence(meta, metas, values, keys[2 * i], jnp.result_type(a))
        if found is not None:
            extra_metas.append(found[0])
            out[found[0].name] = found[1]
        elif meta.name in latents:
            out[meta.name] = a + noise * jax.random.gumbel(keys[2 * i + 1], a.shape, a.dtype)
    _, weights = posterior_weights(fs.replace(logs=out, metas=metas + tuple(extra_metas)), "sum",
                                   parallel_time)
    return {k: w for k, w in weights.items() if not k.startswith("@anchor:")}
