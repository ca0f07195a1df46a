"""The scaled forward recursion (`bayes_em.baum_welch`) and its custom gradient against an explicit
sum over all state paths (numpy), including the cases where it falls back to the log domain."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from bayes_em.baum_welch import scaled_forward


def paths_and_logp(a0, const, m):
    """Every state path z_0..z_T and its log-weight."""
    T, K = m.shape
    paths = np.array(list(itertools.product(range(K), repeat=T + 1)))
    logp = a0[paths[:, 0]] + sum(const[paths[:, t], paths[:, t + 1]] + m[t, paths[:, t + 1]]
                                 for t in range(T))
    return paths, logp


def brute_force(a0, const, m, weights):
    """Σ_j w_j a_T(j) with a_T(j) = log Σ_{paths ending in j} exp(a0(z_0) + Σ_t C(z_{t-1}, z_t)
    + m_t(z_t)), and its gradient (the weighted posterior counts), by enumerating the paths;
    one chain (no batch dims)."""
    T, K = m.shape
    paths, logp = paths_and_logp(a0, const, m)
    d_a0, d_c, d_m, value = np.zeros(K), np.zeros((K, K)), np.zeros((T, K)), 0.0
    for j in range(K):
        end = paths[:, -1] == j
        if not end.any() or weights[j] == 0 or np.all(logp[end] == -np.inf):
            continue
        a_j = logsumexp(logp[end])
        value += weights[j] * a_j
        post = weights[j] * np.exp(logp[end] - a_j)
        np.add.at(d_a0, paths[end, 0], post)
        for t in range(T):
            np.add.at(d_c, (paths[end, t], paths[end, t + 1]), post)
            np.add.at(d_m[t], paths[end, t + 1], post)
    return value, (d_a0, d_c, d_m)


def ours(a0, const, m, weights, dtype=jnp.float64):
    def f(a0, const, m):
        a_last = scaled_forward(a0, const, m)
        # the weights as the cotangent of a_T, with exact zeros where w_j = 0
        return jnp.sum(jnp.where(weights > 0, weights * a_last, 0.0))

    args = [jnp.asarray(x, dtype) for x in (a0, const, m)]
    value, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(*args)
    return float(value), [np.asarray(g, np.float64) for g in grads]


def problem(rng, T=6, K=3):
    a0 = np.log(rng.dirichlet(np.ones(K)))
    const = np.log(rng.dirichlet(np.ones(K), size=K))
    m = rng.normal(size=(T, K))
    return a0, const, m


def softmax_weights(a0, const, m):
    """The cotangent logsumexp gives: the posterior of the last state (E-step), by brute force."""
    paths, logp = paths_and_logp(a0, const, m)
    post = np.exp(logp - logsumexp(logp))
    return np.bincount(paths[:, -1], post, minlength=m.shape[1])


def check(a0, const, m, weights, rtol=1e-10, dtype=jnp.float64, atol=1e-10):
    value, grads = ours(a0, const, m, weights, dtype)
    ref, ref_grads = brute_force(a0, const, m, weights)
    np.testing.assert_allclose(value, ref, rtol=rtol)
    for g, r in zip(grads, ref_grads):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


def test_value_and_posterior_counts_match_brute_force():
    rng = np.random.default_rng(0)
    a0, const, m = problem(rng)
    check(a0, const, m, softmax_weights(a0, const, m))


def test_any_cotangent_of_the_last_state():
    rng = np.random.default_rng(1)
    a0, const, m = problem(rng)
    check(a0, const, m, np.array([0.3, 2.0, 0.0]))


def test_zero_transitions_and_unreachable_state():
    rng = np.random.default_rng(2)
    a0, const, m = problem(rng, K=4)
    const[:, 3] = -np.inf  # state 3 is reached by no path after the first step
    const[0, 1] = -np.inf
    a0[3] = -np.inf
    check(a0, const, m, softmax_weights(a0, const, m))


def test_steps_that_underflow_fall_back_to_the_log_domain():
    rng = np.random.default_rng(3)
    a0, const, m = problem(rng)
    const[0, 0], const[1, 1] = -700.0, -900.0  # c_t far below the smallest normal
    m = m * 800.0
    check(a0, const, m, softmax_weights(a0, const, m), rtol=1e-9, atol=1e-9)


def test_float32_matches_float64_brute_force():
    rng = np.random.default_rng(4)
    a0, const, m = problem(rng, T=7)
    check(a0, const, m, softmax_weights(a0, const, m), rtol=2e-5, dtype=jnp.float32, atol=2e-5)


@pytest.mark.parametrize("seed", [5, 6])
def test_batch_dims_broadcast_like_separate_chains(seed):
    """Two sequences (batch dim 2) sharing the transition, one of them with weight 0 (a padding
    row): each sequence's value and gradients match brute force on it alone."""
    rng = np.random.default_rng(seed)
    T, K = 5, 3
    a0 = np.log(rng.dirichlet(np.ones(K), size=2))
    const = np.log(rng.dirichlet(np.ones(K), size=K))
    m = rng.normal(size=(T, 2, K))
    row_weight = np.array([1.0, 0.0])

    def f(a0, const, m):
        a_last = scaled_forward(a0, const[None], m)
        return jnp.sum(row_weight * jax.nn.logsumexp(a_last, -1))

    value, (d_a0, d_c, d_m) = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(a0, const, m)
    assert d_c.shape == (K, K)
    total_c = np.zeros((K, K))
    ref_value = 0.0
    for n in range(2):
        w = softmax_weights(a0[n], const, m[:, n])
        _, (g_a0, g_c, g_m) = brute_force(a0[n], const, m[:, n], w * row_weight[n])
        ref_value += row_weight[n] * logsumexp(paths_and_logp(a0[n], const, m[:, n])[1])
        total_c += g_c
        np.testing.assert_allclose(d_a0[n], g_a0, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(d_m[:, n], g_m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-12)
    np.testing.assert_allclose(d_c, total_c, rtol=1e-10, atol=1e-12)


def test_hessian_of_the_log_partition_matches_brute_force_differences():
    """Second derivatives go through the custom gradient (forward over reverse): against
    central differences of the brute-force gradient."""
    rng = np.random.default_rng(7)
    a0, const, m = problem(rng, T=4)

    def log_z(const):
        return jax.nn.logsumexp(scaled_forward(jnp.asarray(a0), const, jnp.asarray(m)))

    hess = np.asarray(jax.jit(jax.hessian(log_z))(jnp.asarray(const)))
    h = 1e-5
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        up, down = const.copy(), const.copy()
        up[i, j] += h
        down[i, j] -= h
        g_up = brute_force(a0, up, m, softmax_weights(a0, up, m))[1][1]
        g_down = brute_force(a0, down, m, softmax_weights(a0, down, m))[1][1]
        np.testing.assert_allclose(hess[:, :, i, j], (g_up - g_down) / (2 * h), atol=1e-6)
