"""The compression methods, one module each. Adding one = a new module + one line below."""

from selfcal.compression.methods.awq import AWQ
from selfcal.compression.methods.base import METHODS, CompressionMethod, RecipeContext
from selfcal.compression.methods.gptq import GPTQ
from selfcal.compression.methods.sparsegpt import SparseGPT
from selfcal.compression.methods.wanda import Wanda

for _method in (AWQ(), GPTQ(), SparseGPT(), Wanda()):
    METHODS.register(_method.name, _method)

__all__ = ["METHODS", "CompressionMethod", "RecipeContext"]
