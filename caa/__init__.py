"""caa: Contrastive Activation Addition, from contrastive pairs to steered generation.

The Python API is the same set of functions the command line uses::

    from caa import load_model, ingest
"""

from caa.errors import CaaError, InputError, MismatchError, ModelError
from caa.hooks import steer, steering
from caa.ingest import Pair, ingest
from caa.models import LoadedModel, decoder_blocks, load_model

__version__ = "0.1.0"

__all__ = [
    "CaaError",
    "InputError",
    "LoadedModel",
    "MismatchError",
    "ModelError",
    "Pair",
    "__version__",
    "decoder_blocks",
    "ingest",
    "load_model",
    "steer",
    "steering",
]
