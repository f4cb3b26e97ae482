"""Large fast-weight tables: ask Linux for transparent huge pages before first touch.

A 512 MiB value table is 131,072 small pages; faulting them in dominated a table copy on CPU
(~0.4 s against ~0.14 s with huge pages on the development machine). Where madvise is not
available (other OS, CUDA tensors) these are plain torch calls.

Per-call buffers that an earlier call's buffer can serve (the rows a training step saves, the
PKM value gradient) come from `reusable` instead: a buffer an earlier call left is refilled, so
its pages are not faulted in again.
"""
from __future__ import annotations

import ctypes
import sys
import threading

import torch

_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_MIN_BYTES = 8 * _HUGE

try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None
    if _libc is not None:
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except OSError:  # pragma: no cover - no glibc
    _libc = None


def _advise(t: torch.Tensor) -> None:
    nbytes = t.numel() * t.element_size()
    if _libc is None or t.device.type != "cpu" or nbytes < _MIN_BYTES:
        return
    p = t.data_ptr()
    a = (p + _HUGE - 1) & ~(_HUGE - 1)
    e = (p + nbytes) & ~(_HUGE - 1)
    if e > a:
        _libc.madvise(a, e - a, _MADV_HUGEPAGE)  # advisory: failure just means small pages


def clone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    _advise(out)
    return out.copy_(t)


def zeros(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    _advise(out)
    return out.zero_()


_POOL = threading.local()  # per-thread buffers of `reusable`
_POOL_KEEP = 8  # buffers kept per thread
_POOL_KEEP_BYTES = 1 << 30


def _calibrated_use_count():
    """torch's storage use count, with the count of a storage nothing else holds, or None.

    The count is an internal API whose meaning moved between torch versions (whether the
    storage's own Python object counts). It is measured here with the idiom `_free` uses: a
    lone buffer reads `base`, and a view of it must read `base + 1`, dropped `base` again;
    otherwise pooling is off and every call allocates fresh."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None

    def read(t):
        return count(t.untyped_storage()._cdata)

    try:
        probe = torch.empty(4)
        base = read(probe)
        view = probe[1:]
        held = read(probe)
        del view
        if held != base + 1 or read(probe) != base:
            return None
    except Exception:  # pragma: no cover - an API change
        return None
    return read, base


_USE = _calibrated_use_count()


def _free(buf: torch.Tensor) -> bool:
    """Nothing but the pool holds buf's memory (a view saved by an autograd graph, a .grad, any
    other tensor on it adds to the count)."""
    return _USE is not None and _USE[0](buf) == _USE[1]


def reusable(shape, dtype, device, exact: bool = False) -> torch.Tensor:
    """An uninitialised CPU tensor, from a buffer of an earlier call that nothing holds any more
    (e.g. rows the previous training step saved for its backward, freed by that backward; the
    PKM value gradient of the previous step, freed by zero_grad(set_to_none=True)).

    Its pages are mapped already: a fresh 32 MiB buffer per call costs ~1 ms of page faults per
    4 MiB written on first touch (measured: filling it ~3x slower than a reused one). A buffer
    still held (a graph not yet run backward, a second layer of the same step) is never
    handed out; then a fresh one is allocated and kept for later calls. Of the free buffers
    that fit, the smallest is taken. Buffers are ordinary tensors even when the call runs under
    torch.inference_mode (an inference tensor could not be written or saved by a later
    training call). `exact`: only a buffer of exactly this size (an output the caller keeps: a
    small result must not hold a large buffer's memory, nor save it with torch.save)."""
    need = 1
    for s in shape:
        need *= int(s)
    if torch.device(device).type != "cpu" or _USE is None or need == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_POOL, "bufs", None)
    if pool is None:
        pool = _POOL.bufs = []
    with torch.inference_mode(False):
        free = [_free(b) for b in pool]
        fits = [b for b, f in zip(pool, free) if f and b.dtype == dtype and b.numel() >= need
                and (not exact or b.numel() == need)]
        if fits:
            return min(fits, key=lambda b: b.numel())[:need].view(shape)
        buf = torch.empty(need, dtype=dtype)
        nbytes = need * buf.element_size()
        if nbytes <= _POOL_KEEP_BYTES:
            # beyond the caps, forget free buffers first (held ones live on with their holder)
            kept = [b for b, f in zip(pool, free) if not f] + [b for b, f in zip(pool, free) if f]
            while kept and (len(kept) >= _POOL_KEEP or
                            sum(b.numel() * b.element_size() for b in kept) + nbytes > _POOL_KEEP_BYTES):
                kept.pop()
            pool[:] = kept + [buf]
        return buf.view(shape)
