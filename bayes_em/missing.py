"""Missing values in observed sites: NaN entries marginalised out of the likelihood.

`EM(model, missing=("x", ...))` wraps the model in `marginalize_missing`, a NumPyro
effect handler. At every listed observed sample site it replaces the NaN entries of the data by a
placeholder inside the support (so that every density stays finite) and the site's distribution
by one whose log-density is the marginal over the missing entries:

- event_dim 0 (`Normal`, `Poisson`, `Categorical`, `Bernoulli`, ...): the missing entries
  are masked (`fn.mask(observed)`); for a leaf site, marginalising an entry is dropping its
  factor, since Σ_x p(x | ·) = 1.
- `Independent` of an event_dim-0 distribution (`Normal(loc, scale).to_event(1)`: a diagonal
  Gaussian): the missing coordinates are masked on the base distribution, then the event dims are
  reinterpreted again: their factors drop out of the product.
- `MultivariateNormal` (full covariance): `MissingMultivariateNormal`, the exact
  marginal log N(x_o; μ_o, Σ_oo) of the observed coordinates of every row.
- anything else: `NotImplementedError` naming the site and the distribution.

Dropping a missing entry is only right when no other site uses its value. `check_missing`
traces the wrapped model twice, with two different placeholders, and refuses a site whose
placeholder changes the log-density of another site (a Bayesian-network parent, an
autoregressive input): a discrete one should be written with `obs_mask=` (NumPyro then makes
the missing entries an enumerated latent); a continuous one cannot be enumerated.

NaNs at sites not listed keep raising the site check's error, so that accidental NaNs are caught.
"""

from __future__ import annotations

import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.primitives import Messenger

from bayes_em._numpyro import mask_of
from bayes_em.sites import ModelError, _placeholder

__all__ = ["MissingMultivariateNormal", "marginalize_missing", "check_missing"]

_LOG_2PI = float(np.log(2 * np.pi))


