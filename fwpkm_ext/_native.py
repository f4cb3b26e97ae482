"""Thin, checked calls into the compiled core `fwpkm_ext._C`.

The core takes raw addresses; everything that could crash it (dtype, device, contiguity, shape)
is checked here first and reported as a ValueError/TypeError naming the argument. Index ranges
are the caller's business (the ops layer validates user-given indices; indices made by
topk_select are in range by construction).
"""
from __future__ import annotations

import functools
import threading
from typing import Optional

import torch

from . import _C

_SCRATCH = threading.local()  # per-thread scratch buffers of the composite kernels (window_step)

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
_KIND_CODE = {"idw": 0, "dot": 1}


def _dev(t: torch.Tensor) -> str:
    return "cuda" if t.is_cuda else "cpu"


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _check(name: str, t: Optional[torch.Tensor], dtype, device, shape=None) -> None:
    if t is None:
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors' bytes intersect."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _float_code(name: str, t: torch.Tensor) -> int:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"{name}: native kernels take float32 or float64, got {t.dtype}")
    return _DTYPE_CODE[t.dtype]


def topk_select(dots: torch.Tensor, qn: Optional[torch.Tensor], kn: Optional[torch.Tensor], k: int,
                tokens_per_group: int, kind: str, eps: float, idx: torch.Tensor, score: torch.Tensor,
                half_idx: torch.Tensor, half_score: torch.Tensor, *, block: int = 0) -> None:
    """Fill idx/score (M,H,k) and half_idx/half_score (M,H,2,k) from dots (M,H,2,n), or (CPU,
    block > 0) from dots (M / block, H, 2, block, n): token b * block + l at [b, :, :, l]."""
    code = _float_code("dots", dots)
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block: expected an int >= 0, got {block!r}")
    if block:
        if dots.is_cuda:
            raise ValueError("block: the CUDA kernel takes dots (M, H, 2, n) only (block = 0)")
        if dots.dim() != 5 or dots.shape[2] != 2 or dots.shape[3] != block:
            raise ValueError(f"dots: expected shape (M / block, H, 2, block = {block}, n), got {tuple(dots.shape)}")
        G_, H, _, _, n = dots.shape
        M = G_ * block
    else:
        if dots.dim() != 4 or dots.shape[2] != 2:
            raise ValueError(f"dots: expected shape (M, H, 2, n), got {tuple(dots.shape)}")
        M, H, _, n = dots.shape
    dev, dt = dots.device, dots.dtype
    _check("dots", dots, dt, dev)
    if kind not in _KIND_CODE:
        raise ValueError(f"score: expected 'idw' or 'dot', got {kind!r}")
    if not 1 <= k <= n:
        raise ValueError(f"topk: need 1 <= topk <= n_subkeys ({n}), got {k}")
    if isinstance(tokens_per_group, bool) or not isinstance(tokens_per_group, int) or tokens_per_group < 1:
        raise ValueError(f"tokens_per_group: expected an int >= 1, got {tokens_per_group!r}")
    G = max(1, -(-M // tokens_per_group))
    if kind == "idw":
        _check("qn", qn, dt, dev, (M, H, 2))
        # (no tokens: no group is read, and the caller's memories may be any number of them)
        _check("kn", kn, dt, dev, (G, H, 2, n) if M else None)
    _check("idx", idx, torch.int64, dev, (M, H, k))
    _check("score", score, dt, dev, (M, H, k))
    _check("half_idx", half_idx, torch.int64, dev, (M, H, 2, k))
    _check("half_score", half_score, dt, dev, (M, H, 2, k))
    if M * H == 0:
        return
    _C.topk_select(_dev(dots), code, dots.data_ptr(), qn.data_ptr() if kind == "idw" else 0,
                   kn.data_ptr() if kind == "idw" else 0, M, H, n, k, tokens_per_group,
                   _KIND_CODE[kind], float(eps), idx.data_ptr(), score.data_ptr(),
                   half_idx.data_ptr(), half_score.data_ptr(), _stream(dots), block)


def _real(name: str, val) -> float:
    """A Python int or float scalar argument (not a bool), as a float."""
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(val).__name__}")
    return float(val)


def _used_rows(U, cap: int) -> None:
    """U: how many compact rows are in use, an int in [0, cap]."""
    if isinstance(U, bool) or not isinstance(U, int) or not 0 <= U <= cap:
        raise ValueError(f"U: expected an int in [0, {cap}], got {U!r}")


def _table(table: torch.Tensor) -> int:
    """A contiguous 2-D float table: its dtype code."""
    code = _float_code("table", table)
    if table.dim() != 2:
        raise ValueError(f"table: expected shape (R, D), got {tuple(table.shape)}")
    _check("table", table, table.dtype, table.device)
    return code


def _table_and_rows(table: torch.Tensor, rows: torch.Tensor):
    """Checks shared by the row kernels: a 2-D float table and (M, L) int64 rows beside it."""
    code = _table(table)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ValueError(f"rows: expected an (M, L) tensor, got {tuple(getattr(rows, 'shape', ()))}")
    _check("rows", rows, torch.int64, table.device)
    return (code, *table.shape, *rows.shape)


def gather_rows(table: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                saved: Optional[torch.Tensor] = None) -> None:
    """out[m] = sum_l w[m,l] * table[rows[m,l]]; saved[m,l] = table[rows[m,l]] when given."""
    code, R, D, M, L = _table_and_rows(table, rows)
    dev, dt = table.device, table.dtype
    _check("w", w, dt, dev, (M, L))
    _check("out", out, dt, dev, (M, D))
    if saved is not None:
        _check("saved", saved, dt, dev, (M, L, D))
    if M * D == 0:
        return
    _C.gather_rows(_dev(table), code, table.data_ptr(), R, D, rows.data_ptr(), w.data_ptr(), M, L,
                   out.data_ptr(), saved.data_ptr() if saved is not None else 0, _stream(table))


def gather_dot(table: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, gw: torch.Tensor) -> None:
    """gw[m,l] = table[rows[m,l]] . x[m]."""
    code, R, D, M, L = _table_and_rows(table, rows)
    dev, dt = table.device, table.dtype
    _check("x", x, dt, dev, (M, D))
    _check("gw", gw, dt, dev, (M, L))
    if M * L == 0:
        return
    _C.gather_dot(_dev(table), code, table.data_ptr(), R, D, rows.data_ptr(), x.data_ptr(), M, L,
                  gw.data_ptr(), _stream(table))


def _scatter_checks(table, urows, offsets, order, coef, x, L):
    code = _table(table)
    R, D = table.shape
    dev, dt = table.device, table.dtype
    if not isinstance(urows, torch.Tensor) or urows.dim() != 1:
        raise ValueError(f"urows: expected a 1-D tensor, got {tuple(getattr(urows, 'shape', ()))}")
    U = urows.shape[0]
    _check("urows", urows, torch.int64, dev, (U,))
    _check("offsets", offsets, torch.int64, dev, (U + 1,))
    _check("order", order, torch.int64, dev)
    _check("coef", coef, dt, dev)
    _check("x", x, dt, dev)
    if x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"x: expected shape (M, {D}), got {tuple(x.shape)}")
    if coef.numel() != x.shape[0] * L:
        raise ValueError(f"coef: expected {x.shape[0] * L} pair coefficients, got {coef.numel()}")
    return code, R, D, U


