"""Functional API (pinned: scripts outside the package call it).

    fwpkm_memory(q, v, g, keys, values, *, topk, chunk_size, lookahead=1, lr=1.0,
                 addr_loss_weight=1.0, mask=None, backend="auto") -> (vhat, new_keys, new_values)

One call is one complete document: every window of `chunk_size` tokens is read with the state
left by the previous window, then written (the last, shorter window too).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import recurrence, _native, ops, threads

BACKENDS = ("auto", "reference", "cpu", "cuda")
SCORES = ("idw", "dot")


def _fail(cls, name: str, msg: str):
    raise cls(f"{name}: {msg}")


def _tensor(name: str, t, dims: Optional[Tuple[int, ...]] = None, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        _fail(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        _fail(TypeError, name, f"expected a floating tensor, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        _fail(ValueError, name, f"expected {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    return t


def check_config(topk: int, chunk_size: int, lookahead: int, lr: float, addr_loss_weight: float,
                 n: Optional[int] = None, score: str = "idw", eps: float = 1e-3) -> None:
    for name, val in (("topk", topk), ("chunk_size", chunk_size), ("lookahead", lookahead)):
        if isinstance(val, bool) or not isinstance(val, int):
            _fail(TypeError, name, f"expected an int, got {type(val).__name__}")
    if topk < 1:
        _fail(ValueError, "topk", f"must be >= 1, got {topk}")
    if n is not None and topk > n:
        _fail(ValueError, "topk", f"must be <= n_subkeys ({n}), got {topk}")
    if chunk_size < 1:
        _fail(ValueError, "chunk_size", f"must be >= 1, got {chunk_size}")
    if lookahead < 0:
        _fail(ValueError, "lookahead", f"must be >= 0, got {lookahead}")
    for name, val in (("lr", lr), ("addr_loss_weight", addr_loss_weight), ("eps", eps)):
        if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
            _fail(ValueError, name, f"must be a finite number, got {val!r}")
    if eps <= 0:
        _fail(ValueError, "eps", f"must be > 0, got {eps}")
    if score not in SCORES:
        _fail(ValueError, "score", f"expected one of {SCORES}, got {score!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        _fail(ValueError, "backend", f"expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" else "cpu"
        if device.type not in ("cpu", "cuda"):
            _fail(ValueError, "backend", f"no native kernels for device {device}; use backend='reference'")
    if backend == "cpu" and device.type != "cpu":
        _fail(ValueError, "backend", f"'cpu' needs CPU tensors, got {device}")
    if backend == "cuda":
        if device.type != "cuda":
            _fail(ValueError, "backend", f"'cuda' needs CUDA tensors, got {device}")
        if not _native.build_info()["cuda"]:
            _fail(ValueError, "backend", "this build of fwpkm_ext has no CUDA kernels "
                  "(rebuild with FWPKM_CUDA=1; see fwpkm_ext.build_info())")
    return backend


def normalize_memory(q: Tensor, keys: Tensor, values: Tensor):
    """Validate q/keys/values and bring the state to (S,H,2,n,d2) / (S,N,dv).

    Returns (keys5, values3, per_sequence)."""
    _tensor("q", q, (4,))
    _tensor("keys", keys, (4, 5))
    _tensor("values", values, (2, 3))
    B, T, H, dk = q.shape
    if dk % 2:
        _fail(ValueError, "q", f"query dim must be even, got {dk}")
    if keys.dtype not in (torch.float32, torch.float64):
        _fail(TypeError, "keys", f"fast weights must be float32 (or float64), got {keys.dtype}")
    if values.dtype != keys.dtype:
        _fail(TypeError, "values", f"expected dtype {keys.dtype} like keys, got {values.dtype}")
    per_seq = keys.dim() == 5
    if per_seq != (values.dim() == 3):
        _fail(ValueError, "values", "keys and values must both be shared ((H,2,n,d), (N,dv)) or both "
              f"per sequence ((B,H,2,n,d), (B,N,dv)); got {tuple(keys.shape)} and {tuple(values.shape)}")
    k5 = keys if per_seq else keys.unsqueeze(0)
    v3 = values if per_seq else values.unsqueeze(0)
    S, Hk, two, n, d2 = k5.shape
    if Hk != H or two != 2 or d2 * 2 != dk:
        _fail(ValueError, "keys", f"expected shape (H={H}, 2, n, {dk // 2}), got {tuple(keys.shape)}")
    if per_seq and S != B:
        _fail(ValueError, "keys", f"per-sequence state needs batch {B}, got {S}")
    if v3.shape[0] != S or v3.shape[1] != n * n:
        _fail(ValueError, "values", f"expected {n * n} = n_subkeys^2 rows"
              f"{' for each of ' + str(S) + ' sequences' if per_seq else ''}, got {tuple(values.shape)}")
    for name, t in (("keys", keys), ("values", values)):
        if t.device != q.device:
            _fail(ValueError, name, f"expected device {q.device} like q, got {t.device}")
    return k5.contiguous(), v3.contiguous(), per_seq


def check_tokens(q: Tensor, v: Tensor, g: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Validate q/v/g/mask shapes and devices; returns the mask (ones when None)."""
    _tensor("q", q, (4,))
    B, T = q.shape[:2]
    _tensor("v", v, (3,))
    _tensor("g", g, (2,))
    if tuple(v.shape[:2]) != (B, T):
        _fail(ValueError, "v", f"expected shape ({B}, {T}, dv), got {tuple(v.shape)}")
    if tuple(g.shape) != (B, T):
        _fail(ValueError, "g", f"expected shape ({B}, {T}), got {tuple(g.shape)}")
    if mask is None:
        mask = torch.ones(B, T, dtype=q.dtype, device=q.device)
    else:
        _tensor("mask", mask, (2,), floating=False)
        if tuple(mask.shape) != (B, T):
            _fail(ValueError, "mask", f"expected shape ({B}, {T}), got {tuple(mask.shape)}")
    for name, t in (("v", v), ("g", g), ("mask", mask)):
        if t.device != q.device:
            _fail(ValueError, name, f"expected device {q.device} like q, got {t.device}")
    return mask


