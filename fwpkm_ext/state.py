"""The explicit streaming state of a FwPKM memory, its file format and its telemetry."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from ._fileio import CHECKSUM_KEY, damaged, is_version, read_sealed, write_sealed

STATE_FORMAT = "fwpkm_ext.MemoryState"
#: 2: a checksum over the contents, and the extras counters. Version 1 files still load.
STATE_VERSION = 2
_V1_KEYS = frozenset({"format", "version", "config", "per_sequence", "gate_sum", "tokens", "tensors"})
#: the top-level entries each readable version may hold
_STATE_KEYS = {1: _V1_KEYS, 2: _V1_KEYS | {"extras", CHECKSUM_KEY}}
#: the tensors of the tokens of the unfinished window (all present, or none)
PENDING_FIELDS = ("pending_q", "pending_v", "pending_g", "pending_mask", "pending_idx",
                  "pending_half_idx")


@dataclass(frozen=True)
class MemoryConfig:
    """Shapes and update rule a state belongs to (SPEC.md symbols)."""

    n_subkeys: int
    key_dim: int  # dk, per head
    value_dim: int  # dv
    heads: int
    topk: int
    chunk_size: int
    lookahead: int = 1
    lr: float = 1.0
    addr_loss_weight: float = 1.0
    score: str = "idw"
    eps: float = 1e-3

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def diff(self, other: "MemoryConfig") -> dict:
        """{field: (self's value, other's value)} for the fields that differ."""
        return {k: (v, getattr(other, k)) for k, v in self.as_dict().items() if getattr(other, k) != v}


@dataclass
class MemoryState:
    """Fast weights plus the tokens of the unfinished window.

    keys (S, H, 2, n, dk/2) and values (S, n*n, dv) with S = 1 (one memory shared by the batch)
    or S = B (one memory per sequence). The pending tokens (B, P, ...) are the first P tokens of
    the current window: already read (their top-k is kept in idx/half_idx), written when the
    window completes or on flush. Counters feed `telemetry()`.
    """

    config: MemoryConfig
    keys: Tensor
    values: Tensor
    per_sequence: bool
    pending_q: Optional[Tensor] = None
    pending_v: Optional[Tensor] = None
    pending_g: Optional[Tensor] = None
    pending_mask: Optional[Tensor] = None
    pending_idx: Optional[Tensor] = None
    pending_half_idx: Optional[Tensor] = None
    slot_reads: Optional[Tensor] = None  # (S, N) int64: reads per slot since the state began
    gate_sum: float = 0.0
    tokens: int = 0
    extras: Dict[str, float] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return 0 if self.pending_q is None else int(self.pending_q.shape[1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    def detach(self) -> "MemoryState":
        """A copy cut from the autograd graph (truncated backpropagation between segments)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in d.items():
            if isinstance(v, Tensor):
                d[k] = v.detach()
        return MemoryState(**d)

    # ---------------------------------------------------------------------------------------------
    def telemetry(self) -> Dict[str, float]:
        """Slot coverage, collision rate, KL(slot use || uniform) and mean gate since the state began.

        coverage: share of the N slots read at least once (averaged over memories when S > 1);
        collision_rate: share of reads that hit a slot some earlier read already used
        (1 - distinct slots / reads); kl_uniform: KL divergence of the slot-read distribution to
        the uniform one, in nats; mean_gate: mean write gate g over tokens read.
        """
        N = self.values.shape[1]
        out = {"tokens": float(self.tokens), "mean_gate": self.gate_sum / max(self.tokens, 1)}
        reads = self.slot_reads
        if reads is None or int(reads.sum()) == 0:
            out.update(coverage=0.0, collision_rate=0.0, kl_uniform=0.0)
            return out
        reads = reads.double()
        tot = reads.sum(1)
        used = (reads > 0).double().sum(1)
        p = reads / tot.clamp_min(1).unsqueeze(1)
        kl = torch.where(p > 0, p * torch.log(p * N), torch.zeros_like(p)).sum(1)
        active = tot > 0
        out.update(coverage=float((used / N)[active].mean()),
                   collision_rate=float((1 - used / tot.clamp_min(1))[active].mean()),
                   kl_uniform=float(kl[active].mean()))
        return out

    # ---------------------------------------------------------------------------------------------
    def to_payload(self) -> Dict[str, Any]:
        """The state as plain data (tensors detached and on the CPU, the config as a dict): what
        ``save`` writes, and what a stream snapshot holds for each memory layer."""
        tensors = {f.name: getattr(self, f.name).detach().cpu() for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.as_dict(),
            "per_sequence": bool(self.per_sequence),
            "gate_sum": float(self.gate_sum),
            "tokens": int(self.tokens),
            "extras": _checked_extras(self.extras, "extras"),
            "tensors": tensors,
        }

    @classmethod
    def from_payload(cls, payload: Dict[str, Any], config: Optional[MemoryConfig] = None,
                     where: str = "payload") -> "MemoryState":
        """The state of a ``to_payload`` dict (this version's, or version 1's), checked: format,
        version, config (equal to ``config`` when given), entries, shapes, finite values. A
        ValueError starting with ``where`` names the problem."""
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT or \
                not is_version(payload.get("version")) or payload["version"] not in _STATE_KEYS:
            raise ValueError(f"{where} is not a memory state of a version this fwpkm_ext reads")
        try:
            cfg = MemoryConfig(**payload["config"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where} has an invalid config ({exc!r})") from exc
        if config is not None and cfg != config:
            raise ValueError(f"{where} belongs to another memory configuration "
                             f"(file vs expected: {cfg.diff(config)})")
        names = {f.name for f in fields(cls) if f.name not in
                 ("config", "per_sequence", "gate_sum", "tokens", "extras")}
        t = payload.get("tensors")
        if not isinstance(t, dict) or not set(t) <= names or "keys" not in t or "values" not in t:
            raise ValueError(f"{where} tensors must be a dict with 'keys', 'values' and "
                             f"optionally {sorted(names - {'keys', 'values'})}")
        for name, val in t.items():
            if not isinstance(val, Tensor):
                raise ValueError(f"{where} entry {name!r} is not a tensor")
        extras = _checked_extras(payload.get("extras", {}), f"{where} extras")
        try:
            state = cls(config=cfg, per_sequence=bool(payload["per_sequence"]),
                        gate_sum=float(payload["gate_sum"]), tokens=int(payload["tokens"]),
                        extras=extras, **t)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} is malformed ({exc!r})") from exc
        state._validate(where=where)
        return state

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the state (detached, on CPU) to `path`: atomically (a crash leaves the previous
        file or the new one, never a partial one) and with a checksum `load` verifies."""
        write_sealed(self.to_payload(), path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], config: Optional[MemoryConfig] = None,
             device: Union[str, torch.device, None] = None) -> "MemoryState":
        """Read a state file; rejects another format, version or config, bad shapes, non-finite
        values and damaged files (checksum) with a ValueError naming the problem. Reads the
        files of this version and of version 1 (no checksum, no extras)."""
        payload, intact = read_sealed(path, STATE_FORMAT, "state file", _STATE_KEYS, checksum_since=2)
        # the checksum is compared last: an edited or damaged file that is also invalid is
        # reported by what is wrong with it (the shape, the non-finite value, ...)
        note = "" if intact else "; and its checksum does not match: the file is damaged or was edited"
        try:
            state = cls.from_payload(payload, config, where="path: state file")
        except ValueError as exc:
            if intact:
                raise
            raise ValueError(f"{exc}{note}") from exc
        except Exception as exc:  # a damaged file can hold anything where a number belongs
            raise ValueError(f"path: state file is malformed ({exc!r}){note}") from exc
        if not intact:
            raise damaged(path)
        if device is not None:
            state = state.to(device)
        return state

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (fast weights, pending tokens, counters)."""
        return sum(t.numel() * t.element_size() for t in
                   (getattr(self, f.name) for f in fields(self)) if isinstance(t, Tensor))

    def select(self, index: Union[int, slice, Tensor]) -> "MemoryState":
        """The state of the sequences ``index`` of the batch (an int: that sequence, as a batch of
        one; a slice; or an int64 tensor of rows, repeats allowed, e.g. beams reordered by
        generation): their own memories when per sequence, else the shared one, and their
        pending tokens."""
        sl = slice(index, index + 1) if isinstance(index, int) else index
        per_batch = PENDING_FIELDS + (("keys", "values", "slot_reads") if self.per_sequence else ())
        return replace(self, **{name: getattr(self, name)[sl] for name in per_batch
                                if getattr(self, name) is not None})

    def without_pending(self) -> "MemoryState":
        """The state with its pending tokens dropped (for a read whose update window outlasts
        everything still to come: they would never be written)."""
        return replace(self, **{name: None for name in PENDING_FIELDS})

    def to(self, device: Union[str, torch.device]) -> "MemoryState":
        """The same state on another device (dtypes never change: fast weights stay float32)."""
        if isinstance(device, torch.dtype):
            raise TypeError("device: MemoryState.to moves devices only; fast weights keep their dtype")
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in d.items():
            if isinstance(v, Tensor):
                d[k] = v.to(device)
        return MemoryState(**d)

    def check_tables(self, where: str = "state") -> None:
        """The cheap structural checks of the tables (shapes against the config, dtypes, one
        memory when shared, at least one, contiguous): run on every memory call; `load` adds the
        value checks (`_validate`). ValueError naming `where`."""
        c = self.config
        n, d2, dv, H = c.n_subkeys, c.key_dim // 2, c.value_dim, c.heads
        if not isinstance(self.keys, Tensor) or self.keys.dim() != 5 or \
                tuple(self.keys.shape[1:]) != (H, 2, n, d2):
            raise ValueError(f"{where}: keys must have shape (S, {H}, 2, {n}, {d2}), got "
                             f"{tuple(getattr(self.keys, 'shape', ()))}")
        S = self.keys.shape[0]
        if not isinstance(self.values, Tensor) or tuple(self.values.shape) != (S, n * n, dv):
            raise ValueError(f"{where}: values must have shape ({S}, {n * n}, {dv}), got "
                             f"{tuple(getattr(self.values, 'shape', ()))}")
        if self.keys.dtype not in (torch.float32, torch.float64) or self.values.dtype != self.keys.dtype:
            raise ValueError(f"{where}: fast weights must be float32 (or float64), got "
                             f"{self.keys.dtype} / {self.values.dtype}")
        if S < 1:
            raise ValueError(f"{where}: needs at least one memory, got keys {tuple(self.keys.shape)}")
        if not self.per_sequence and S != 1:
            raise ValueError(f"{where}: a shared state has S = 1, got {S}")
        if not self.keys.is_contiguous() or not self.values.is_contiguous():
            raise ValueError(f"{where}: tables must be contiguous")

    def _validate(self, where: str = "state") -> None:
        self.check_tables(where)
        c = self.config
        n, dv, H = c.n_subkeys, c.value_dim, c.heads
        S = self.keys.shape[0]
        for name in ("keys", "values", "pending_q", "pending_v", "pending_g", "pending_mask"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: {name} holds non-finite values (NaN or Inf)")
        pend = PENDING_FIELDS
        present = [getattr(self, name) is not None for name in pend]
        if any(present) and not all(present):
            raise ValueError(f"{where}: pending tokens need all of {pend} or none")
        for name in pend:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Tensor):
                raise ValueError(f"{where}: {name} must be a tensor")
        P = self.pending
        if P and self.per_sequence and self.pending_q.shape[0] != S:
            raise ValueError(f"{where}: per-sequence state of {S} memories holds pending tokens of "
                             f"{self.pending_q.shape[0]} sequences")
        if P >= c.chunk_size:
            raise ValueError(f"{where}: {P} pending tokens, must be < chunk_size {c.chunk_size}")
        if P:
            B = self.pending_q.shape[0]
            expect = {"pending_q": (B, P, H, c.key_dim), "pending_v": (B, P, dv), "pending_g": (B, P),
                      "pending_mask": (B, P), "pending_idx": (B, P, H, c.topk),
                      "pending_half_idx": (B, P, H, 2, c.topk)}
            for name, shape in expect.items():
                t = getattr(self, name)
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"{where}: {name} must have shape {shape}, got "
                                     f"{None if t is None else tuple(t.shape)}")
            for name in ("pending_idx", "pending_half_idx"):
                t = getattr(self, name)
                hi = n * n if name == "pending_idx" else n
                if t.dtype != torch.int64 or int(t.min()) < 0 or int(t.max()) >= hi:
                    raise ValueError(f"{where}: {name} must be int64 indices in [0, {hi})")
        if self.slot_reads is not None and tuple(self.slot_reads.shape) != (S, n * n):
            raise ValueError(f"{where}: slot_reads must have shape ({S}, {n * n})")
        if not math.isfinite(self.gate_sum) or self.tokens < 0:
            raise ValueError(f"{where}: gate_sum/tokens counters are invalid")

    def with_(self, **kw) -> "MemoryState":
        return replace(self, **kw)


def _checked_extras(extras, where: str) -> Dict[str, float]:
    """``extras`` as a dict of str -> finite float, or a ValueError starting with ``where``."""
    if not isinstance(extras, dict):
        raise ValueError(f"{where}: must be a dict of str -> float, got {type(extras).__name__}")
    out = {}
    for k, v in extras.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not math.isfinite(v):
            raise ValueError(f"{where}: must map str to finite floats, got {k!r}: {v!r}")
        out[k] = float(v)
    return out
