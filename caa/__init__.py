"""caa: Contrastive Activation Addition, from contrastive pairs to steered generation.

The Python API (in memory; every value saves the file the command line writes)::

    import caa

    model = caa.load_model("smollm2-135m")
    pairs = caa.ingest("data/sentiment.jsonl")                  # PairSet
    acts = caa.extract(model, pairs, caa.ExtractOptions(layers=(12, 18)))        # Activations
    vectors = caa.compute_vectors(acts)                                          # VectorSet
    result = caa.sweep(model, vectors, pairs, caa.SweepOptions(max_pairs=20))    # SweepResult
    gens = caa.generate(model, vectors, ["Hi."], caa.GenerateOptions(layer=18))  # Generations
    with caa.steer(model, vectors, layer=18, multiplier=2.0):    # steer any forward pass
        ...

This module only names things: the functions are :mod:`caa.api`'s, the values live in the packages
that make them (``caa.stages``, ``caa.models``, ...), and no name here shadows a module.
"""

import gc as _gc
import importlib.metadata as _metadata

# These imports bring in torch, pandas and pyarrow: hundreds of thousands of long-lived objects, which
# the cyclic garbage collector would scan over and over while they are made (a tenth of the import
# time). It is paused meanwhile, and left as it was.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from caa.api import compute_vectors, extract, generate, ingest, load_model, steer, sweep
    from caa.core.hooks import steering
    from caa.errors import CaaError, InputError, MismatchError, ModelError, OptionError
    from caa.models.loading import LoadedModel, decoder_blocks
    from caa.stages.extract import Activations
    from caa.stages.generate import Generations
    from caa.stages.ingest import PairSet
    from caa.stages.options import ExtractOptions, GenerateOptions, IngestOptions, SweepOptions
    from caa.stages.pair_rows import Pair
    from caa.stages.sweep import SweepResult
    from caa.stages.vectors import VectorSet
finally:
    if _collecting:
        _gc.enable()

try:
    __version__ = _metadata.version("caa")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = [
    "Activations",
    "CaaError",
    "ExtractOptions",
    "GenerateOptions",
    "Generations",
    "IngestOptions",
    "InputError",
    "LoadedModel",
    "MismatchError",
    "ModelError",
    "OptionError",
    "Pair",
    "PairSet",
    "SweepOptions",
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
