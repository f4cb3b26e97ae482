"""fwpkm_ext: Fast-weight Product Key Memory with native sparse kernels."""
from ._native import build_info
from . import ops  # registers the torch.library ops
from .functional import flush_state, fwpkm_memory, gather, memory_read, memory_step, product_key_topk
from .layers import FwPKM, PKM, RMSNorm, param_groups, telemetry
from .state import MemoryConfig, MemoryState

__version__ = build_info()["version"]
__all__ = [
    "FwPKM", "PKM", "RMSNorm", "MemoryConfig", "MemoryState", "build_info", "flush_state",
    "fwpkm_memory", "gather", "memory_read", "memory_step", "param_groups", "product_key_topk", "telemetry",
    "__version__",
]
