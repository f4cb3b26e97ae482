"""The package's ``torch.save`` files (memory states, stream snapshots): one envelope, written
crash-safe and read with its integrity checked.

- ``write_sealed`` / ``read_sealed``: a dict payload tagged with its ``format`` and ``version``,
  sealed with a checksum and written atomically; read back with the format, the version, the
  entries that version may hold and the checksum checked (a ValueError starting with "path").

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
from typing import AbstractSet, Any, Dict, Mapping, Optional, Tuple

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


# --------------------------------------------------------------------------------------------
# The envelope
# --------------------------------------------------------------------------------------------
def write_sealed(payload: Dict[str, Any], path) -> None:
    """``payload`` (holding its ``format`` and ``version``) with its checksum, written atomically."""
    atomic_torch_save(seal(payload), path)


def is_version(version: Any) -> bool:
    """A version number: an int, and not a bool (True is not version 1)."""
    return isinstance(version, int) and not isinstance(version, bool)


def read_sealed(path, fmt: str, kind: str, versions: Mapping[int, AbstractSet[str]],
                checksum_since: Optional[int] = None) -> Tuple[Dict[str, Any], bool]:
    """Read a file of format ``fmt`` written by ``write_sealed`` and check its envelope: a dict of
    a readable version (the keys of ``versions``) holding only the entries that version may
    (``versions[v]``), with a checksum from version ``checksum_since`` on (older files have
    none). Returns ``(payload, intact)``; ``intact`` is False when the checksum does not match,
    and the caller says so (``damaged``) once it has checked the contents, so that a damaged
    file is reported by what is wrong with it. ``kind`` names the file in messages."""
    name = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, not a torch file, missing
        raise ValueError(f"path: {name!r} is not a readable fwpkm_ext {kind} ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"path: {name!r} is not a fwpkm_ext {kind}")
    version = payload.get("version")
    if not is_version(version) or version not in versions:
        newer = " (written by a newer fwpkm_ext)" if is_version(version) and version > max(versions) else ""
        raise ValueError(f"path: {name!r}: {kind} version {version!r} is not supported{newer} "
                         f"(this fwpkm_ext reads versions {sorted(versions)})")
    unknown = sorted(map(str, set(payload) - set(versions[version])))
    if unknown:
        # e.g. a damaged entry name, or a checksummed file whose version was damaged into an
        # older version's
        raise ValueError(f"path: {name!r} is damaged or not a valid version {version} {kind} "
                         f"(unknown entries {unknown})")
    if CHECKSUM_KEY not in payload:
        if checksum_since is not None and version >= checksum_since:
            raise ValueError(f"path: {name!r} is damaged: its checksum is missing")
        return payload, True
    return payload, checksum_ok(payload)


def damaged(path) -> ValueError:
    """The error for a file whose checksum does not match its contents."""
    return ValueError(f"path: {os.fspath(path)!r} is damaged: its checksum does not match its contents")
