"""fwpkm_ext: Fast-weight Product Key Memory with native sparse kernels."""
import torch as _torch  # noqa: F401  (before the extension: the import order _native always had)


def _extension_error(exc: ImportError) -> ImportError:
    """What to do when the compiled core does not import: most often Python was started in a
    source checkout (whose fwpkm_ext/ shadows the installed package) that was never built."""
    import glob
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    built = sorted(glob.glob(os.path.join(here, "_C.*.so")) + glob.glob(os.path.join(here, "_C.*.pyd")))
    kind = "a source tree" if os.path.isfile(os.path.join(root, "setup.py")) else "a directory"
    if built:
        what = (f"fwpkm_ext was imported from {here} ({kind}), whose compiled extension "
                f"{os.path.basename(built[0])} does not load ({exc}); it was probably built for "
                f"another Python or platform.")
    else:
        what = (f"fwpkm_ext was imported from {here} ({kind}), which has no compiled extension "
                f"(fwpkm_ext._C: {exc}).")
    return ImportError(
        f"{what} Either run Python from another directory, so that the installed fwpkm_ext is "
        f"imported instead, or build the extension in place, in {root}: `pip install -e .` "
        f"(an editable install) or `python setup.py build_ext --inplace`.", name="fwpkm_ext._C")


try:
    from . import _C  # noqa: F401  (the compiled core: everything below needs it)
except ImportError as _exc:
    raise _extension_error(_exc) from _exc

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
