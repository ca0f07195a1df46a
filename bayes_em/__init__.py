"""bayes_em: Expectation-Maximisation for NumPyro models with discrete latent variables."""

from bayes_em.api import EM, AscentWarning, ClosedFormWarning, ConvergenceWarning, EMResult, Status
from bayes_em.lbfgs import LBFGS
from bayes_em.sites import ModelError

__version__ = "0.1.0"
__all__ = ["EM", "EMResult", "Status", "LBFGS", "ModelError", "AscentWarning", "ClosedFormWarning",
           "ConvergenceWarning"]
