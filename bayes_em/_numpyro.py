"""Every NumPyro and funsor internal bayes_em relies on, in one place, each with the reason.

NumPyro's enumeration machinery is written for its own `infer_discrete` / `TraceEnum_ELBO`;
bayes_em reuses it to build log-factor arrays it can differentiate. What is private or
version-specific is imported or touched here only, so a NumPyro or funsor upgrade that moves
something fails in this module, by name, instead of somewhere in the engine. The scan patch
checks itself at every use (`vectorized_scan`).
"""

from __future__ import annotations

import importlib

import funsor
import funsor.cnf
import funsor.einsum
import numpyro

# funsor's op registry (the unit of a product, the semirings) and its partition of factors
# into connected components (private), for the weighted-plate contraction
from funsor.ops import UNITS, add, logaddexp  # noqa: F401
from funsor.ops import max as max_op  # noqa: F401
from funsor.sum_product import _partition as partition  # noqa: F401
from funsor.sum_product import sum_product  # noqa: F401

# the enumeration handlers and the packed trace (dims named by funsor), as TraceEnum_ELBO uses
from numpyro.contrib.funsor import config_enumerate, enum, plate_to_enum_plate  # noqa: F401
from numpyro.contrib.funsor.enum_messenger import trace as packed_trace  # noqa: F401

# the Markov ("_PREV_") bookkeeping of NumPyro's enumerated scan: how far back a dim looks, and
# the factors that tie a chain's steps together (private / undocumented)
from numpyro.contrib.funsor.infer_util import _get_shift as get_shift  # noqa: F401
from numpyro.contrib.funsor.infer_util import compute_markov_factors  # noqa: F401

# switch NumPyro's argument validation off while tracing with enumerated (out-of-support) values
from numpyro.distributions.distribution import validation_enabled  # noqa: F401

__all__ = [
    "NUMPYRO_VERSION", "config_enumerate", "enum", "plate_to_enum_plate", "packed_trace",
    "get_shift", "compute_markov_factors", "validation_enabled", "UNITS", "add", "logaddexp",
    "max_op", "partition", "sum_product", "scan_module", "mask_of", "covariance_was_given",
    "control_flow_done", "install_log_einsum", "markov_site", "is_time_dim",
]

NUMPYRO_VERSION = numpyro.__version__

# NumPyro's scan module (the package re-exports a function of the same name): its enumerated
# scan calls ``lax.scan`` through the module's ``lax`` global, which ``vectorized_scan`` swaps
scan_module = importlib.import_module("numpyro.contrib.control_flow.scan")
if not hasattr(scan_module, "lax") or not hasattr(scan_module, "scan_wrapper"):
    raise ImportError(
        f"bayes_em needs numpyro.contrib.control_flow.scan to call lax.scan through its module "
        f"(numpyro 0.22); numpyro {NUMPYRO_VERSION} does not: pin numpyro==0.22.0"
    )


def markov_site(name) -> tuple:
    """`(site, shift)` of a dim or site name under NumPyro's Markov naming: `_PREV_z` is the
    value of `z` one step back (shift 1), `_PREV__PREV_z` two steps back; `z` has shift 0.
    The first steps of a `scan` are sites named so too."""
    shift = get_shift(name)
    return name[len("_PREV_") * shift:], shift


def is_time_dim(name) -> bool:
    """Is `name` the time dim of a `scan` (NumPyro names it `_time_<first site>`;
    `vectorized_scan` follows)?"""
    return name.startswith("_time")


def mask_of(fn):
    """The mask of a `MaskedDistribution` (None or True when nothing is masked)."""
    return getattr(fn, "_mask", None)


def covariance_was_given(fn) -> bool:
    """Was a `MultivariateNormal` built from `covariance_matrix` (not `scale_tril` or a
    precision)? NumPyro keeps the given argument in the instance and derives the others lazily."""
    return "covariance_matrix" in fn.__dict__


def control_flow_done(site) -> bool:
    """Is `site` a value replayed by NumPyro's `scan` after its body ran (not a new site)?"""
    return bool(site.get("_control_flow_done", False))


def _install():
    funsor.set_backend("jax")
    install_log_einsum()


def install_log_einsum():
    """Route funsor's JAX log-space contractions through
    [`bayes_em.log_einsum`][bayes_em.log_einsum] (a table entry of funsor's, set once at import;
    checked to exist)."""
    from bayes_em import log_einsum

    table = getattr(funsor.cnf, "BACKEND_TO_LOGSUMEXP_BACKEND", None)
    if not isinstance(table, dict) or "jax" not in table:
        raise ImportError(
            "bayes_em needs funsor.cnf.BACKEND_TO_LOGSUMEXP_BACKEND (funsor 0.4); this funsor "
            f"version ({funsor.__version__}) does not have it"
        )
    table["jax"] = log_einsum.__name__
    funsor.einsum.BACKEND_OPS[log_einsum.__name__] = (logaddexp, add)


# at import: funsor computes with JAX, its log-space contractions through bayes_em.log_einsum
_install()