NONFINITE = ("raise", "skip")
MAX_ABS = recurrence.MAX_ABS


def screen_tokens(q: Tensor, v: Tensor, g: Tensor, mask: Tensor, nonfinite: str, dt: torch.dtype):
    """SPEC "Inputs that must never reach the tables", before anything is written.

    q/v/g/mask are converted to the fast-weight dtype dt first (what would reach the tables).
    nonfinite="raise": nothing to do here; the memory op itself raises a ValueError naming the
    argument and the first bad (batch, token) before it writes (recurrence.check_tokens), so the
    check also runs inside compiled graphs.
    nonfinite="skip": bad entries are zeroed, the token gets mask -1 (no write, left out of the
    addressing loss: see recurrence.addr_mask) and a token whose *target* v is bad does not write.
    Returns (q, v, g, mask, bad_v, n_skipped); mask >= 0 except for skipped tokens (-1).
    n_skipped is None inside a compiled graph (counting would break the graph)."""
    if nonfinite not in NONFINITE:
        _fail(ValueError, "nonfinite", f"expected one of {NONFINITE}, got {nonfinite!r}")
    # mask <= 0 means "does not write" whatever its value: clamping keeps -1 free for skipped
    # tokens (NaN stays NaN and is refused by the op)
    mask = mask.to(dt).clamp_min(0.0)
    q, v, g = q.to(dt), v.to(dt), g.to(dt)
    B, T = mask.shape
    if nonfinite == "raise" or B * T == 0:
        return q, v, g, mask, None, 0
    bq, bv, bg = (recurrence.bad_tokens(t, MAX_ABS) for t in (q, v, g))
    any_bad = bq | bv | bg
    zero = lambda t, bad: torch.where(bad.view(B, T, *([1] * (t.dim() - 2))), torch.zeros_like(t), t)  # noqa: E731
    q, v, g = zero(q, bq), zero(v, bv), zero(g, bg)
    mask = torch.where(any_bad, torch.full_like(mask, -1.0), mask)
    if torch.compiler.is_compiling():
        return q, v, g, mask, bv, None
    return q, v, g, mask, bv, int(any_bad.sum())