def scatter_rows_dense(table: torch.Tensor, urows: torch.Tensor, offsets: torch.Tensor,
                       order: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, L: int,
                       src: Optional[torch.Tensor] = None, gw: Optional[torch.Tensor] = None) -> None:
    """CPU: table[r] = sum over r's segment of coef[p] * x[p // L], 0 for the rows without one:
    every row of table written once (no zeroing before, any contents overwritten). urows
    strictly increasing, as `segment_rows` gives them (kernels.h). With src (R, D) and gw (one
    value per pair): also gw[p] = src[r] . x[p // L] for each pair p of row r (gather_dot's
    values, from one pass over src in row order); every pair must then lie in a segment."""
    if table.device.type != "cpu":
        raise ValueError(f"table: scatter_rows_dense is CPU only, got device {table.device}")
    code, R, D, U = _scatter_checks(table, urows, offsets, order, coef, x, L)
    if (src is None) != (gw is None):
        raise ValueError("gw: give src and gw together, or neither")
    if src is not None:
        _check("src", src, table.dtype, table.device, (R, D))
        _check("gw", gw, table.dtype, table.device)
        if gw.numel() != coef.numel() or order.numel() != coef.numel() or int(offsets[-1]) != order.numel():
            raise ValueError(f"gw: expected {coef.numel()} pair values and every pair in a segment, "
                             f"got {gw.numel()} values, {order.numel()} ordered pairs and "
                             f"{int(offsets[-1])} in segments")
        for name, t in (("src", src), ("table", table), ("x", x), ("coef", coef)):
            if gw.numel() and t.numel() and _overlap(gw, t):
                raise ValueError(f"gw: must not share memory with {name}")
        if D == 0:
            gw.zero_()  # dots of empty rows (the kernel is not called for D == 0)
    _C.scatter_rows_dense(code, table.data_ptr(), R, D, urows.data_ptr(), offsets.data_ptr(), U,
                          order.data_ptr(), coef.data_ptr(), x.data_ptr(), L,
                          0 if src is None else src.data_ptr(), 0 if gw is None else gw.data_ptr())


