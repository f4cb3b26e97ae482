"""The fast twin of reference.py: the FwPKM window recurrence (forward and backward) on the
native kernels. reference.py states SPEC literally and is the oracle every test compares this
module against.

Plain tensors in, plain tensors out: no autograd here (the ops module wires these functions into
torch.library custom ops). Layouts used throughout:

  q    (B, T, H, dk)       viewed as halves qh (B, T, H, 2, d2), d2 = dk / 2
  keys (S, H, 2, n, d2)    S = 1 (shared by the batch) or S = B (one memory per sequence)
  vals (S * N, dv)         N = n * n; sequence b reads rows of memory grp(b) = b if S == B else 0
  per token, HK = H * topk selected (slot, weight) pairs, heads pooled in one softmax

A call that writes reads and writes a compact copy of the value rows it touches (TouchedRows) and
of the keys, window by window, and writes the given tables (or a new table, when asked for) once,
after the last window and a finiteness check: all or nothing. For the backward pass the forward
keeps, per token, the rows it read (T * HK * dv floats) and one copy of the (small) key tables per
window; the backward walks the windows in reverse and keeps the value-table adjoint only for rows
some window touched, so memory never depends on N * dv per window.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import _alloc, _native

ENTROPY_EPS = 1e-8  # the addressing loss' log(pbar + 1e-8), SPEC "Update"
# Largest |q|, |v|, |g| a token may carry. Beyond it the sub-scores (|q|^2 summed over up to
# thousands of dimensions) or the write-back residuals can overflow float32 although every input
# is finite; such tokens are refused (or skipped) like non-finite ones.
MAX_ABS = 1e15

Tensor = torch.Tensor


@dataclass(frozen=True)
class RecurrenceConfig:
    topk: int
    chunk_size: int
    lookahead: int
    lr: float
    addr_loss_weight: float
    score: str  # "idw" | "dot"
    eps: float
    flush: bool


# ----------------------------------------------------------------------------------------------
# small helpers


def windows(T: int, C: int) -> List[Tuple[int, int]]:
    return [(s, min(s + C, T)) for s in range(0, T, C)]


def _group_of_batch(B: int, S: int, device) -> Tensor:
    return torch.arange(B, device=device) if S > 1 else torch.zeros(B, dtype=torch.long, device=device)


def segments(rows: Tensor, pairs: Optional[Tensor] = None, counts: bool = False,
             R: Optional[int] = None):
    """Bucket (row, pair) pairs by row for a one-writer-per-row scatter.

    rows: flat row id of every pair, in [0, R); pairs: the pair ids to keep (default all).
    Returns (urows, offsets, order, count_of_pair_row) with `order` the kept pair ids grouped by
    row in increasing pair order (stable sort: deterministic summation order);
    count_of_pair_row (each kept pair's row count, in `order`) only with `counts`, else None.
    On CPU a native counting/radix sort (`_native.segment_rows`: 20-50x torch.sort on the
    few thousand pairs of a window); elsewhere torch's sort. Both give the same stable order.
    """
    if rows.device.type == "cpu":
        if R is None:
            R = int(rows.max()) + 1 if rows.numel() else 0
        urows, offsets, order = _native.segment_rows(rows, R, pairs)
        if not counts:
            return urows, offsets, order, None
        cnt = offsets[1:] - offsets[:-1]
        return urows, offsets, order, cnt.repeat_interleave(cnt)
    if pairs is None:
        pairs = torch.arange(rows.numel(), device=rows.device)
    prow = rows[pairs]
    srt, perm = torch.sort(prow, stable=True)
    order = pairs[perm]
    urows, cnt = torch.unique_consecutive(srt, return_counts=True)
    offsets = torch.zeros(urows.numel() + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(cnt, 0, out=offsets[1:])
    return urows, offsets, order, (cnt.repeat_interleave(cnt) if counts else None)


def unique_rows(rows: Tensor, R: int, inverse: bool = False):
    """torch.unique(rows, sorted=True[, return_inverse=True]) for row ids in [0, R), through the
    native bucketing on CPU (no comparison sort)."""
    if rows.device.type != "cpu":
        return torch.unique(rows, return_inverse=inverse)
    flat = rows.reshape(-1)
    urows, offsets, order, _ = segments(flat, R=R)
    if not inverse:
        return urows
    inv = torch.empty_like(flat)
    inv[order] = torch.repeat_interleave(torch.arange(urows.numel()), offsets[1:] - offsets[:-1])
    return urows, inv.view(rows.shape)


def key_rows(half_rows: Tensor, grp: Tensor, H: int, n: int) -> Tensor:
    """Flat row ids into keys.view(S*H*2*n, d2) for sub-key indices half_rows (B, L, H, 2, j)."""
    B = half_rows.shape[0]
    h = torch.arange(H, device=half_rows.device).view(1, 1, H, 1, 1)
    c = torch.arange(2, device=half_rows.device).view(1, 1, 1, 2, 1)
    return ((grp.view(B, 1, 1, 1, 1) * H + h) * 2 + c) * n + half_rows


def read_kid(idx: Tensor, grp: Tensor, H: int, n: int) -> Tensor:
    """Both halves' sub-key rows of selected slots idx (B,L,H,k) -> (B,L,H,2,k)."""
    return key_rows(torch.stack((idx // n, idx % n), dim=3), grp, H, n)


# ----------------------------------------------------------------------------------------------
# pair algebra: every derivative of a sub-score s(x_m, K_r) is a combination of x_m and K_r, so
# the per-pair work reduces to the four native kernels; no (pairs x d2) temporaries.


def seg_sum(pairs: "Pairs", coef: Tensor, R: int) -> Tensor:
    """Dense (R,) vector: per row of pairs.rows, the sum of the pair coefficients (deterministic).

    On CPU: a weighted bincount, which adds in pair order, the order of the segments too, and
    needs no sorted segments; elsewhere the one-writer-per-row kernel over pairs.segs (CUDA's
    bincount uses atomics: not deterministic)."""
    if coef.device.type == "cpu":
        return torch.bincount(pairs.rows.reshape(-1), weights=coef.reshape(-1), minlength=R).to(coef.dtype)
    urows, offsets, order, _ = pairs.segs
    out = torch.zeros(R, 1, dtype=coef.dtype, device=coef.device)
    ones = torch.ones(coef.numel(), 1, dtype=coef.dtype, device=coef.device)
    _native.scatter_rows(out, urows, offsets, order, coef.reshape(-1).contiguous(), ones, 1)
    return out.view(R)


def gather_w(table: Tensor, rows: Tensor, w: Tensor) -> Tensor:
    out = torch.empty(rows.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    _native.gather_rows(table, rows, w.contiguous(), out)
    return out


def gather_x(table: Tensor, rows: Tensor, x: Tensor) -> Tensor:
    out = torch.empty(rows.shape, dtype=table.dtype, device=table.device)
    _native.gather_dot(table, rows, x, out)
    return out


class Pairs:
    """(query-half row m, sub-key row r) pairs, J per m: x (M2, d2), rows (M2, J) into kflat."""

    def __init__(self, kflat: Tensor, kn: Optional[Tensor], x: Tensor, xn: Optional[Tensor],
                 rows: Tensor, score: str, eps: float):
        self.kflat, self.x, self.rows, self.score = kflat, x, rows, score
        self._segs = None
        if score == "idw" and kflat.device.type == "cpu":  # one native pass, the same expression
            self.s, self.inv = _native.idw_pairs(kflat, rows.contiguous(), x, xn.contiguous(),
                                                 kn.contiguous(), eps)
            return
        dot = gather_x(kflat, rows, x)
        if score == "idw":
            d = (xn.unsqueeze(1) + kn[rows] - 2.0 * dot).clamp_min(0.0)
            self.inv = 1.0 / (eps + d)
            self.s = torch.log(self.inv)  # -log(eps + d)
        else:
            self.inv, self.s = None, dot

    @classmethod
    def known(cls, kflat: Tensor, x: Tensor, rows: Tensor, score: str, s: Optional[Tensor] = None,
              inv: Optional[Tensor] = None) -> "Pairs":
        """Pairs whose scores are known already (or, for dot scores, not needed: their vjp uses
        none): s and, for IDW, inv = 1 / (eps + d) as __init__ computes them."""
        self = cls.__new__(cls)
        self.kflat, self.x, self.rows, self.score = kflat, x, rows, score
        self.s, self.inv, self._segs = s, inv, None
        return self

    @property
    def segs(self):
        if self._segs is None:
            self._segs = segments(self.rows.reshape(-1), R=self.kflat.shape[0])
        return self._segs

    def scatter(self, table: Tensor, coef: Tensor) -> None:
        """table[rows[m, j]] += coef[m, j] * x[m] for every pair (table shaped like kflat), each
        row's terms in pair order. On CPU without sorting the pairs (scatter_pairs: the key
        tables are small); elsewhere over the sorted segments. The same sums either way."""
        coef = coef.reshape(self.rows.shape).contiguous()
        if table.device.type == "cpu":
            _native.scatter_pairs(table, self.rows.contiguous(), coef, self.x.contiguous())
        else:
            _native.scatter_rows(table, *self.segs[:3], coef.reshape(-1), self.x, self.rows.shape[1])

    def vjp(self, a: Tensor, gk: Tensor, want_gx: bool = True) -> Optional[Tensor]:
        """Coefficients a (M2, J) on the scores: adds a . ds/dK into gk (which must not be
        self.kflat), returns a . ds/dx (None without `want_gx`)."""
        K, x, R = self.kflat, self.x, self.kflat.shape[0]
        if self.score == "idw":
            a2 = 2.0 * a * self.inv  # ds/dK = a2 (x - K), ds/dx = -a2 (x - K)
            gx = gather_w(K, self.rows, a2) - a2.sum(1, keepdim=True) * x if want_gx else None
            self.scatter(gk, a2)
            gk.addcmul_(seg_sum(self, a2, R).unsqueeze(1), K, value=-1.0)
            return gx
        gx = gather_w(K, self.rows, a) if want_gx else None
        self.scatter(gk, a)
        return gx


def read_positions(idx: Tensor, half: Tensor, n: int) -> Tensor:
    """Where each selected slot's sub-keys sit in the per-half top-k lists.

    idx (..., H, k) slots i1 * n + i2, half (..., H, 2, k) the per-half lists (distinct ids, and
    each slot's halves are in them by construction). Returns pos (rows, k) with rows = ... * H * 2:
    half[r, pos[r, l]] == (i1 if r is a first half else i2) of slot l."""
    if idx.device.type == "cpu":  # native: k x k integer compares per list, no temporaries
        return _native.read_positions(idx.contiguous(), half.contiguous(), n)
    k = idx.shape[-1]
    sub = torch.stack((idx // n, idx % n), dim=-2).reshape(-1, k)
    hv = half.reshape(-1, k)
    if k <= 32:  # k x k comparisons per row beat a batched sort of short rows (~2x at k = 8)
        at = torch.arange(k, device=hv.device).view(1, k, 1)
        return ((hv.unsqueeze(2) == sub.unsqueeze(1)) * at).sum(1)
    srt, perm = torch.sort(hv, dim=1)
    return torch.gather(perm, 1, torch.searchsorted(srt, sub))


class Window:
    """The read of one window: selected slots, their scores and weights, with pair data for
    the addressing loss and for every derivative.

    Exact sub-scores are computed once, for the (query half, sub-key) pairs of the per-half top-k
    lists (`half`); a selected slot's score is the sum of its two halves' entries there (`pos`),
    so the read needs no pair computation of its own and its derivatives go through `half` too."""

    def __init__(self, K: Tensor, qh_w: Tensor, idx_w: Tensor, half_w: Tensor, grp: Tensor,
                 per_seq: bool, cfg: "RecurrenceConfig", amask: Optional[Tensor] = None,
                 cache: Optional[Tensor] = None, addr: bool = False, kn: Optional[Tensor] = None,
                 xn: Optional[Tensor] = None):
        """With `cache` (the row `to_cache` filled in the forward), the pair scores and, when
        `addr`, the addressing terms are taken from it instead of recomputed (the backward).
        `kn` and `xn`: key_norms of K and of qh_w, when the caller has them (IDW)."""
        B, L, H, _, d2 = qh_w.shape
        n, k = K.shape[3], cfg.topk
        self.B, self.L, self.H, self.k = B, L, H, k
        self.kflat = K.reshape(-1, d2)
        x = qh_w.reshape(-1, d2)
        rows = key_rows(half_w, grp, H, n).reshape(-1, k)
        if cache is None:
            if kn is None and cfg.score == "idw":
                kn = key_norms(K)
            kn = kn.reshape(-1) if kn is not None else None
            if cfg.score == "idw":
                xn = key_norms(x) if xn is None else xn.reshape(-1)
            else:
                xn = None
            self.half = Pairs(self.kflat, kn, x, xn, rows, cfg.score, cfg.eps)
        else:
            per = cache[: rows.numel() * 5].view(5, -1, k)
            self.half = Pairs.known(self.kflat, x, rows, cfg.score, per[0],
                                    per[1] if cfg.score == "idw" else None)
        self.pos = read_positions(idx_w, half_w, n)
        if self.kflat.device.type == "cpu":  # one native pass (window_step computes the same)
            self.w = _native.read_weights(self.half.s.contiguous(), self.pos, B * L, H)
        else:
            sc = self.read_sub_scores().view(B, L, H, 2, k).sum(3)
            self.w = torch.softmax(sc.reshape(B * L, H * k), dim=-1)
        if amask is None:
            self.rows_per_group = float(L if per_seq else B * L)
            self.row_on = None
        else:
            # skipped tokens leave the marginal: per memory, the mean runs over the kept rows
            cnt = amask.sum(1) if per_seq else amask.sum().view(1)
            per_key_row = cnt.clamp_min(1.0).repeat_interleave(H * 2 * n)
            self.rows_per_group = per_key_row
            self.row_on = amask.reshape(B, L, 1, 1).expand(B, L, H, 2).reshape(-1, 1)
        self.cfg = cfg
        self._addr = None
        self.keys_finite: Optional[bool] = None  # known after a native key step
        if cache is not None and addr:
            R = self.kflat.shape[0]
            self._addr = (per[2], per[3], per[4], cache[cache.numel() - R:])

    # ---- what the backward reuses instead of recomputing the window (exact scores, weights and
    # addressing terms): one float row per window, [s, inv, P, u, gamma] per pair, then dphi
    @staticmethod
    def cache_width(B: int, C: int, H: int, k: int, R: int) -> int:
        return B * C * H * 2 * k * 5 + R

    def to_cache(self, row: Tensor) -> None:
        """Write this window's pair data into `row` (a cache_width vector); the addressing
        terms only when they were computed (a window that writes)."""
        hp = self.half
        n2 = hp.s.numel()
        per = row[: n2 * 5].view(5, n2)
        per[0] = hp.s.reshape(-1)
        if hp.inv is not None:
            per[1] = hp.inv.reshape(-1)
        if self._addr is not None:
            P, u, gamma, dphi = self.addr()
            per[2], per[3], per[4] = P.reshape(-1), u.reshape(-1), gamma.reshape(-1)
            row[row.numel() - dphi.numel():] = dphi

    def _per_row(self, x: Tensor) -> Tensor:
        """x / (rows sharing the memory) for a per-key-row vector x."""
        return x / self.rows_per_group

    def _per_pair(self, x_rows: Tensor) -> Tensor:
        """x / (rows sharing the memory) for a per-pair tensor indexed like half.rows."""
        R = self.rows_per_group
        return x_rows / (R if isinstance(R, float) else R[self.half.rows])

    def read_sub_scores(self) -> Tensor:
        """(B*L*H*2, k): the sub-score of each selected slot's half (the read pairs)."""
        return torch.gather(self.half.s, 1, self.pos)

    def read_vjp(self, a: Tensor, gk: Tensor) -> Tensor:
        """Coefficients a (B*L*H*2, k) on the read pairs' sub-scores: adds a . ds/dK into gk and
        returns a . ds/dx. Read pairs are half pairs: their coefficients are summed onto them."""
        ah = torch.zeros_like(a).scatter_add_(1, self.pos, a)
        return self.half.vjp(ah, gk)

    # addressing loss L = w_addr * sum_i pbar_i log(pbar_i + 1e-8), per (memory, head, half)
    def _native_addr(self) -> bool:
        """The addressing terms and key step by the native kernel (addr_step): on CPU, when every
        token row enters the loss with the same divisor (no skipped tokens)."""
        return (self.kflat.device.type == "cpu" and self.row_on is None
                and isinstance(self.rows_per_group, float))

    def _addr_native(self, lr: Optional[float]) -> Optional[Tensor]:
        hp = self.half
        P, u, gamma, pbar, new, bad = _native.addr_step(
            hp.s.contiguous(), hp.inv.contiguous() if hp.inv is not None else None,
            hp.rows.contiguous(), hp.x.contiguous(), self.kflat.contiguous(), self.rows_per_group,
            self.cfg.addr_loss_weight, 0.0 if lr is None else lr, ENTROPY_EPS, want_keys=lr is not None)
        self._addr = (P, u, gamma, None)
        self._pbar = pbar
        self.keys_finite = bad == 0 if new is not None else None
        return new

    def _dphi(self, pbar: Tensor) -> Tensor:
        w, d = self.cfg.addr_loss_weight, ENTROPY_EPS
        pe = pbar + d
        return w * (1.0 / pe + d / (pe * pe))

    def addr(self):
        """(P, u, gamma, dphi): the window's softmax over each pair row, dL/dP, dL/ds per pair,
        and d2L/dpbar2 per key row."""
        if self._addr is None:
            if self._native_addr():
                self._addr_native(None)
            else:
                hp = self.half
                P = torch.softmax(hp.s, dim=-1)
                if self.row_on is not None:
                    P = P * self.row_on
                pbar = self._per_row(seg_sum(hp, P, self.kflat.shape[0]))
                w, d = self.cfg.addr_loss_weight, ENTROPY_EPS
                pe = pbar + d
                phi = w * (torch.log(pe) + pbar / pe)  # dL/dpbar
                u = self._per_pair(phi[hp.rows])  # dL/dP
                gamma = P * (u - (P * u).sum(-1, keepdim=True))  # dL/ds
                self._addr = (P, u, gamma, self._dphi(pbar))
        if self._addr[3] is None:  # from the native kernel: dphi only when asked for
            self._addr = self._addr[:3] + (self._dphi(self._pbar),)
        return self._addr

    def updated_keys(self, lr: float) -> Tensor:
        """K - lr * dL_addr/dK. On CPU without skipped tokens, one native pass (addr_step: the
        terms, then the pair sums straight into a copy of the keys); otherwise the gradient's
        terms are accumulated into a copy of the keys with coefficients scaled by -lr."""
        if self._addr is None and self._native_addr():
            return self._addr_native(lr)
        _, _, gamma, _ = self.addr()
        new = self.kflat.clone()
        self.half.vjp(-lr * gamma, new, want_gx=False)
        return new

    def addr_vjp(self, lam: Tensor):
        """For F = <lam, dL_addr/dK>: (dF/dK dense, dF/dx (M2, d2))."""
        hp, K, x = self.half, self.kflat, self.half.x
        P, u, gamma, dphi = self.addr()
        if self._native_addr():  # one native call for the chain below (addr_vjp, kernels.h)
            inv = hp.inv.contiguous() if self.cfg.score == "idw" else None
            return _native.addr_vjp(P.contiguous(), u.contiguous(), gamma.contiguous(), dphi.contiguous(),
                                    inv, hp.rows.contiguous(), x.contiguous(), K.contiguous(),
                                    lam.contiguous(), self.rows_per_group)
        lx = gather_x(lam, hp.rows, x)
        if self.cfg.score == "idw":
            lk = (lam * K).sum(-1)
            psi = 2.0 * hp.inv * (lx - lk[hp.rows])  # <lam_r, ds/dK>
        else:
            psi = lx
        pdot = P * (psi - (P * psi).sum(-1, keepdim=True))
        dpbar = self._per_row(seg_sum(hp, pdot, K.shape[0]))
        du = self._per_pair((dphi * dpbar)[hp.rows])
        chi = pdot * (u - (P * u).sum(-1, keepdim=True)) + P * (
            du - (pdot * u).sum(-1, keepdim=True) - (P * du).sum(-1, keepdim=True))
        gk = torch.zeros_like(K)
        if self.cfg.score == "idw":
            alpha = -2.0 * hp.inv * (chi + gamma * psi)  # pair term alpha (x - K) + beta lam
            beta = 2.0 * hp.inv * gamma
            gx = alpha.sum(1, keepdim=True) * x - gather_w(K, hp.rows, alpha) + gather_w(lam, hp.rows, beta)
            hp.scatter(gk, -alpha)
            gk.addcmul_(seg_sum(hp, alpha, K.shape[0]).unsqueeze(1), K)
            gk.addcmul_(seg_sum(hp, beta, K.shape[0]).unsqueeze(1), lam, value=-1.0)
        else:
            gx = gather_w(K, hp.rows, chi) + gather_w(lam, hp.rows, gamma)
            hp.scatter(gk, chi)
        return gk, gx


# ----------------------------------------------------------------------------------------------
# the value write-back


def contributing(v_w, g_w, mask_w, la, targets: bool = True):
    """Targets y (None without `targets`), contribution flags and token weights wt*1[contrib]
    for one window (B, L)."""
    B, L, dv = v_w.shape
    y = torch.zeros_like(v_w) if targets else None
    contrib = torch.zeros(B, L, dtype=torch.bool, device=v_w.device)
    if la < L:
        if targets:
            y[:, : L - la] = v_w[:, la:]
        contrib[:, : L - la] = mask_w[:, : L - la] > 0
    wt = g_w * mask_w * contrib
    return y, contrib, wt


def residual(out: Tensor, v_w: Tensor, wt: Tensor, la: int) -> Tensor:
    """r = wt * (vhat - y) (B*L, dv) for one window, y_t = v_{t+la}, without materialising y:
    the same two roundings per element as wt * (out - y). The last la rows (no target: no pair
    of theirs is written) are 0."""
    B, L, dv = out.shape
    m = max(L - la, 0)
    r = torch.empty(B, L, dv, dtype=out.dtype, device=out.device)
    torch.sub(out[:, :m], v_w[:, la:la + m], out=r[:, :m])
    r[:, :m].mul_(wt[:, :m].unsqueeze(-1))
    r[:, m:].zero_()
    return r.view(B * L, dv)


def inv_counts(rows: Tensor, contrib: Tensor, HK: int, R: int) -> Tensor:
    """Per pair 1 / N_row over the contributing pairs (0 for the others), rows < R: what
    value_pairs computes, without sorting (the backward needs only this)."""
    on = contrib.reshape(-1, 1).expand(-1, HK).reshape(-1)
    flat = rows.reshape(-1)
    cnt = torch.bincount(flat, weights=on.to(torch.float64), minlength=R)
    return torch.where(on, 1.0 / cnt[flat].clamp_min(1.0), torch.zeros((), dtype=torch.float64))


def contributing_segments(rows: Tensor, contrib: Tensor, HK: int, R: Optional[int], counts: bool = False):
    """segments() of the contributing (row, pair) pairs: the HK pairs of each token with
    contrib set."""
    pid = torch.nonzero(contrib.reshape(-1, 1).expand(-1, HK).reshape(-1)).squeeze(1)
    return segments(rows.reshape(-1), pid, counts=counts, R=R)


def value_pairs(rows: Tensor, contrib: Tensor, HK: int, R: Optional[int] = None):
    """Segments of the contributing (row, pair) pairs (rows < R) and the per-pair factor 1 / N_row."""
    urows, offsets, order, cnt = contributing_segments(rows, contrib, HK, R, counts=True)
    inv_count = torch.zeros(rows.numel(), dtype=torch.float64, device=rows.device)
    inv_count[order] = 1.0 / cnt.to(torch.float64)
    return urows, offsets, order, inv_count


def value_coefs(rows: Tensor, contrib: Tensor, w: Tensor, scale: float, R: int):
    """Segments of the contributing (row, pair) pairs and each pair's write coefficient
    scale * w / N_row (0 for the others); scale = -lr * H * k. On CPU the coefficients come from
    the segments in one native pass, with the same roundings as the torch expression here."""
    HK = rows.shape[-1]
    if rows.device.type == "cpu":
        urows, offsets, order, _ = contributing_segments(rows, contrib, HK, R)
        return urows, offsets, order, _native.segment_coefs(offsets, order, w.reshape(-1).contiguous(), scale)
    urows, offsets, order, inv_count = value_pairs(rows, contrib, HK, R)
    return urows, offsets, order, scale * w.reshape(-1) * inv_count.to(w.dtype)


# ----------------------------------------------------------------------------------------------
# forward


def key_norms(K: Tensor) -> Tensor:
    """||K_r||^2 per sub-key (or query half), shaped like K without its last dimension. On CPU
    one native pass (row_norms, which window_step uses too), no (K * K) temporary."""
    if (K.device.type == "cpu" and K.dtype in (torch.float32, torch.float64) and K.dim() >= 1
            and not (K.requires_grad and torch.is_grad_enabled())):  # (the native pass has no gradient)
        return _native.row_norms(K.reshape(-1, K.shape[-1]).contiguous()).view(K.shape[:-1])
    return (K * K).sum(-1)


def search_dots(qh_w: Tensor, K: Tensor, per_seq: bool, buf: Optional[Tensor] = None,
                blocked: bool = False) -> Tensor:
    """Query half . sub-key for the tokens of qh_w (B, L, H, 2, d2): (B*L, H, 2, n), or with
    `blocked` (CPU's topk_select and window_step take it) (G, H, 2, L', n) with G = B, L' = L per
    sequence (per_seq) and G = 1, L' = B L otherwise. Written into the start of `buf` when given
    (a flat buffer of at least that size)."""
    B, L, H, _, d2 = qh_w.shape
    M, n = B * L, K.shape[3]
    G, Lg = (B, L) if per_seq else (1, M)
    # one GEMM per (memory, head, half), each written straight into its slice of the scores
    # (BLAS takes the row stride): no permuted copy of the scores, which an einsum over the heads
    # needs (64 MiB for the static PKM's 4 heads at 4096 tokens). Blocked, each slice is
    # contiguous: the paper configuration's 16 window GEMMs of a 4096-token call took 9.3 ms
    # into contiguous outputs against 10.5 into rows interleaved with the other half's
    shape = (G, H, 2, Lg, n) if blocked else (B, L, H, 2, n)
    if buf is None:
        dots = _alloc.reusable(shape, qh_w.dtype, qh_w.device)  # mapped pages: no faults
    else:
        dots = buf[: B * L * H * 2 * n].view(shape)
    for b in range(G):
        qs = qh_w[b] if per_seq else qh_w.view(M, H, 2, d2)
        for h in range(H):
            for c in range(2):
                out = dots[b, h, c] if blocked else (dots[b] if per_seq else dots.view(M, H, 2, n))[..., h, c, :]
                torch.mm(qs[..., h, c, :], K[b, h, c].t(), out=out)
    return dots if blocked else dots.view(M, H, 2, n)


class _WindowGemms:
    """search_dots(blocked=True) for the full windows of a one-sequence call (qh (1, T, H, 2, d2),
    contiguous: the caller checks), with every view made once: the query halves of each (head,
    half) over the call's tokens, the outputs in the scores buffer and, per key buffer, the
    transposed sub-key tables. A window then costs its 2 H GEMMs and as many slices, where
    search_dots took ~20 indexing ops per window (~0.4 ms of a 4096-token call at the paper
    configuration). A window's slice of the queries is the very tensor search_dots would be given
    (qh[:, s0:s1].contiguous() is qh[:, s0:s1]), so BLAS sees the same memory (its results may
    depend on alignment) and gives the same bits."""

    def __init__(self, qh: Tensor, dots: Tensor, C: int, n: int):
        H = qh.shape[2]
        self.C = C
        self.dots = dots[: H * 2 * C * n].view(1, H, 2, C, n)
        self.jobs = [(h, c) for h in range(H) for c in range(2)]
        self.q = [qh[0, :, h, c, :] for h, c in self.jobs]
        self.out = [self.dots[0, h, c] for h, c in self.jobs]
        self.kt = {}

    def __call__(self, K: Tensor, s0: int) -> Tensor:
        # the keys alternate between a few buffers (each window's new keys are a view of one);
        # the entry holds its tensor, so no other memory can take its address during the call
        kt = self.kt.get(K.data_ptr())
        if kt is None or kt[0].shape != K.shape or kt[0].stride() != K.stride():
            kt = self.kt[K.data_ptr()] = (K, [K[0, h, c].t() for h, c in self.jobs])
        s1 = s0 + self.C
        for q, k, out in zip(self.q, kt[1], self.out):
            torch.mm(q[s0:s1], k, out=out)
        return self.dots


def search(qh_w: Tensor, K: Tensor, per_seq: bool, cfg: RecurrenceConfig, kn: Optional[Tensor] = None,
           qn: Optional[Tensor] = None):
    """Native product-key top-k for the tokens of qh_w (B, L, H, 2, d2); `kn`: key_norms(K) and
    `qn`: key_norms(qh_w), when the caller has them (IDW)."""
    B, L, H, _, d2 = qh_w.shape
    M = B * L
    k = cfg.topk
    n = K.shape[3]
    # (the CUDA kernel takes the interleaved layout; no tokens: nothing to block)
    blocked = qh_w.device.type == "cpu" and M > 0
    dots = search_dots(qh_w, K, per_seq, blocked=blocked)
    opts = dict(dtype=qh_w.dtype, device=qh_w.device)
    idx = torch.empty(M, H, k, dtype=torch.long, device=qh_w.device)
    half_idx = torch.empty(M, H, 2, k, dtype=torch.long, device=qh_w.device)
    score = torch.empty(M, H, k, **opts)
    half_score = torch.empty(M, H, 2, k, **opts)
    if cfg.score == "idw":
        qn = (key_norms(qh_w) if qn is None else qn).reshape(M, H, 2).contiguous()
        kn = (key_norms(K) if kn is None else kn).contiguous()
    else:
        qn = kn = None
    _native.topk_select(dots, qn, kn, k, max(1, L if per_seq else M), cfg.score, cfg.eps, idx, score,
                        half_idx, half_score, block=dots.shape[3] if blocked else 0)
    return idx.view(B, L, H, k), half_idx.view(B, L, H, 2, k)


def finite_within(t: Tensor, lim: Optional[float] = None) -> bool:
    """All of t finite (and |t| <= lim): one min/max pass (NaN propagates through aminmax), no
    boolean temporaries; a tenth of the cost of isfinite().all() on a large table."""
    if t.numel() == 0:
        return True
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        return _native.all_within(t.detach(), lim)  # one pass over the bits, both cores
    lo, hi = (float(x) for x in torch.aminmax(t.detach().reshape(-1)))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    return lim is None or max(-lo, hi) <= lim


def _commit_check(K: Tensor, Cv: Tensor, wi: int, bad: Optional[Tensor] = None) -> None:
    """Raise when the keys or the written values are not finite. `bad` (CPU): the count of
    non-finite rows that scatter_rows found while writing them, which replaces a pass over the
    compact table (~11 ms for the paper configuration's 64 MiB of touched rows)."""
    values_ok = int(bad) == 0 if bad is not None else finite_within(Cv)
    if not finite_within(K) or not values_ok:
        raise ValueError(f"lr: the fast-weight update of window {wi} overflowed the float range "
                         "(non-finite keys or values); nothing was written. Lower lr, or the scale "
                         "of v and g")


#: Whether _windows runs a writing window of an in-place CPU call as one window_step call; the
#: op-by-op path computes the same bits (tests compare the two by turning this off).
FUSED_WINDOWS = True

_WORK = threading.local()  # per-thread CPU workspaces of TouchedRows (reused across calls)
_WORK_KEEP_BYTES = 1 << 29  # keep at most 512 MiB of compact table between calls


class TouchedRows:
    """The value rows one call touches, gathered into a compact table.

    Every read and write of the call goes to the compact copy `C` (row `slot[r]` holds table row
    `r`); the table itself is only written by `commit`, after the whole call succeeded and its
    result was checked finite. So a call that raises leaves an in-place state as it was, and a
    call whose caller does not want the new table never copies the N x dv table.

    On CPU the compact table and the row map live in per-thread workspaces reused by the next
    call: a fresh 64 MiB buffer per call cost more in page faults than the copies themselves.
    `release()` (always called, see forward) resets the map entries this call set."""

    def __init__(self, V: Tensor, capacity: int):
        self.V = V
        dev, R, D = V.device, V.shape[0], V.shape[1]
        ws = getattr(_WORK, "ws", None) if dev.type == "cpu" else None
        if ws is not None and ws["busy"]:
            ws = None  # re-entered (a memory call inside a memory call): private buffers
        if ws is not None and (ws["slot"].numel() < R or ws["C"].dtype != V.dtype or ws["C"].shape[1] != D
                               or ws["C"].shape[0] < capacity):
            ws = None
        if ws is None:
            # ordinary tensors even under torch.inference_mode: the workspace outlives the call,
            # and a later call outside it writes into it (inference tensors refuse that)
            with torch.inference_mode(False):
                ws = dict(slot=torch.full((R,), -1, dtype=torch.long, device=dev),
                          rows=torch.empty(capacity, dtype=torch.long, device=dev),
                          C=torch.empty(capacity, D, dtype=V.dtype, device=dev), busy=False)
            if dev.type == "cpu" and capacity * D * V.element_size() <= _WORK_KEEP_BYTES:
                _WORK.ws = ws
        ws["busy"] = True
        self.ws = ws
        self.slot, self.rows, self.C = ws["slot"][:R], ws["rows"], ws["C"]
        self.U = 0
        # CPU: non-finite rows counted by the value writes themselves (see _commit_check)
        self.bad = torch.zeros(1, dtype=torch.long) if dev.type == "cpu" else None

    def map(self, rows: Tensor) -> Tensor:
        """Compact ids of table rows `rows` (any shape), adding the rows not seen yet (on CPU in
        the order of their first occurrence, one native pass; elsewhere in increasing order)."""
        if rows.device.type == "cpu":
            rows = rows.contiguous()
            cid = torch.empty_like(rows)
            self.U = _native.map_rows(self.slot, rows, cid, self.rows, self.U, self.V, self.C)
            return cid
        cid = self.slot[rows]
        miss = cid < 0
        if bool(miss.any()):
            new = unique_rows(rows[miss], self.slot.numel())  # sorted: ids are deterministic
            m = new.numel()
            self.rows[self.U:self.U + m] = new  # before slot: resync trusts slot[rows[u]] == u
            self.slot[new] = torch.arange(self.U, self.U + m, device=rows.device)
            torch.index_select(self.V, 0, new, out=self.C[self.U:self.U + m])
            self.U += m
            cid = self.slot[rows]
        return cid

    def write_logged(self, urows: Tensor, offsets: Tensor, order: Tensor, coef: Tensor, x: Tensor,
                     L: int) -> None:
        """CPU, an in-place call's value write: scatter_rows into the table itself, each row
        written for the first time copied to the compact table (the undo log) just before, while
        it is in cache; the call's one random read of the rows it writes, where a map() of them
        before the scatter read each twice (~1 ms a window at the paper configuration)."""
        self.U = _native.scatter_rows_logged(self.V, urows, offsets, order, coef, x, L, self.bad,
                                             self.slot, self.rows, self.U, self.C)

    def resync(self) -> None:
        """After a call was interrupted: count the rows mapped beyond self.U. A native map or
        logged write adds rows (slot, rows) and returns the new count; an exception that lands
        between its return and the assignment (a KeyboardInterrupt, an injected failure) leaves
        self.U short, so the undo would miss those rows and release() would leave their map
        entries set for the next call. Every mapped id u has slot[rows[u]] == u; the entry past
        the last one does not (it is unset, or a row released by an earlier call, or mapped at
        another id), so the count grows while the next entry points back at it."""
        R, cap = self.slot.numel(), self.rows.numel()
        while self.U < cap:
            r = int(self.rows[self.U])
            if not 0 <= r < R or int(self.slot[r]) != self.U:
                break
            self.U += 1

    def release(self) -> None:
        # every map entry but the touched rows' is -1 already. With many touched rows (a 4096-token
        # call at the paper configuration: 30K of 262K), one sequential fill costs less than the
        # random writes (0.16-0.20 against 0.40-0.66 ms, the map out of cache)
        if self.U * 16 >= self.slot.numel():
            self.slot.fill_(-1)
        else:
            self.slot[self.touched] = -1
        self.ws["busy"] = False

    @staticmethod
    def scratch(rows: int, D: int, dtype, device) -> Tensor:
        """A zeroed (rows, D) table for the backward's adjoint rows. On CPU it is the idle
        compact-table workspace of this thread when that is large enough: its pages are mapped
        already, so zeroing it is a memset instead of ~8 ms of page faults for 30 MB. Valid until
        the next memory call on this thread (the backward finishes before any other starts)."""
        ws = getattr(_WORK, "ws", None) if device.type == "cpu" else None
        if (ws is None or ws["busy"] or ws["C"].dtype != dtype or ws["C"].shape[1] != D
                or ws["C"].shape[0] < rows):
            return torch.zeros(rows, D, dtype=dtype, device=device)
        return ws["C"][:rows].zero_()

    @property
    def table(self) -> Tensor:
        return self.C[: self.U]

    @property
    def touched(self) -> Tensor:
        return self.rows[: self.U]


def bad_tokens(t: Tensor, lim: Optional[float] = None) -> Tensor:
    """(B, T) True where token (b, t) of t (B, T, ...) holds a non-finite value (or |x| > lim)."""
    ok = torch.isfinite(t) if lim is None else torch.isfinite(t) & (t.abs() <= lim)
    return ~ok.reshape(t.shape[0], t.shape[1], -1).all(-1)


def check_tokens(q: Tensor, v: Tensor, g: Tensor, mask: Tensor, first: int) -> None:
    """SPEC "Inputs that must never reach the tables": a ValueError naming the argument and the
    first bad (batch, token) when a token of q, v or g is non-finite or beyond +-MAX_ABS, or the
    mask is non-finite. Token positions count from `first` (the caller's first new token)."""
    for name, t, lim in (("q", q, MAX_ABS), ("v", v, MAX_ABS), ("g", g, MAX_ABS), ("mask", mask, None)):
        if t.numel() == 0:
            continue
        if finite_within(t, lim):
            continue
        B, T = t.shape[:2]
        b, pos = torch.nonzero(bad_tokens(t, lim))[0].tolist()
        tok = t.reshape(B, T, -1)[b, pos]
        what = "a non-finite value (NaN or Inf)" if not bool(torch.isfinite(tok).all()) \
            else f"a value beyond +-{MAX_ABS:g}"
        hint = "" if name == "mask" else " Pass nonfinite='skip' (layer, memory_step) to leave such tokens out"
        raise ValueError(f"{name}: {what} at (batch {b}, token {pos - first}); nothing was "
                         f"written.{hint}")


def forward(q, v, g, mask, keys, values, pend_idx, pend_half, cfg: RecurrenceConfig, keep: bool,
            inplace: bool = False, want_values: bool = True):
    """Run every window of one call. Returns
    (vhat, new_keys, new_values, idx, half_idx, w, saved_rows, keys_hist); the last two are empty
    unless `keep` (what the backward needs). With `inplace` the given keys/values are updated
    (after the last window, all or nothing) and returned: no table copy per call. Without
    `want_values` (and not in place) new_values is an empty tensor: nothing copies the table.

    Tokens with mask < 0 are skipped tokens (non-finite input left out, see functional): they
    neither write values nor enter the addressing loss."""
    B, T, H, dk = q.shape
    S, _, _, n, d2 = keys.shape
    N, dv, k = n * n, values.shape[-1], cfg.topk
    HK = H * k
    per_seq = S > 1
    dev, dt = q.device, values.dtype
    P = pend_idx.shape[1]
    check_tokens(q, v, g, mask, P)
    grp = _group_of_batch(B, S, dev)
    row_base = (grp * N).view(B, 1, 1)
    K = keys.clone()
    qh = q.reshape(B, T, H, 2, d2)
    amask = addr_mask(mask)
    wins = windows(T, cfg.chunk_size)
    # the read: the caller's output, from a buffer an earlier call's caller dropped when there is
    # one (8 MiB at 4096 tokens of the paper configuration: 2,048 page faults otherwise)
    vhat = (_alloc.reusable((B, T, dv), dt, dev, exact=True) if not keep else
            torch.empty(B, T, dv, dtype=dt, device=dev))
    idx_all = torch.empty(B, T, H, k, dtype=torch.long, device=dev)
    half_all = torch.empty(B, T, H, 2, k, dtype=torch.long, device=dev)
    w_all = torch.empty(B, T, HK, dtype=dt, device=dev)
    # the rows read, for the backward: a buffer the previous step's backward freed, when there is
    # one (its pages are mapped: ~7 ms of page faults per default-model step otherwise)
    saved = _alloc.reusable((B, T, HK, dv), dt, dev) if keep else torch.empty(0, dtype=dt, device=dev)
    hist = torch.empty((len(wins), S, H, 2, n, d2) if keep else (0,), dtype=dt, device=dev)
    wcache = torch.zeros((len(wins), Window.cache_width(B, cfg.chunk_size, H, k, S * H * 2 * n))
                         if keep else (0,), dtype=dt, device=dev)
    if P:
        idx_all[:, :P] = pend_idx
        half_all[:, :P] = pend_half
    writes = any(s1 - s0 == cfg.chunk_size or cfg.flush for s0, s1 in wins)
    # a call that writes reads and writes a compact copy of the rows it touches (TouchedRows); a
    # read-only call reads the table itself
    tr = TouchedRows(values.view(S * N, dv), min(S * N, B * T * HK)) if writes else None
    # in place on CPU: the windows write the table itself and `tr` is an undo log of the rows
    # they write (their values before the call), put back if the call fails. That saves the
    # commit's copy back into the table; the log's gather costs about what the compact table's
    # did, since nearly every row read is also written (~5 ms of a 4096-token call at the paper
    # configuration, measured). CUDA keeps the compact table (no non-finite count there).
    undo = inplace and tr is not None and tr.bad is not None
    try:
        K = _windows(qh, v, g, mask, K, values.view(S * N, dv), tr, grp, row_base, amask, wins, P,
                     per_seq, cfg, keep, idx_all, half_all, w_all, vhat, saved, hist, undo, wcache)
        if not writes:  # a read-only call: the tables are returned as they are
            if inplace:
                return vhat, keys, values, idx_all, half_all, w_all, saved, hist, wcache
            V = _alloc.clone(values) if want_values else values.new_empty(0)
            return vhat, K, V, idx_all, half_all, w_all, saved, hist, wcache
        _commit_check(K, tr.table, len(wins) - 1, tr.bad)
        if inplace:
            keys.copy_(K)
            if not undo:
                values.view(S * N, dv).index_copy_(0, tr.touched, tr.table)
            K, V = keys, values
        elif want_values:
            V = _alloc.clone(values)
            V.view(S * N, dv).index_copy_(0, tr.touched, tr.table)
        else:
            V = values.new_empty(0)
    except BaseException:
        if tr is not None:
            tr.resync()  # rows a native call mapped before the failure hit the Python around it
        if undo:  # put back every row the call wrote (keys are only written on success)
            values.view(S * N, dv).index_copy_(0, tr.touched, tr.table)
        raise
    finally:
        if tr is not None:
            tr.release()
    return vhat, K, V, idx_all, half_all, w_all, saved, hist, wcache


def _windows(qh, v, g, mask, K, V, tr, grp, row_base, amask, wins, P, per_seq, cfg, keep,
             idx_all, half_all, w_all, vhat, saved, hist, undo=False, wcache=None):
    """The window loop of `forward`: fills idx_all/half_all/w_all/vhat (and saved/hist when
    `keep`), writes into `tr`'s compact table (with `undo`: into V, logging each row's value
    before its first write in `tr`), returns the final keys."""
    B, T, H, _, d2 = qh.shape
    dv, dt, dev = vhat.shape[-1], vhat.dtype, vhat.device
    HK = H * cfg.topk
    # a window that writes, of an in-place CPU call that keeps nothing and whose tokens all enter
    # the addressing loss: one native call (window_step), the same kernels as below
    fused = FUSED_WINDOWS and undo and not keep and amask is None and dev.type == "cpu"
    if fused:
        v, g, mask = v.contiguous(), g.contiguous(), mask.contiguous()
        dots = _alloc.reusable((B * cfg.chunk_size * H * 2 * K.shape[3],), dt, dev)  # every window's
        # the new keys of each window, alternately in two buffers (a window reads the other one)
        key_bufs = [_alloc.reusable(K.shape, dt, dev) for _ in range(2)]
        used = torch.tensor([tr.U], dtype=torch.long)  # the logged rows, kept up to date by the kernel
        fused_before = False  # a window_step of this call checked the call's arguments
        # (one sequence whose queries are contiguous: a window's slice of them is the very tensor
        # search_dots would be given, qh[:, s0:s1].contiguous(), so BLAS sees the same memory)
        gemms = _WindowGemms(qh, dots, cfg.chunk_size, K.shape[3]) if B == 1 and qh.is_contiguous() else None
    for wi, (s0, s1) in enumerate(wins):
        L = s1 - s0
        if keep:
            hist[wi] = K
        qh_w = qh[:, s0:s1].contiguous()
        a0 = max(s0, P)
        if fused and a0 == s0 and (L == cfg.chunk_size or cfg.flush):
            K = _window_step(qh_w, K, v, g, mask, s0, L, V, tr, per_seq, cfg, idx_all, half_all,
                             w_all, vhat, wi, dots, key_bufs[wi % 2], used, fused_before,
                             gemms if gemms is not None and L == cfg.chunk_size else None)
            fused_before = True
            continue
        # key and query-half norms once, for the search and the window
        kn = key_norms(K) if cfg.score == "idw" else None
        xn = key_norms(qh_w) if cfg.score == "idw" else None
        if a0 < s1:
            i, hi = search(qh_w[:, a0 - s0:].contiguous(), K, per_seq, cfg, kn,
                           None if xn is None else xn[:, a0 - s0:])
            idx_all[:, a0:s1] = i
            half_all[:, a0:s1] = hi
        am_w = None if amask is None else amask[:, s0:s1]
        win = Window(K, qh_w, idx_all[:, s0:s1], half_all[:, s0:s1], grp, per_seq, cfg, am_w, kn=kn,
                     xn=xn)
        w = win.w
        w_all[:, s0:s1] = w.view(B, L, HK)
        rows = (idx_all[:, s0:s1].reshape(B, L, HK) + row_base).reshape(B * L, HK)
        if tr is not None and not undo:
            rows, Cv = tr.map(rows), tr.table
        else:
            Cv = V
        if B == 1 or keep:
            # straight into vhat and saved (a sequence's window is contiguous in both): no
            # copy of the B*L*HK*dv saved rows, 4 MiB per window in the default model
            for b in range(B):
                sl = slice(b * L, (b + 1) * L)
                _native.gather_rows(Cv, rows[sl], w[sl], vhat[b, s0:s1],
                                    saved[b, s0:s1].view(L, HK, dv) if keep else None)
        else:  # many short sequences: one call, then one copy of the outputs
            out = torch.empty(B * L, dv, dtype=dt, device=dev)
            _native.gather_rows(Cv, rows, w, out)
            vhat[:, s0:s1] = out.view(B, L, dv)
        out = vhat[:, s0:s1]
        if L < cfg.chunk_size and not cfg.flush:
            if keep:
                win.to_cache(wcache[wi])
            continue
        # value write-back: V_i -= lr * HK / N_i * sum w r over the contributing pairs of row i
        _, contrib, wt = contributing(v[:, s0:s1], g[:, s0:s1], mask[:, s0:s1], cfg.lookahead,
                                     targets=False)
        r = residual(out, v[:, s0:s1], wt, cfg.lookahead)
        urows, offsets, order, coef = value_coefs(rows, contrib, w, -cfg.lr * HK, Cv.shape[0])
        # (a window that writes makes the call one that writes: tr exists here)
        if undo:  # rows written for the first time go to the undo log first, as they were
            tr.write_logged(urows, offsets, order, coef, r, HK)
        else:
            _native.scatter_rows(Cv, urows, offsets, order, coef, r, HK, nonfinite=tr.bad)
        # key update: K -= lr * dL_addr/dK
        K = win.updated_keys(cfg.lr).view_as(K)
        if keep:
            win.to_cache(wcache[wi])
        # stop at the first bad window (the native key step counted its non-finite rows)
        if not (finite_within(K) if win.keys_finite is None else win.keys_finite):
            _commit_check(K, Cv, wi, tr.bad)
    return K


def _window_step(qh_w, K, v, g, mask, s0, L, V, tr, per_seq, cfg, idx_all, half_all, w_all, vhat, wi,
                 dots_buf, new, used, same_call, gemms=None):
    """One window of _windows by window_step (see there); returns the new keys, raising (as
    _commit_check) when they are not finite. used [1]: tr.U, the logged rows (the kernel adds to
    it); same_call: an earlier window of this call ran window_step (the call's arguments checked)."""
    d2 = qh_w.shape[-1]
    dots = gemms(K, s0) if gemms is not None else search_dots(qh_w, K, per_seq, dots_buf, blocked=True)
    new = new.view(-1, d2)
    used[0] = tr.U
    try:
        bad = _native.window_step(
            dots, K.contiguous(), qh_w.reshape(-1, d2), v, g, mask, s0, L, cfg.lookahead, cfg.score,
            cfg.eps, cfg.lr, cfg.addr_loss_weight, ENTROPY_EPS, idx_all, half_all, w_all, vhat, V, new,
            tr.slot, tr.rows, used, tr.C, tr.bad, same_call=same_call)
    finally:
        tr.U = int(used[0])  # rows logged so far, put back by forward if anything failed
    new = new.view_as(K)
    if bad:
        _commit_check(new, V, wi, tr.bad)
    return new


def addr_mask(mask: Tensor) -> Optional[Tensor]:
    """Tokens that enter the addressing loss (B, T) as 0/1, or None when all do (mask >= 0)."""
    if mask.numel() == 0 or not bool((mask < 0).any()):
        return None
    return (mask >= 0).to(mask.dtype)


# ----------------------------------------------------------------------------------------------
# backward


def backward(gvhat, gkeys, gvalues, q, v, g, mask, hist, idx_all, half_all, w_all, saved, vhat,
             values_shape, cfg: RecurrenceConfig, need_gvalues: bool = True,
             wcache: Optional[Tensor] = None):
    """Gradients (gq, gv, gg, gkeys_in, gvalues_in) of one forward call; gkeys/gvalues may be
    None (unused outputs). gvalues_in is an empty tensor unless need_gvalues."""
    B, T, H, dk = q.shape
    W, S, _, _, n, d2 = hist.shape
    N, dv, k = n * n, vhat.shape[-1], cfg.topk
    HK = H * k
    per_seq = S > 1
    dev, dt = q.device, hist.dtype
    grp = _group_of_batch(B, S, dev)
    rows_all = idx_all.reshape(B, T, HK) + (grp * N).view(B, 1, 1)
    touched, cid = unique_rows(rows_all, S * N, inverse=True)
    if gvalues is not None:
        A = gvalues.reshape(S * N, dv)[touched].contiguous()  # adjoint of touched rows only
    else:
        A = TouchedRows.scratch(touched.numel(), dv, dt, dev)
    gK = gkeys.reshape(S * H * 2 * n, d2).clone() if gkeys is not None else \
        torch.zeros(S * H * 2 * n, d2, dtype=dt, device=dev)
    qh = q.reshape(B, T, H, 2, d2)
    gq = _alloc.reusable((B, T, H, 2, d2), dt, dev).zero_()  # (pages mapped by an earlier step)
    gv = _alloc.reusable((B, T, dv), dt, dev).zero_()
    gg = torch.zeros(B, T, dtype=dt, device=dev)
    amask = addr_mask(mask)
    for wi, (s0, s1) in reversed(list(enumerate(windows(T, cfg.chunk_size)))):
        L = s1 - s0
        M = B * L
        writes = L == cfg.chunk_size or cfg.flush
        args = (hist[wi], qh[:, s0:s1].contiguous(), idx_all[:, s0:s1], half_all[:, s0:s1], grp,
                per_seq, cfg, None if amask is None else amask[:, s0:s1])
        win = Window(*args, cache=wcache[wi] if wcache is not None and wcache.numel() else None,
                     addr=writes)
        w = win.w
        cid_w = cid[:, s0:s1].reshape(M, HK).contiguous()
        vhat_w = vhat[:, s0:s1].reshape(M, dv)
        gvh = gvhat[:, s0:s1].reshape(M, dv).clone()
        gw = torch.zeros(M, HK, dtype=dt, device=dev)
        if writes:
            # keys: K' = K - lr * G(K, q)  ->  gK -= lr * dG/dK^T gK ; gq -= lr * dG/dq^T gK
            dk_sec, dq_sec = win.addr_vjp(gK)
            gK.add_(dk_sec, alpha=-cfg.lr)
            gq[:, s0:s1] -= cfg.lr * dq_sec.view(B, L, H, 2, d2)
            # values: V' = V + sum_p coef_p r_t(p),  coef_p = -lr * HK * w_p / N_row(p)
            y, contrib, wt = contributing(v[:, s0:s1], g[:, s0:s1], mask[:, s0:s1], cfg.lookahead)
            inv_count = inv_counts(cid_w, contrib, HK, A.shape[0])
            fac = ((-cfg.lr * HK) * inv_count.to(dt)).view(M, HK)
            diff = vhat_w - y.reshape(M, dv)
            r = (wt.reshape(M, 1) * diff).contiguous()
            rbar = gather_w(A, cid_w, fac * w)
            gw += fac * gather_x(A, cid_w, r)
            wt_f = wt.reshape(M, 1)
            gvh += wt_f * rbar
            gy = (-wt_f * rbar).view(B, L, dv)
            la = cfg.lookahead
            if la < L:
                gv[:, s0 + la:s1] += gy[:, : L - la]
            gwt = (rbar * diff).sum(-1).view(B, L) * contrib
            gg[:, s0:s1] += gwt * mask[:, s0:s1]
        # the read: vhat = sum_l w_l V[row_l] at the state V^(c) the window read
        # gw[m, l] += saved[m, l] . gvh[m]: the native fixed-order dot over the saved rows
        # (a (M, HK, dv) product temporary cost more than the whole dot)
        gw += gather_x(saved[:, s0:s1].reshape(M * HK, dv).contiguous(),
                       torch.arange(M * HK, device=dev).view(M, HK), gvh)
        urows, offsets, order, _ = segments(cid_w.reshape(-1), R=A.shape[0])
        _native.scatter_rows(A, urows, offsets, order, w.reshape(-1), gvh.contiguous(), HK)
        gsc = w * (gw - (w * gw).sum(-1, keepdim=True))
        a = gsc.view(B, L, H, 1, k).expand(B, L, H, 2, k).reshape(-1, k)
        gq[:, s0:s1] += win.read_vjp(a, gK).view(B, L, H, 2, d2)
    if not need_gvalues:
        gvin = torch.empty(0, dtype=dt, device=dev)
    else:
        gvin = _alloc.clone(gvalues).view(S * N, dv) if gvalues is not None else \
            _alloc.zeros((S * N, dv), dt, dev)
        gvin[touched] = A
        gvin = gvin.view(values_shape)
    return gq.view(B, T, H, dk), gv, gg, gK.view(S, H, 2, n, d2), gvin