def drop_bad_targets(mask: Tensor, bad_v: Tensor, lookahead: int) -> Tensor:
    """Token t - lookahead writes towards v[t]: when v[t] was bad it must not write."""
    T = mask.shape[1]
    if lookahead >= T:
        return mask
    head = mask[:, : T - lookahead]
    stop = bad_v[:, lookahead:] & (head > 0)
    return torch.cat((torch.where(stop, torch.zeros_like(head), head), mask[:, T - lookahead:]), 1)


def fwpkm_memory(q: Tensor, v: Tensor, g: Tensor, keys: Tensor, values: Tensor, *, topk: int,
                 chunk_size: int, lookahead: int = 1, lr: float = 1.0, addr_loss_weight: float = 1.0,
                 mask: Optional[Tensor] = None, backend: str = "auto", score: str = "idw",
                 eps: float = 1e-3) -> Tuple[Tensor, Tensor, Tensor]:
    """Read and write a fast-weight product-key memory over one complete document.

    Args:
        q: queries (B, T, H, dk), dk even.
        v: values to memorize (B, T, dv) (the layer's z-scored value projection); the target of
           token t is v[t + lookahead] inside the same window.
        g: gate (B, T): weight of each token's write.
        keys: sub-key tables (H, 2, n, dk/2) shared by the batch, or (B, H, 2, n, dk/2) per sequence.
        values: value table (n*n, dv) shared, or (B, n*n, dv) per sequence. float32 (float64 allowed).
        topk, chunk_size, lookahead, lr, addr_loss_weight: SPEC.md symbols k, C, la, lr, w_addr.
        mask: optional (B, T); tokens with mask <= 0 do not write (they are still read).
        backend: "auto" (native kernels of the tensors' device), "reference", "cpu", "cuda".
        score: "idw" (inverse-distance sub-scores, the paper's) or "dot".

    Returns:
        (vhat (B, T, dv) in the fast-weight dtype, new_keys, new_values) with the input shapes.
        Differentiable w.r.t. q, v, g (through every fast update), keys and values.
        Inputs are never modified.
    """
    check_config(topk, chunk_size, lookahead, lr, addr_loss_weight, None, score, eps)
    keys5, values3, per_seq = normalize_memory(q, keys, values)
    mask = check_tokens(q, v, g, mask)
    if v.shape[2] != values3.shape[-1]:
        _fail(ValueError, "v", f"expected shape (B, T, {values3.shape[-1]}) like the value table, "
              f"got {tuple(v.shape)}")
    if topk > keys5.shape[3]:
        _fail(ValueError, "topk", f"must be <= n_subkeys ({keys5.shape[3]}), got {topk}")
    backend = resolve_backend(backend, q.device)
    dt = keys.dtype
    q, v, g, mask, _, _ = screen_tokens(q, v, g, mask, "raise", dt)
    B, T = q.shape[:2]
    if B * T == 0:  # SPEC: empty input, empty output, state unchanged
        return values.new_zeros(B, T, values.shape[-1]), keys.clone(), values.clone()
    if backend == "reference":
        from .reference import fwpkm_memory_reference

        recurrence.check_tokens(q, v, g, mask, 0)
        return fwpkm_memory_reference(q, v, g, keys, values, topk=topk,
                                      chunk_size=chunk_size, lookahead=lookahead, lr=lr,
                                      addr_loss_weight=addr_loss_weight, mask=mask,
                                      score=score, eps=eps)
    out = memory_call(q, v, g, mask, keys5, values3, None, None, topk=topk, chunk_size=chunk_size,
                      lookahead=lookahead, lr=lr, addr_loss_weight=addr_loss_weight, score=score,
                      eps=eps, flush=True)
    vhat, nk, nv = out[:3]
    if not per_seq:
        nk, nv = nk.squeeze(0), nv.squeeze(0)
    return vhat, nk, nv