def scatter_rows(table: torch.Tensor, urows: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor,
                 coef: torch.Tensor, x: torch.Tensor, L: int, *, deterministic: bool = True,
                 nonfinite: Optional[torch.Tensor] = None) -> None:
    """In place: table[urows[u]] += sum over segment u of coef[p] * x[p // L] (p = order[...]).

    deterministic=False selects, on CUDA, the atomics kernel (one warp per pair, atomicAdd; faster
    when a few rows own very long segments, but the rounding changes from run to run). On CPU it
    is ignored: the CPU kernel is always deterministic.
    nonfinite (CPU only): an int64 tensor of one element to which the number of updated rows that
    hold a NaN or an infinity afterwards is added."""
    code, R, D, U = _scatter_checks(table, urows, offsets, order, coef, x, L)
    dev = table.device
    if nonfinite is not None:
        if table.is_cuda:
            raise ValueError("nonfinite: the non-finite row count is CPU only")
        _check("nonfinite", nonfinite, torch.int64, dev, (1,))
    if U == 0 or D == 0:
        return
    args = (_dev(table), code, table.data_ptr(), R, D, urows.data_ptr(), offsets.data_ptr(), U,
            order.data_ptr(), coef.data_ptr(), x.data_ptr(), L, _stream(table))
    if deterministic or not table.is_cuda:
        _C.scatter_rows(*args, nonfinite.data_ptr() if nonfinite is not None else 0)
    else:
        _C.scatter_rows_atomic(*args)


def scatter_rows_logged(table: torch.Tensor, urows: torch.Tensor, offsets: torch.Tensor,
                        order: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, L: int,
                        nonfinite: torch.Tensor, slot: torch.Tensor, touched: torch.Tensor, U: int,
                        log: torch.Tensor) -> int:
    """CPU, in place: scatter_rows (counting non-finite rows into `nonfinite`), each row written
    for the first time copied before its write into `log` (its id in slot/touched as map_rows
    gives them, the values as they were). Returns the new U. A row outside the table, or more
    rows than `log` holds, raises ValueError with nothing written and `slot` as it was."""
    cpu = torch.device("cpu")
    if table.device != cpu:
        raise ValueError(f"table: scatter_rows_logged is CPU only, got device {table.device}")
    code, R, D, n_u = _scatter_checks(table, urows, offsets, order, coef, x, L)
    _check("nonfinite", nonfinite, torch.int64, cpu, (1,))
    _check("slot", slot, torch.int64, cpu, (R,))
    _check("touched", touched, torch.int64, cpu)
    cap = touched.numel()
    _check("log", log, table.dtype, cpu, (cap, D))
    _used_rows(U, cap)
    if n_u == 0 or D == 0:
        return U
    ids = torch.empty(n_u, dtype=torch.int64)
    return _C.scatter_rows_logged(code, table.data_ptr(), R, D, urows.data_ptr(), offsets.data_ptr(),
                                  n_u, order.data_ptr(), coef.data_ptr(), x.data_ptr(), L,
                                  nonfinite.data_ptr(), slot.data_ptr(), touched.data_ptr(), U, cap,
                                  log.data_ptr(), ids.data_ptr())


