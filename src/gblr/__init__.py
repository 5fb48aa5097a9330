"""gblr: learned Generalized Block Low-Rank structured layers for PyTorch.

The public API, in the order a user meets it::

    import gblr
    layer = gblr.GBLRLinear(768, 3072)                        # a drop-in for nn.Linear
    conv = gblr.GBLRConv2d(64, 128, 3, padding=1)             # a drop-in for nn.Conv2d
    report = gblr.convert_(model, gblr.ConvertConfig("gblr", budget=0.5))   # model surgery, in place
    result = gblr.compress_(model, "gblr", 0.5, allocation="global")       # one budget for the whole model
    fast = gblr.compact(model)                                # frozen inference form
    gblr.save(model, "out"); gblr.load("out", base_model)    # safetensors + JSON, no pickle

Training with structure learning: :mod:`gblr.train` (and the ``gblr`` command), the structure learner
and optimizer groups: :mod:`gblr.learn`, other structured families: :mod:`gblr.structured`.
"""

from .compact import CompactGBLRLinear, compact
from .compress import compress_
from .convert import ConvertConfig, convert_
from .fit import fit_gblr, structured_from_dense
from .io import load, save
from .learn import StructureLearner, param_groups
from .structured import GBLRConv2d, GBLRLinear, StructuredConv2d, StructuredLinear, make_structured

__all__ = [
    "GBLRLinear", "GBLRConv2d", "StructuredConv2d", "StructuredLinear", "make_structured", "structured_from_dense", "fit_gblr",
    "ConvertConfig", "convert_", "compress_", "compact", "CompactGBLRLinear", "save", "load",
    "StructureLearner", "param_groups",
]
__version__ = "0.1.0"