def memory_call(q, v, g, mask, keys5, values3, pend_idx, pend_half, *, topk, chunk_size, lookahead,
                lr, addr_loss_weight, score, eps, flush, inplace=False, want_values=True):
    """The native fused op on validated inputs (state as (S,H,2,n,d2) / (S,N,dv)).

    Returns (vhat, new_keys, new_values, idx, half_idx). Without autograd, a call that writes
    nothing returns the given tables themselves, and `inplace=True` writes into them (no copy of
    the N x dv table per call: the streaming inference path). Without `want_values` the new
    value table comes back empty (nothing copies it). An in-place call writes the tables once,
    after every window succeeded: a call that raises leaves them as they were."""
    dt = keys5.dtype
    B, T, H, _ = q.shape
    if pend_idx is None:
        pend_idx = torch.empty(B, 0, H, topk, dtype=torch.long, device=q.device)
        pend_half = torch.empty(B, 0, H, 2, topk, dtype=torch.long, device=q.device)
    q, v, g, mask = (t.to(dt).contiguous() for t in (q, v, g, mask))
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, v, g, keys5, values3))
    writes = flush or T >= chunk_size
    if not keep and (inplace or not writes) and not torch.compiler.is_compiling():
        # in place (or nothing to write): the registered mutating op, no copy of the tables
        with torch.no_grad():
            vhat, idx, half = ops.memory_inplace(q, v, g, mask, keys5, values3, pend_idx, pend_half,
                                                 topk, chunk_size, lookahead, float(lr),
                                                 float(addr_loss_weight), score, float(eps), bool(flush))
        return vhat, keys5, values3, idx, half
    vhat, nk, nv, idx, half, _, _, _, _ = ops.memory(q, v, g, mask, keys5, values3, pend_idx, pend_half,
                                                  topk, chunk_size, lookahead, float(lr),
                                                  float(addr_loss_weight), score, float(eps),
                                                  bool(flush), keep, bool(want_values))
    return vhat, nk, nv, idx, half


def product_key_topk(q: Tensor, keys: Tensor, topk: int, *, score: str = "idw", eps: float = 1e-3):
    """Top-k slots of a product-key memory: (idx, scores) (B,T,H,k), (half_idx, half_scores)
    (B,T,H,2,k). Not differentiable (use the layers for a differentiable read)."""
    check_config(topk, 1, 0, 0.0, 0.0, None, score, eps)
    _tensor("q", q, (4,))
    _tensor("keys", keys, (4, 5))
    keys5 = keys if keys.dim() == 5 else keys.unsqueeze(0)
    B, T, H, dk = q.shape
    if tuple(keys5.shape[1:3]) != (H, 2) or keys5.shape[4] * 2 != dk or keys5.shape[0] not in (1, B) \
            or (keys.dim() == 5 and keys5.shape[0] != B):
        _fail(ValueError, "keys", f"expected ({H}, 2, n, {dk // 2}) or ({B}, {H}, 2, n, {dk // 2}), "
              f"got {tuple(keys.shape)}")
    if keys.device != q.device:
        _fail(ValueError, "keys", f"expected device {q.device} like q, got {keys.device}")
    if topk > keys5.shape[3]:
        _fail(ValueError, "topk", f"must be <= n_subkeys ({keys5.shape[3]}), got {topk}")
    if q.dtype != keys.dtype:
        _fail(TypeError, "q", f"expected dtype {keys.dtype} like keys, got {q.dtype}")
    if keys.dtype not in (torch.float32, torch.float64):
        _fail(TypeError, "keys", f"expected float32 or float64, got {keys.dtype}")
    resolve_backend("auto", q.device)
    if B * T == 0:
        k, e = topk, q.new_empty
        return (e(B, T, H, k, dtype=torch.long), e(B, T, H, k), e(B, T, H, 2, k, dtype=torch.long),
                e(B, T, H, 2, k))
    if not torch.compiler.is_compiling():
        # a NaN query has no top-k (every score NaN); refuse it like the memory does
        recurrence.check_tokens(q, q.new_zeros(B, T, 0), q.new_zeros(B, T), q.new_zeros(B, T), 0)
        if not recurrence.finite_within(keys, recurrence.MAX_ABS):
            _fail(ValueError, "keys", f"non-finite values or values beyond +-{recurrence.MAX_ABS:g}")
    return ops.topk(q.contiguous(), keys5.contiguous(), topk, score, float(eps))


