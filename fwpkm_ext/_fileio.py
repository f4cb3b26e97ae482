"""Crash-safe writing and integrity checks of the package's ``torch.save`` files (memory states,
stream snapshots).

- ``atomic_torch_save``: write to a uniquely named file beside the target, fsync it, then rename
  it over the target. A reader (or a crash, or a SIGKILL mid-write) sees the previous complete
  file or the new complete file, never a mix; two writers to one path never share a tmp file.
- ``seal`` / ``checksum_ok``: a sha256 over the payload's contents (every tensor's dtype, shape
  and bytes, every key and scalar), stored in the payload under ``CHECKSUM_KEY``. ``torch.load``
  does not notice every damaged byte (zip members are not CRC-checked on read, and a flipped
  byte inside tensor data unpickles fine), so loaders compare it to catch silent corruption.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import struct
from typing import Any, Dict

import torch

CHECKSUM_KEY = "sha256"


def _feed(h, obj: Any) -> None:
    """Hash ``obj`` in a canonical, unambiguous form (type tag and length before every item), so
    that two payloads hash alike exactly when they load as equal values."""
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):  # before int: bool is an int subclass
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        s = str(obj).encode()
        h.update(b"I%d:" % len(s) + s)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))  # the exact bits: -0.0, inf and nan included
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(b) + b)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        head = f"{t.dtype}|{tuple(t.shape)}".encode()
        h.update(b"T%d:" % len(head) + head)
        data = t.reshape(-1).view(torch.uint8).numpy()
        h.update(b"%d:" % data.nbytes)
        h.update(data)
    elif isinstance(obj, dict):
        # keys may be ints (layer indices) and strs: order by type, then value
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(b"D%d:" % len(items))
        for k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):  # torch.save keeps the type, but a tuple never matters
        h.update(b"L%d:" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        raise TypeError(f"payload: cannot checksum a {type(obj).__name__}")


def payload_sha256(payload: Dict[str, Any]) -> str:
    """sha256 (hex) of everything in ``payload`` but its own ``CHECKSUM_KEY`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def seal(payload: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of ``payload`` with its checksum added."""
    out = dict(payload)
    out[CHECKSUM_KEY] = payload_sha256(out)
    return out


def checksum_ok(payload: Dict[str, Any]) -> bool:
    """True when ``payload`` holds a checksum and it matches the contents."""
    stored = payload.get(CHECKSUM_KEY)
    if not isinstance(stored, str):
        return False
    try:
        return stored == payload_sha256(payload)
    except (TypeError, ValueError, RuntimeError):  # something no writer of ours puts in a file
        return False


def _fsync_dir(directory: str) -> None:
    # the rename is only durable once the directory entry is; not every platform allows it
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically and durably (see the module doc)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    while True:
        tmp = os.path.join(directory, f"{base}.{secrets.token_hex(6)}.tmp")
        try:
            # O_EXCL: a name no other writer holds; mode 0o666 lets the umask decide, as for
            # any new file (mkstemp would make it owner-only)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
