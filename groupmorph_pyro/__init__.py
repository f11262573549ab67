"""groupmorph_pyro: deep group-wise variational diffeomorphic image registration as a Pyro program.

Layers (imports point one way): checks → spatial → priors / likelihoods / networks → group →
model (model and guides) → config → registration / train → io → cli.
"""
from .checks import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