def gather(table: Tensor, rows: Tensor, w: Tensor) -> Tensor:
    """Differentiable weighted gather: out[m] = sum_l w[m,l] * table[rows[m,l]].

    table (R, D) float32/float64; rows (M, L) int64 in [0, R); w (M, L) like table."""
    _tensor("table", table, (2,))
    _tensor("w", w, (2,))
    if not isinstance(rows, Tensor) or rows.dtype != torch.int64:
        _fail(TypeError, "rows", f"expected an int64 tensor, got {getattr(rows, 'dtype', type(rows))}")
    if rows.dim() != 2 or tuple(w.shape) != tuple(rows.shape):
        _fail(ValueError, "rows", f"rows {tuple(rows.shape)} and w {tuple(w.shape)} must both be (M, L)")
    if w.dtype != table.dtype:
        _fail(TypeError, "w", f"expected dtype {table.dtype} like table, got {w.dtype}")
    for name, t in (("rows", rows), ("w", w)):
        if t.device != table.device:
            _fail(ValueError, name, f"expected device {table.device} like table, got {t.device}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= table.shape[0]):
        _fail(ValueError, "rows", f"indices must lie in [0, {table.shape[0]}), got "
              f"[{int(rows.min())}, {int(rows.max())}]")
    resolve_backend("auto", table.device)
    return ops.gather(table.contiguous(), rows.contiguous(), w.contiguous())


def _check_state(state) -> None:
    """The cheap checks of a state given to a call (`MemoryState.load` checks everything)."""
    from .state import MemoryState

    if not isinstance(state, MemoryState):
        _fail(TypeError, "state", f"expected a MemoryState, got {type(state).__name__}")
    state.check_tables("state")
    c = state.config
    check_config(c.topk, c.chunk_size, c.lookahead, c.lr, c.addr_loss_weight, c.n_subkeys, c.score, c.eps)


def memory_step(q: Tensor, v: Tensor, g: Tensor, state, *, mask: Optional[Tensor] = None,
                flush: bool = True, inplace: bool = False, nonfinite: str = "raise",
                return_state: bool = True):
    """Streaming call: read and write the tokens (B, T, ...) with the memory `state`.

    Window boundaries are absolute (counted from the start of the state's stream): windows that
    complete inside this call are written; the trailing tokens of an unfinished window stay
    pending in the returned state (written by a later call or by `flush=True`).
    Returns (vhat (B, T, dv), new_state). Feeding a sequence in any split with the state carried,
    then flushing, equals one call with flush=True (SPEC "Streaming").

    `inplace=True` (only without autograd) writes the state's tables in place instead of copying
    them: the returned state shares them and the given state must not be used again. The write
    happens once, after the whole call succeeded: a call that raises leaves the state as it was.

    `nonfinite`: what a token whose q, v or g is NaN, Inf or beyond +-1e15 does (SPEC "Inputs that
    must never reach the tables"). "raise" (default): a ValueError naming the argument and the
    first bad (batch, token), before anything is written. "skip": the token is read (with its bad
    entries zeroed) but writes nothing and stays out of the addressing loss, nor does the token
    whose target it is; the count is added to `state.extras["nonfinite_skipped"]`.

    `return_state=False` returns (vhat, None) and never builds the new value table (a training
    call whose final state is not kept).
    """
    _check_state(state)
    threads.tick()  # no-op unless fwpkm_ext.threads.enable() (the fwpkm command turns it on)
    c = state.config
    mask = check_tokens(q, v, g, mask)
    B, T = q.shape[:2]
    keys5, values3 = state.keys, state.values
    if q.device != values3.device:
        _fail(ValueError, "q", f"expected device {values3.device} like the state, got {q.device}")
    if state.per_sequence and keys5.shape[0] != B:
        _fail(ValueError, "state", f"per-sequence state holds {keys5.shape[0]} memories, batch is {B}")
    if tuple(q.shape[2:]) != (c.heads, c.key_dim) or v.shape[2] != c.value_dim:
        _fail(ValueError, "q", f"expected q (B,T,{c.heads},{c.key_dim}) and v (B,T,{c.value_dim}), "
              f"got {tuple(q.shape)} and {tuple(v.shape)}")
    P = state.pending
    if P and state.pending_q.shape[0] != B:
        _fail(ValueError, "state", f"the state holds pending tokens of a batch of "
              f"{state.pending_q.shape[0]} sequences, batch is {B}")
    if not isinstance(flush, bool):
        _fail(TypeError, "flush", f"expected a bool, got {type(flush).__name__}")
    if not isinstance(inplace, bool):
        _fail(TypeError, "inplace", f"expected a bool, got {type(inplace).__name__}")
    resolve_backend("auto", q.device)
    dt = keys5.dtype
    if inplace and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, v, g, keys5, values3)):
        _fail(ValueError, "inplace", "in-place state updates are for inference; run under "
              "torch.no_grad() or pass inplace=False")
    q, v, g, mask, bad_v, skipped = screen_tokens(q, v, g, mask, nonfinite, dt)
    if B * T == 0:  # SPEC: empty input, empty output, state unchanged
        return values3.new_zeros(B, T, c.value_dim), (state if return_state else None)
    opts = dict(topk=c.topk, chunk_size=c.chunk_size, lookahead=c.lookahead, lr=c.lr,
                addr_loss_weight=c.addr_loss_weight, score=c.score, eps=c.eps, inplace=inplace)
    if bad_v is not None:
        # the token lookahead places before a bad v may be pending from an earlier call
        if P:
            ma = drop_bad_targets(torch.cat((state.pending_mask, mask), 1),
                                  torch.cat((torch.zeros_like(state.pending_mask, dtype=torch.bool), bad_v), 1),
                                  c.lookahead)
            state = state.with_(pending_mask=ma[:, :P])
            mask = ma[:, P:]
        else:
            mask = drop_bad_targets(mask, bad_v, c.lookahead)
        if skipped:
            extras = dict(state.extras)
            extras["nonfinite_skipped"] = extras.get("nonfinite_skipped", 0.0) + float(skipped)
            state = state.with_(extras=extras)
    C = c.chunk_size
    if P + T < C and not flush:
        # no window completes: read with the current tables, everything stays pending
        vhat, _, _, idx, half = memory_call(q, v, g, mask, keys5, values3, None, None, flush=False, **opts)
        new = _append_pending(state, q, v, g, mask, idx, half, P)
        return vhat, (_count_reads(new, idx, g, keys5.shape[0], inplace) if return_state else None)
    tail = 0 if flush else (P + T) % C
    opts["want_values"] = return_state or inplace
    if P:
        cat = lambda a, b: torch.cat((a, b), 1)  # noqa: E731
        qa, va = cat(state.pending_q, q), cat(state.pending_v, v)
        ga, ma = cat(state.pending_g, g), cat(state.pending_mask, mask)
        vhat, nk, nv, idx, half = memory_call(qa, va, ga, ma, keys5, values3, state.pending_idx,
                                              state.pending_half_idx, flush=flush, **opts)
        vhat, idx_new = vhat[:, P:], idx[:, P:]
    else:
        qa, va, ga, ma = q, v, g, mask
        vhat, nk, nv, idx, half = memory_call(q, v, g, mask, keys5, values3, None, None, flush=flush, **opts)
        idx_new = idx
    if not return_state:
        return vhat, None
    new = state.without_pending().with_(keys=nk, values=nv)
    if tail:
        new = _append_pending(new, qa[:, -tail:], va[:, -tail:], ga[:, -tail:], ma[:, -tail:],
                              idx[:, -tail:], half[:, -tail:], 0)
    return vhat, _count_reads(new, idx_new, g, keys5.shape[0], inplace)


