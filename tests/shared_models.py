"""Models several test files use (imported by name: pytest puts tests/ on sys.path)."""

import contextlib

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints


@contextlib.contextmanager
def one_pass_in_blocks(rows=16):
    """Every fit that can take the one-pass iteration takes it, over blocks of `rows` rows (by
    default it does so past ~20000 rows only, far above what the property tests generate)."""
    from bayes_em import fit, fused

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit, "quick", lambda *a, **k: False)
        mp.setattr(fused, "BLOCK_ROWS", rows)
        yield


def categorical_hmm(ys, K, V):
    """An HMM with categorical emissions; z0 does not emit, z_1..z_T emit ys (uniform start)."""
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    emit = numpyro.param("emit", jnp.ones((K, V)) / V, constraint=constraints.simplex)

    def step(z_prev, y):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    z0 = numpyro.sample("z0", dist.Categorical(init))
    scan(step, z0, ys)


def full_gmm(x, K):
    """A full-covariance Gaussian mixture, every parameter a numpyro.param (ML)."""
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    cov = numpyro.param("cov", jnp.broadcast_to(jnp.eye(D), (K, D, D)),
                        constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], covariance_matrix=cov[z]), obs=x)


def diag_gmm(x, K):
    """A diagonal-covariance Gaussian mixture (standard deviations per component and column)."""
    D = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.zeros((K, D)))
    scale = numpyro.param("scale", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(loc[z], scale[z]).to_event(1), obs=x)


def padded_hmm_map(ys, mask, K, V):
    """Padded sequences (N, T): a plate over sequences, a scan over time, masks for padding."""
    init = numpyro.sample("init", dist.Dirichlet(jnp.full(K, 2.0)))
    with numpyro.plate("states", K):
        trans = numpyro.sample("trans", dist.Dirichlet(jnp.full(K, 2.0)))
        emit = numpyro.sample("emit", dist.Dirichlet(jnp.full(V, 1.5)))
    n_seq = ys.shape[0]
    with numpyro.plate("sequences", n_seq, dim=-1):
        z0 = numpyro.sample("z0", dist.Categorical(init))
        numpyro.sample("y0", dist.Categorical(emit[z0]), obs=ys[:, 0])

    def step(z_prev, y_m):
        y, m = y_m
        with numpyro.plate("sequences", n_seq, dim=-1), numpyro.handlers.mask(mask=m):
            z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
            numpyro.sample("y", dist.Categorical(emit[z]), obs=y)
        return z, None

    scan(step, z0, (ys[:, 1:].T, mask[:, 1:].T))
