"""fwpkm_ext: Fast-weight Product Key Memory with native sparse kernels."""
from ._native import build_info
from . import ops  # registers the torch.library ops
from .functional import fwpkm_memory, gather, product_key_topk

__version__ = build_info()["version"]
__all__ = ["build_info", "fwpkm_memory", "gather", "product_key_topk", "__version__"]