def flush_state(state, inplace: bool = False):
    """Write the pending tokens of the unfinished window (no-op without pending tokens).
    `inplace` as in `memory_step`."""
    _check_state(state)
    if state.pending == 0:
        return state
    c = state.config
    _, nk, nv, _, _ = memory_call(state.pending_q, state.pending_v, state.pending_g,
                                  state.pending_mask, state.keys, state.values, state.pending_idx,
                                  state.pending_half_idx, topk=c.topk, chunk_size=c.chunk_size,
                                  lookahead=c.lookahead, lr=c.lr, addr_loss_weight=c.addr_loss_weight,
                                  score=c.score, eps=c.eps, flush=True, inplace=inplace)
    return state.without_pending().with_(keys=nk, values=nv)


def _append_pending(state, q, v, g, mask, idx, half, P):
    if P:
        cat = lambda a, b: torch.cat((a, b), 1)  # noqa: E731
        return state.with_(pending_q=cat(state.pending_q, q), pending_v=cat(state.pending_v, v),
                           pending_g=cat(state.pending_g, g), pending_mask=cat(state.pending_mask, mask),
                           pending_idx=cat(state.pending_idx, idx),
                           pending_half_idx=cat(state.pending_half_idx, half))
    return state.with_(pending_q=q, pending_v=v, pending_g=g, pending_mask=mask, pending_idx=idx,
                       pending_half_idx=half)


