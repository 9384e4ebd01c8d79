"""Pure float64 math of the complete recipe: no torch.nn, no config objects, no image shapes."""
from . import blocks, kernels
from .recipe import HSMKernel, RecipeSDE

__all__ = ["RecipeSDE", "HSMKernel", "blocks", "kernels"]