def addr_step(s: torch.Tensor, inv: Optional[torch.Tensor], rows: torch.Tensor, x: torch.Tensor,
              K: torch.Tensor, rpg: float, w: float, lr: float, eps: float, want_keys: bool = True):
    """CPU: the addressing loss' terms of one window's pairs and its key step (kernels.h):
    returns (P, u, gamma, pbar, new_keys, bad); new_keys = K - lr dL/dK (None without
    `want_keys`), bad: how many of its rows hold a NaN or an infinity.
    s, inv (None for dot scores) and rows (M, L); x (M, D); K (R, D)."""
    if K.device.type != "cpu":
        raise ValueError(f"K: addr_step is CPU only, got device {K.device}")
    code, R, D, M, L = _table_and_rows(K, rows)
    dev, dt = K.device, K.dtype
    _check("s", s, dt, dev, (M, L))
    if inv is not None:
        _check("inv", inv, dt, dev, (M, L))
    _check("x", x, dt, dev, (M, D))
    rpg, w, lr, eps = (_real(name, val) for name, val in (("rpg", rpg), ("w", w), ("lr", lr), ("eps", eps)))
    P, u, gamma = (torch.empty(M, L, dtype=dt) for _ in range(3))
    pbar = torch.empty(R, dtype=dt)
    out = torch.empty(R, D, dtype=dt) if want_keys else None
    if M * L == 0:
        pbar.zero_()
        if out is not None:
            out.copy_(K)
        return P, u, gamma, pbar, out, 0 if out is None else int((~torch.isfinite(out)).any(1).sum())
    bad = _C.addr_step(code, s.data_ptr(), inv.data_ptr() if inv is not None else 0, rows.data_ptr(), M, L,
                 x.data_ptr(), K.data_ptr(), R, D, rpg, w, lr, eps,
                 P.data_ptr(), u.data_ptr(), gamma.data_ptr(), pbar.data_ptr(),
                 out.data_ptr() if out is not None else 0)
    return P, u, gamma, pbar, out, bad


def addr_vjp(P: torch.Tensor, u: torch.Tensor, gamma: torch.Tensor, dphi: torch.Tensor,
             inv: Optional[torch.Tensor], rows: torch.Tensor, x: torch.Tensor, K: torch.Tensor,
             lam: torch.Tensor, rpg: float):
    """CPU: the addressing loss' second-order term of one window (kernels.h): (gk (R, D), gx (M, D))
    for F = <lam, dL/dK>, from addr_step's P, u, gamma (M, L), dphi (R,) = d2L/dpbar2, the pairs'
    rows (M, L), inv (M, L; None for dot scores), x (M, D), K and lam (R, D), rpg."""
    if K.device.type != "cpu":
        raise ValueError(f"K: addr_vjp is CPU only, got device {K.device}")
    code, R, D, M, L = _table_and_rows(K, rows)
    dev, dt = K.device, K.dtype
    for name, t in (("P", P), ("u", u), ("gamma", gamma)):
        _check(name, t, dt, dev, (M, L))
    if inv is not None:
        _check("inv", inv, dt, dev, (M, L))
    _check("dphi", dphi, dt, dev, (R,))
    _check("x", x, dt, dev, (M, D))
    _check("lam", lam, dt, dev, (R, D))
    rpg = _real("rpg", rpg)
    gk = torch.empty(R, D, dtype=dt)
    gx = torch.empty(M, D, dtype=dt)
    if M * L == 0:
        return gk.zero_(), gx.zero_()
    _C.addr_vjp(code, P.data_ptr(), u.data_ptr(), gamma.data_ptr(), dphi.data_ptr(),
                inv.data_ptr() if inv is not None else 0, rows.data_ptr(), M, L, x.data_ptr(),
                K.data_ptr(), lam.data_ptr(), R, D, rpg, gk.data_ptr(), gx.data_ptr())
    return gk, gx