def _count_reads(state, idx, g, S, inplace: bool = False):
    """Telemetry counters: slot reads per memory and the gate sum (no autograd). `inplace` (an
    in-place call, whose given state is not used again): the state's counters are added to where
    they are, instead of into a copy (a 2 MiB copy and a 2 MiB bincount per call at the paper
    configuration: ~2-4 ms of a 4096-token call, against ~0.2 ms)."""
    with torch.no_grad():
        B, T = idx.shape[:2]
        N = state.values.shape[1]
        reads = state.slot_reads
        if reads is None:
            reads = torch.zeros(S, N, dtype=torch.long, device=idx.device)
        elif (not inplace or not reads.is_contiguous()
              or (reads.is_inference() and not torch.is_inference_mode_enabled())):
            # (an inference tensor cannot be written outside inference mode; a strided one is
            # copied too: the tables are written already, nothing may raise from here on)
            reads = reads.clone(memory_format=torch.contiguous_format)
        flat = idx.reshape(B, -1)
        if S > 1:
            flat = flat + torch.arange(B, device=idx.device).view(B, 1) * N
        reads.view(-1).index_add_(0, flat.reshape(-1), torch.ones(flat.numel(), dtype=torch.long,
                                                                  device=idx.device))
        return state.with_(slot_reads=reads, gate_sum=state.gate_sum + float(g.detach().sum()),
                           tokens=state.tokens + B * T)


def memory_read(q: Tensor, state) -> Tensor:
    """Read (B, T, H, dk) queries with the state's current tables, writing nothing.

    The same read a token gets inside `memory_step` (top-k, pooled softmax, weighted gather), for
    probing a memory: the state and its pending tokens are left untouched. Not differentiable.
    Returns vhat (B, T, dv) in the fast-weight dtype."""
    _check_state(state)
    c = state.config
    _tensor("q", q, (4,))
    B, T = q.shape[:2]
    if tuple(q.shape[2:]) != (c.heads, c.key_dim):
        _fail(ValueError, "q", f"expected shape (B, T, {c.heads}, {c.key_dim}), got {tuple(q.shape)}")
    if q.device != state.device:
        _fail(ValueError, "q", f"expected device {state.device} like the state, got {q.device}")
    if state.per_sequence and state.keys.shape[0] != B:
        _fail(ValueError, "state", f"per-sequence state holds {state.keys.shape[0]} memories, batch is {B}")
    resolve_backend("auto", q.device)
    dt = state.keys.dtype
    if B * T == 0:
        return torch.zeros(B, T, c.value_dim, dtype=dt, device=q.device)
    z = torch.zeros(B, T, dtype=dt, device=q.device)
    v = torch.zeros(B, T, c.value_dim, dtype=dt, device=q.device)
    # chunk_size > T and flush=False: no window completes, nothing is written
    pend_idx = torch.empty(B, 0, c.heads, c.topk, dtype=torch.long, device=q.device)
    pend_half = torch.empty(B, 0, c.heads, 2, c.topk, dtype=torch.long, device=q.device)
    with torch.no_grad():
        vhat, _, _ = ops.memory_inplace(q.detach().to(dt).contiguous(), v, z, z, state.keys, state.values,
                                        pend_idx, pend_half, c.topk, T + 1, c.lookahead, float(c.lr),
                                        float(c.addr_loss_weight), c.score, float(c.eps), False)
    return vhat
