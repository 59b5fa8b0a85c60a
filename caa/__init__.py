"""caa: Contrastive Activation Addition, from contrastive pairs to steered generation.

The Python API (in memory; every value saves the file the command line writes)::

    import caa

    model = caa.load_model("smollm2-135m")
    pairs = caa.ingest("data/sentiment.jsonl")                  # PairSet
    acts = caa.extract(model, pairs, layers=[12, 18])            # Activations
    vectors = caa.compute_vectors(acts)                          # VectorSet
    result = caa.sweep(model, vectors, pairs)                    # SweepResult
    gens = caa.generate(model, vectors, ["Hi."], layer=18)       # Generations
    with caa.steer(model, vectors, layer=18, multiplier=2.0):    # steer any forward pass
        ...
"""

import gc as _gc

# These imports bring in torch, pandas and pyarrow: hundreds of thousands of long-lived objects, which
# the cyclic garbage collector would scan over and over while they are made (a tenth of the import
# time). It is paused meanwhile, and left as it was.
_collecting = _gc.isenabled()
_gc.disable()
try:
    # caa.api imports the stage modules (caa.ingest, caa.extract, caa.sweep, caa.generate) before the
    # functions of the same names are bound here, so these names stay the functions.
    from caa.api import compute_vectors, extract, generate, ingest, sweep
    from caa.errors import CaaError, InputError, MismatchError, ModelError
    from caa.extract import Activations
    from caa.generate import Generations
    from caa.hooks import steer, steering
    from caa.ingest import Pair, PairSet
    from caa.models import LoadedModel, decoder_blocks, load_model
    from caa.sweep import SweepResult
    from caa.vectors import VectorSet
finally:
    if _collecting:
        _gc.enable()

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "CaaError",
    "Generations",
    "InputError",
    "LoadedModel",
    "MismatchError",
    "ModelError",
    "Pair",
    "PairSet",
    "SweepResult",
    "VectorSet",
    "__version__",
    "compute_vectors",
    "decoder_blocks",
    "extract",
    "generate",
    "ingest",
    "load_model",
    "steer",
    "steering",
    "sweep",
]