def read_weights(s: torch.Tensor, pos: torch.Tensor, M: int, H: int) -> torch.Tensor:
    """CPU: the read weights w (M, H * k) (kernels.h): per token, the softmax over its H * k slots
    of each slot's two sub-scores summed, s[(m * H + h) * 2 + c, pos[(m * H + h) * 2 + c, j]].
    s (float) and pos (int64, values in [0, k)): (M * H * 2, k)."""
    cpu = torch.device("cpu")
    code = _float_code("s", s)
    if s.dim() != 2:
        raise ValueError(f"s: expected shape (M * H * 2, k), got {tuple(s.shape)}")
    for name, val in (("M", M), ("H", H)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "M" else 1):
            raise ValueError(f"{name}: expected an int >= {0 if name == 'M' else 1}, got {val!r}")
    k = s.shape[1]
    _check("s", s, s.dtype, cpu, (M * H * 2, k))
    _check("pos", pos, torch.int64, cpu, (M * H * 2, k))
    w = torch.empty(M, H * k, dtype=s.dtype)
    _C.read_weights(code, s.data_ptr(), pos.data_ptr(), M, H, k, w.data_ptr())
    return w


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """CPU: out[r] = x[r] . x[r] for a contiguous float (R, D) x (kernels.h)."""
    code = _float_code("x", x)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (R, D), got {tuple(x.shape)}")
    _check("x", x, x.dtype, torch.device("cpu"))
    out = torch.empty(x.shape[0], dtype=x.dtype)
    _C.row_norms(code, x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def all_within(x: torch.Tensor, lim: Optional[float] = None) -> bool:
    """CPU: every element of the contiguous float tensor x finite, and |x| <= lim when lim is given
    (a number >= 0); kernels.h."""
    code = _float_code("x", x)
    _check("x", x, x.dtype, torch.device("cpu"))
    if lim is not None and not _real("lim", lim) >= 0:  # NaN fails too
        raise ValueError(f"lim: expected a number >= 0, got {lim}")
    return bool(_C.all_within(code, x.data_ptr(), x.numel(), _largest_within(x.dtype, lim)))


@functools.lru_cache(maxsize=64)
def _largest_within(dtype: torch.dtype, lim) -> float:
    """The largest number of `dtype` not above lim (None: the dtype's largest): all_within's
    limit, rounded once per (dtype, lim) rather than on every check of a streaming call."""
    info = torch.finfo(dtype)
    if lim is None or lim >= info.max:
        return info.max
    t = torch.tensor(lim, dtype=torch.float64).to(dtype)  # rounded to nearest: step down
    if float(t) > lim:
        t = torch.nextafter(t, torch.zeros((), dtype=dtype))
    return float(t)


def slot_scores(q: torch.Tensor, K: torch.Tensor, idx: torch.Tensor, tokens_per_group: int) -> torch.Tensor:
    """CPU, dot score: s (M, H, 2, k), s[m, h, c, j] = q[m, h, c] . K[m // tokens_per_group, h, c,
    half_c(idx[m, h, j])] with half_0 = idx // n, half_1 = idx % n; q (M, H, 2, D), K (G, H, 2, n, D),
    idx (M, H, k) int64 (kernels.h: pair_scores' values over read_kid's rows, bit for bit)."""
    code = _float_code("q", q)
    if q.dim() != 4 or q.shape[2] != 2:
        raise ValueError(f"q: expected shape (M, H, 2, D), got {tuple(q.shape)}")
    M, H, _, D = q.shape
    dev = torch.device("cpu")
    _check("q", q, q.dtype, dev)
    if not isinstance(K, torch.Tensor) or K.dim() != 5 or tuple(K.shape[1:3]) != (H, 2) or K.shape[4] != D:
        raise ValueError(f"K: expected shape (G, {H}, 2, n, {D}), got {tuple(getattr(K, 'shape', ()))}")
    _check("K", K, q.dtype, dev)
    G, n = K.shape[0], K.shape[3]
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3 or tuple(idx.shape[:2]) != (M, H):
        raise ValueError(f"idx: expected shape ({M}, {H}, k), got {tuple(getattr(idx, 'shape', ()))}")
    _check("idx", idx, torch.int64, dev)
    k = idx.shape[2]
    tpg = int(tokens_per_group)
    if tpg < 1 or G < -(-M // tpg):
        raise ValueError(f"tokens_per_group: {M} tokens in groups of {tpg} need {-(-M // tpg)} "
                         f"memories, K has {G}")
    s = torch.empty(M, H, 2, k, dtype=q.dtype)
    _C.slot_scores(code, q.data_ptr(), K.data_ptr(), idx.data_ptr(), M, H, n, D, k, tpg, s.data_ptr())
    return s


def window_step(dots: torch.Tensor, K: torch.Tensor, x: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                mask: torch.Tensor, s0: int, L: int, la: int, kind: str, eps: float, lr: float,
                addr_w: float, ent_eps: float, idx: torch.Tensor, half: torch.Tensor,
                w: torch.Tensor, vhat: torch.Tensor, V: torch.Tensor, new_keys: torch.Tensor,
                slot: torch.Tensor, touched: torch.Tensor, used: torch.Tensor, log: torch.Tensor,
                nonfinite: torch.Tensor, *, same_call: bool = False) -> int:
    """CPU: one whole window [s0, s0 + L) of an in-place streaming call (kernels.h, WindowStep):
    the read into vhat/idx/half/w, the value write into V behind the undo log (slot, touched,
    used [1]: the rows in use, updated as soon as rows join, log), new_keys. Returns how many
    rows of new_keys hold a NaN or an infinity.
    dots (G, H, 2, L', n) as topk_select takes it with block = L' (G, L' = B, L when S > 1, else
    1, B L: search_dots(blocked=True)); K (S, H, 2, n, d2); x (B L H 2, d2); v (B, T, dv); g, mask (B, T); idx (B, T, H, k);
    half (B, T, H, 2, k); w (B, T, H k); vhat (B, T, dv); V (S n n, dv).
    same_call (the window loop's later windows): every argument but dots, K, x, s0, L and new_keys
    is the object an earlier window_step of this call checked, unchanged but for what that call
    wrote; their checks (a tenth of a millisecond a window) are not repeated."""
    cpu = torch.device("cpu")
    for name, t in (("V", V), ("dots", dots), ("K", K), ("v", v), ("idx", idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    code = _float_code("V", V)
    dt = V.dtype
    for name, t, nd in (("K", K, 5), ("dots", dots, 5), ("v", v, 3)):
        if t.dim() != nd:
            raise ValueError(f"{name}: expected {nd} dimensions, got shape {tuple(t.shape)}")
    S, H, _, n, d2 = K.shape
    B, T, dv = v.shape
    k = idx.shape[-1] if idx.dim() == 4 else -1
    for name, val, lo, hi in (("s0", s0, 0, T), ("L", L, 1, T), ("la", la, 0, None)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo or (hi is not None and val > hi):
            raise ValueError(f"{name}: expected an int in [{lo}, {hi if hi is not None else 'inf'}], got {val!r}")
    if s0 + L > T:
        raise ValueError(f"s0 + L: the window [{s0}, {s0 + L}) is not within the {T} tokens")
    if S != 1 and S != B:
        raise ValueError(f"K: one memory or one per sequence (S = 1 or {B}), got S = {S}")
    if kind not in _KIND_CODE:
        raise ValueError(f"kind: expected 'idw' or 'dot', got {kind!r}")
    if not 1 <= k <= n:
        raise ValueError(f"idx: expected shape (B, T, H, k) with 1 <= k <= n = {n}, got {tuple(idx.shape)}")
    M = B * L
    idw = kind == "idw"
    blocks = (B, H, 2, L, n) if S > 1 else (1, H, 2, M, n)
    checks = [("dots", dots, dt, blocks), ("K", K, dt, (S, H, 2, n, d2)), ("x", x, dt, (M * H * 2, d2)),
              ("new_keys", new_keys, dt, (S * H * 2 * n, d2))]
    if not same_call:
        checks += [
              ("v", v, dt, (B, T, dv)), ("g", g, dt, (B, T)), ("mask", mask, dt, (B, T)),
              ("idx", idx, torch.int64, (B, T, H, k)), ("half", half, torch.int64, (B, T, H, 2, k)),
              ("w", w, dt, (B, T, H * k)), ("vhat", vhat, dt, (B, T, dv)), ("V", V, dt, (S * n * n, dv)),
              ("slot", slot, torch.int64, (S * n * n,)),
              ("touched", touched, torch.int64, None), ("used", used, torch.int64, (1,)),
              ("nonfinite", nonfinite, torch.int64, (1,))]
    for name, t, dtype, shape in checks:
        _check(name, t, dtype, cpu, shape)
    cap = touched.numel()
    if not same_call:
        _check("log", log, dt, cpu, (cap, dv))
        if bool((mask[:, s0:s0 + L] < 0).any()):
            raise ValueError("mask: window_step takes windows whose tokens all enter the addressing "
                             "loss (mask >= 0)")
    if new_keys.data_ptr() == K.data_ptr():
        raise ValueError("new_keys: must not be K's memory (the step reads K while writing new_keys)")
    if not 0 <= int(used[0]) <= cap:
        raise ValueError(f"used: expected a count in [0, {cap}], got {int(used[0])}")
    eps, lr, addr_w, ent_eps = (_real(nm, val) for nm, val in
                                (("eps", eps), ("lr", lr), ("addr_w", addr_w), ("ent_eps", ent_eps)))
    nbytes = _C.window_step_work(V.element_size(), B, L, H, k, S, n, dv)
    work = getattr(_SCRATCH, "window_step", None)  # scratch that never leaves the call: kept per thread
    if work is None or work.numel() < nbytes:
        with torch.inference_mode(False):
            work = _SCRATCH.window_step = torch.empty(nbytes, dtype=torch.uint8)
    tok = lambda t, width: t.data_ptr() + s0 * width * t.element_size()  # the window's first token
    args = dict(dots=dots.data_ptr(), K=K.data_ptr(), x=x.data_ptr(), v=tok(v, dv), g=tok(g, 1), mask=tok(mask, 1),
                B=B, L=L, Tt=T, H=H, n=n, k=k, S=S, d2=d2, dv=dv, la=la, kind=_KIND_CODE[kind],
                eps=eps, lr=lr, addr_w=addr_w, ent_eps=ent_eps,
                idx=tok(idx, H * k), half=tok(half, H * 2 * k), w=tok(w, H * k), vhat=tok(vhat, dv),
                V=V.data_ptr(), new_keys=new_keys.data_ptr(), slot=slot.data_ptr(),
                touched=touched.data_ptr(), used=used.data_ptr(), cap=cap, log=log.data_ptr(),
                nonfinite=nonfinite.data_ptr(), work=work.data_ptr())
    return _C.window_step(code, args)


def idw_pairs(table: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, xn: torch.Tensor,
              kn: torch.Tensor, eps: float):
    """CPU: IDW sub-scores of the pairs (x[m], table[rows[m, l]]) and 1 / (eps + distance),
    (s, inv) each (M, L), the distance from the norms xn (M,) and kn (R,) (kernels.h)."""
    if table.device.type != "cpu":
        raise ValueError(f"table: idw_pairs is CPU only, got device {table.device}")
    code, R, D, M, L = _table_and_rows(table, rows)
    dev, dt = table.device, table.dtype
    _check("x", x, dt, dev, (M, D))
    _check("xn", xn, dt, dev, (M,))
    _check("kn", kn, dt, dev, (R,))
    eps = _real("eps", eps)
    s = torch.empty(M, L, dtype=dt)
    inv = torch.empty(M, L, dtype=dt)
    _C.idw_pairs(code, table.data_ptr(), R, D, rows.data_ptr(), x.data_ptr(), M, L, xn.data_ptr(),
                 kn.data_ptr(), eps, s.data_ptr(), inv.data_ptr())
    return s, inv


def segment_coefs(offsets: torch.Tensor, order: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """CPU: coef (w's shape, flat) with coef[p] = (scale * w[p]) * (1 / count) for every pair p of
    a segment of `count` pairs (offsets/order as segment_rows gives them), 0 for the others: the
    value write's coefficients, scale = -lr * H * k (kernels.h)."""
    cpu = torch.device("cpu")
    code = _float_code("w", w)
    _check("w", w, w.dtype, cpu)
    _check("offsets", offsets, torch.int64, cpu)
    _check("order", order, torch.int64, cpu)
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets: expected a 1-D tensor of U + 1 >= 1 entries, got {tuple(offsets.shape)}")
    U, Q = offsets.numel() - 1, w.numel()
    if int(offsets[-1]) > order.numel():
        raise ValueError(f"offsets: its last entry ({int(offsets[-1])}) is beyond order ({order.numel()})")
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= Q):
        raise ValueError(f"order: pair ids must lie in [0, {Q})")
    scale = _real("scale", scale)
    coef = torch.empty(Q, dtype=w.dtype)
    _C.segment_coefs(code, offsets.data_ptr(), U, order.data_ptr(), w.data_ptr(), scale, Q,
                     coef.data_ptr())
    return coef


def scatter_pairs(table: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, x: torch.Tensor) -> None:
    """CPU, in place: table[rows[m, l]] += coef[m, l] * x[m] for every pair, each row's terms in
    pair order (scatter_rows' sums over segment_rows' buckets, without the sort): for small
    tables, the sub-keys (kernels.h). A row outside the table raises ValueError, nothing written."""
    if table.device.type != "cpu":
        raise ValueError(f"table: scatter_pairs is CPU only, got device {table.device}")
    code, R, D, M, L = _table_and_rows(table, rows)
    dev, dt = table.device, table.dtype
    _check("coef", coef, dt, dev, (M, L))
    _check("x", x, dt, dev, (M, D))
    if M * L == 0 or D == 0:
        return
    _C.scatter_pairs(code, table.data_ptr(), R, D, rows.data_ptr(), M, L, coef.data_ptr(), x.data_ptr())


def segment_rows(rows: torch.Tensor, R: int, pairs: Optional[torch.Tensor] = None):
    """CPU: the pair ids (pairs, default all of rows) grouped by row: (urows, offsets, order),
    a stable counting/radix sort (kernels.h). rows: int64 with values in [0, R)."""
    _check("rows", rows, torch.int64, torch.device("cpu"))
    if pairs is not None:
        _check("pairs", pairs, torch.int64, torch.device("cpu"))
    if isinstance(R, bool) or not isinstance(R, int) or R < 0:
        raise ValueError(f"R: expected an int >= 0, got {R!r}")
    Q = rows.numel() if pairs is None else pairs.numel()
    order = torch.empty(Q, dtype=torch.int64)
    urows = torch.empty(Q, dtype=torch.int64)
    offsets = torch.empty(Q + 1, dtype=torch.int64)
    work = torch.empty(_C.segment_rows_work(Q, R) if Q else 0, dtype=torch.int64)
    U = _C.segment_rows(rows.data_ptr(), pairs.data_ptr() if pairs is not None else 0, Q, R,
                        order.data_ptr(), urows.data_ptr(), offsets.data_ptr(), work.data_ptr())
    return urows[:U], offsets[:U + 1], order


def read_positions(idx: torch.Tensor, half: torch.Tensor, n: int) -> torch.Tensor:
    """CPU: pos (G * 2, k) with half[g, c, pos[g * 2 + c, j]] the sub-key of slot idx[g, j] in
    half c (kernels.h). idx (..., k) and half (..., 2, k): int64, the same leading shape."""
    _check("idx", idx, torch.int64, torch.device("cpu"))
    _check("half", half, torch.int64, torch.device("cpu"))
    k = idx.shape[-1] if idx.dim() else 0
    if half.shape != idx.shape[:-1] + (2, k):
        raise ValueError(f"half: expected shape {tuple(idx.shape[:-1]) + (2, k)}, got {tuple(half.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    G = idx.numel() // k if k else 0
    pos = torch.empty(G * 2, k, dtype=torch.int64)
    if G:
        _C.read_positions(idx.data_ptr(), half.data_ptr(), G, k, n, pos.data_ptr())
    return pos


def map_rows(slot: torch.Tensor, rows: torch.Tensor, cid: torch.Tensor, touched: torch.Tensor,
             U: int, table: torch.Tensor, compact: torch.Tensor) -> int:
    """CPU: cid = the compact ids of table rows `rows`, adding the rows not in `slot` yet (ids
    U, U + 1, ... by first occurrence; their table rows appended to `touched` and their values
    copied into `compact`). Returns the new U (kernels.h). A row outside the table, or more
    rows than `compact` holds, raises ValueError; `slot` is then unchanged."""
    cpu = torch.device("cpu")
    code = _table(table)
    _check("table", table, table.dtype, cpu)
    R, D = table.shape
    _check("slot", slot, torch.int64, cpu, (R,))
    _check("rows", rows, torch.int64, cpu)
    _check("cid", cid, torch.int64, cpu, tuple(rows.shape))
    _check("touched", touched, torch.int64, cpu)
    cap = touched.numel()
    _check("compact", compact, table.dtype, cpu, (cap, D))
    _used_rows(U, cap)
    if rows.numel() == 0:
        return U
    return _C.map_rows(code, slot.data_ptr(), R, rows.data_ptr(), rows.numel(), cid.data_ptr(),
                       touched.data_ptr(), U, cap, table.data_ptr(), compact.data_ptr(), D)


def build_info() -> dict:
    info = dict(_C.BUILD_INFO)
    info["cpu_isa"] = _C.cpu_isa()
    info["cpu_isas"] = list(_C.cpu_isas_available())
    return info


def cpu_isa() -> str:
    """The instruction-set variant the CPU kernels run: the widest this build holds and this CPU
    runs, of 'avx512' (AVX-512 F/BW/VL/DQ + FMA), 'avx2' (AVX2 + FMA) and 'base'.
    FWPKM_CPU_ISA=base (or avx2) in the environment before the import picks that one instead."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Run the CPU kernels' variant `name` ('base', 'avx2' or 'avx512') from now on; returns the
    previous one. For comparing the variants (tests, benchmarks): not while a kernel runs."""
    if name not in ("base", "avx2", "avx512"):
        raise ValueError(f"name: expected 'base', 'avx2' or 'avx512', got {name!r}")
    if name not in _C.cpu_isas_available():
        raise ValueError(f"name: {name!r} is not available here (available: {list(_C.cpu_isas_available())})")
    return _C.set_cpu_isa(name)