class MissingMultivariateNormal(dist.Distribution):
    """The marginal of a multivariate normal over the coordinates where `observed` is False.

    For a row x with observed coordinates o (mask m) and missing coordinates u,

        log p(x_o) = log N(x_o; μ_o, Σ_oo).

    Vectorised over rows with different patterns: let d = where(m, x − μ, 0) and Σ' be Σ with the
    missing rows and columns replaced by those of the identity. Σ' is block diagonal (Σ_oo and
    I_u, up to a permutation) and d vanishes on u, so dᵀΣ'⁻¹d = d_oᵀΣ_oo⁻¹d_o and
    log det Σ' = log det Σ_oo; hence

        log N(d; 0, Σ') = log N(x_o; μ_o, Σ_oo) − ½ · #missing · log 2π,

    and `log_prob` adds that term back. A row with every coordinate missing contributes 0.
    `loc`, the covariance and `observed` broadcast against each other (an enumerated latent
    may select `loc[z]` with z of shape (K, 1)); the value's missing coordinates are ignored.
    """

    arg_constraints = {}
    support = constraints.real_vector
    pytree_data_fields = ("loc", "covariance_matrix", "observed")

    def __init__(self, loc, covariance_matrix, observed, *, validate_args=None):
        D = jnp.shape(loc)[-1]
        self.loc = loc
        self.covariance_matrix = covariance_matrix
        self.observed = jnp.asarray(observed, bool)
        batch_shape = jnp.broadcast_shapes(
            jnp.shape(loc)[:-1], jnp.shape(covariance_matrix)[:-2], jnp.shape(self.observed)[:-1]
        )
        super().__init__(batch_shape, (D,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        """Draws of the full vector (the mask plays no role in sampling)."""
        full = dist.MultivariateNormal(self.loc, self.covariance_matrix)
        return full.expand(self.batch_shape).sample(key, sample_shape)

    def log_prob(self, value):
        m = self.observed
        D = self.event_shape[0]
        dtype = jnp.result_type(value, self.loc, self.covariance_matrix)
        d = jnp.where(m, value - self.loc, 0.0)
        both = m[..., :, None] & m[..., None, :]
        eye = jnp.eye(D, dtype=dtype)
        cov = jnp.where(both, self.covariance_matrix, eye)
        batch = jnp.broadcast_shapes(jnp.shape(d)[:-1], jnp.shape(cov)[:-2])
        cov = jnp.broadcast_to(cov, batch + (D, D))
        d = jnp.broadcast_to(d, batch + (D,))
        chol = jnp.linalg.cholesky(cov)
        y = solve_triangular(chol, d[..., None], lower=True)[..., 0]
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
        n_obs = jnp.sum(jnp.broadcast_to(m, batch + (D,)), -1).astype(dtype)
        return -0.5 * jnp.sum(y * y, -1) - half_logdet - 0.5 * n_obs * _LOG_2PI


def _peel(fn):
    """`(base, masks, expanded)`: the distribution below Masked / Expanded wrappers, the masks
    found on the way and whether a plate expanded it."""
    masks, expanded = [], False
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
        if isinstance(fn, dist.MaskedDistribution):
            masks.append(mask_of(fn))
        else:
            expanded = True
        fn = fn.base_dist
    return fn, masks, expanded


def _support_point(fn, which):
    """A value inside `fn`'s support (event_dim 0 entries): `which` = 0 or 1 picks one of
    two different ones (for the dependency check). Shape broadcastable to the batch shape."""
    support = fn.support
    if fn.has_enumerate_support:
        values = fn.enumerate_support(expand=False)
        return jnp.ravel(values[min(which, values.shape[0] - 1)])[0]
    if support.is_discrete:
        lower = getattr(support, "lower_bound", None)
        if lower is not None:
            upper = getattr(support, "upper_bound", None)
            value = jnp.asarray(lower) + which
            return value if upper is None else jnp.minimum(value, upper)
        return None
    try:
        return biject_to(support)(jnp.full((), float(which)))
    except (NotImplementedError, TypeError, ValueError):
        return None


def _filled(name, scalar_dist, value, missing, which):
    """`value` with its NaN entries replaced by a point of `scalar_dist`'s support."""
    fill = _support_point(scalar_dist, which)
    if fill is None:
        raise NotImplementedError(_unsupported(name, scalar_dist))
    filled = jnp.where(missing, fill, value)
    return filled.astype(jnp.result_type(int)) if scalar_dist.support.is_discrete else filled


def _marginal(name, fn, value, which):
    """`(fn', value')`: the distribution whose log_prob marginalises the NaN entries of
    `value`, and `value` with those entries replaced by a placeholder."""
    missing = jnp.isnan(value)
    base, masks, expanded = _peel(fn)
    if fn.event_dim == 0:
        return fn.mask(~missing), _filled(name, base, value, missing, which)
    observed = ~missing
    if isinstance(base, dist.Independent):
        inner, _, _ = _peel(base.base_dist)
        if inner.event_dim == 0:
            filled = _filled(name, inner, value, missing, which)
            new = base.base_dist.mask(observed).to_event(base.reinterpreted_batch_ndims)
            return _rewrap(new, fn, masks, expanded), filled
    if type(base) is dist.MultivariateNormal:
        filled = jnp.where(missing, jnp.zeros((), value.dtype) + which, value)
        new = MissingMultivariateNormal(base.loc, base.covariance_matrix, observed)
        return _rewrap(new, fn, masks, expanded), filled
    raise NotImplementedError(_unsupported(name, base))


def _rewrap(new, fn, masks, expanded):
    """Put back a plate's expansion and the masks of `fn` around `new`."""
    shape = jnp.broadcast_shapes(tuple(fn.batch_shape), tuple(new.batch_shape))
    if expanded or tuple(new.batch_shape) != shape:
        new = new.expand(shape)
    for m in reversed(masks):
        new = new.mask(m)
    return new


def _unsupported(name, fn):
    return (
        f"Observed site '{name}' is listed in missing=, but its distribution "
        f"{type(fn).__name__} (event_dim {fn.event_dim}) has no marginal over missing entries "
        "here: supported are distributions with event_dim 0 (Normal, Poisson, Categorical, ...), "
        "Independent of those (e.g. Normal(loc, scale).to_event(1)) and MultivariateNormal."
    )


class marginalize_missing(Messenger):
    """Effect handler: NaN entries of the observed sites `sites` are marginalised out.

    Each listed observed sample site gets the value with NaNs replaced by a placeholder in the
    support and a distribution whose log-density is the marginal over the NaN entries (see the
    module docstring). `which` (0 or 1) picks one of two placeholders; `check_missing`
    compares them. Sites with integer data (which holds no NaN) are left alone.
    """

    def __init__(self, fn=None, sites=(), which=0):
        self.sites = frozenset(sites)
        self.which = int(which)
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] not in self.sites or not msg["is_observed"]:
            return
        value = msg["value"]
        if not jnp.issubdtype(jnp.result_type(value), jnp.inexact):
            return
        msg["fn"], msg["value"] = _marginal(msg["name"], msg["fn"], jnp.asarray(value), self.which)


def _random_params(rng_key):
    """A substitute_fn: `numpyro.param` sites at a random point near their initial value (so
    that a child's density distinguishes its parent's values: a uniform conditional table would
    not), improper sites at a placeholder."""

    def fn(msg):
        if msg["type"] == "sample":
            return _placeholder(msg)
        if msg["type"] != "param":
            return None
        init = msg["args"][0] if msg["args"] else None
        if init is None or callable(init):
            return None
        constraint = msg["kwargs"].get("constraint", constraints.real)
        t = biject_to(constraint)
        u = t.inv(jnp.asarray(init))
        key = jax.random.fold_in(rng_key, zlib.crc32(msg["name"].encode()))
        u = u + 0.5 * jax.random.normal(key, jnp.shape(u), jnp.result_type(u))
        return t(u)

    return fn


def check_missing(model, sites, args, kwargs):
    """Refuse names in `sites` that are not observed sample sites of `model`, and observed
    sites whose missing entries another site uses (dropping their factor would be wrong there).

    `model` is the model before `marginalize_missing`; it is traced (eagerly, seeded,
    parameters at a random point near their initial values) with two different placeholders.
    """
    key = jax.random.PRNGKey(0)

    def run(which):
        wrapped = marginalize_missing(model, sites, which)
        model_ = seed(substitute(wrapped, substitute_fn=_random_params(key)), key)
        return trace(model_).get_trace(*args, **kwargs)

    tr0 = run(0)
    for name in sites:
        site = tr0.get(name)
        if site is None or site["type"] != "sample" or not site["is_observed"]:
            what = "no site" if site is None else (
                "a latent or parameter site" if site["type"] == "sample"
                else f"a {site['type']} site")
            raise ModelError(
                f"missing= names '{name}', which is {what} of the model; list observed sample "
                "sites (numpyro.sample with obs=) whose NaN entries are to be marginalised."
            )
    try:  # the raw model may not even trace with NaNs where a value is used: checked below
        raw = trace(seed(substitute(model, substitute_fn=_random_params(key)), key)).get_trace(
            *args, **kwargs)
    except Exception:
        raw = {}
    for name in sites:
        if name not in raw:
            continue
        value = np.asarray(raw[name]["value"])
        if value.size and np.issubdtype(value.dtype, np.floating) and np.isnan(value).all():
            raise ModelError(f"Observed site '{name}' listed in missing= has no observed value "
                             "(all NaN): there is nothing to fit it to.")
    tr1 = run(1)
    with warnings.catch_warnings():  # the data of other sites are checked later
        warnings.simplefilter("ignore")
        _refuse_used(sites, tr0, tr1)


def _refuse_used(sites, tr0, tr1):
    for name in sites:
        users = []
        for other, s0 in tr0.items():
            if other == name or s0["type"] != "sample" or other not in tr1:
                continue
            s1 = tr1[other]
            lp0 = np.asarray(s0["fn"].log_prob(s0["value"]))
            lp1 = np.asarray(s1["fn"].log_prob(s1["value"]))
            if lp0.shape != lp1.shape or not np.array_equal(lp0, lp1, equal_nan=True):
                users.append(other)
        if not users:
            continue
        if tr0[name]["fn"].support.is_discrete:
            raise ModelError(
                f"Observed site '{name}' is listed in missing=, but its missing entries are used "
                f"by site(s) {users}: dropping them is not marginalising them. Write that site "
                f"with obs_mask= instead (numpyro.sample('{name}', ..., obs=values, "
                "obs_mask=~isnan(values)) with a filler in place of the NaNs): NumPyro then "
                "makes the missing entries a discrete latent, which EM enumerates."
            )
        raise ModelError(
            f"Observed site '{name}' is listed in missing=, but its missing entries are used "
            f"by site(s) {users}: a continuous missing value that other sites depend on cannot "
            "be enumerated, so EM cannot marginalise it. Impute it, drop the incomplete rows, or "
            "make the dependency discrete."
        )
