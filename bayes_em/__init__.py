"""bayes_em: Expectation-Maximisation for NumPyro models with discrete latent variables."""

import os as _os

from bayes_em.api import EM, AscentWarning, ClosedFormWarning, ConvergenceWarning, EMResult, Status
from bayes_em.compiled import CACHE_ENV as _CACHE_ENV
from bayes_em.compiled import compilation_cache
from bayes_em.lbfgs import LBFGS
from bayes_em.online import OnlineEM
from bayes_em.sites import ModelError

__version__ = "0.1.0"
__all__ = ["EM", "EMResult", "OnlineEM", "Status", "LBFGS", "ModelError", "AscentWarning",
           "ClosedFormWarning", "ConvergenceWarning", "compilation_cache"]

if _os.environ.get(_CACHE_ENV):
    compilation_cache()
