"""Forward and backward of the FwPKM window recurrence on the native kernels.

Plain tensors in, plain tensors out: no autograd here (the ops module wires these functions into
torch.library custom ops). Layouts used throughout:

  q    (B, T, H, dk)       viewed as halves qh (B, T, H, 2, d2), d2 = dk / 2
  keys (S, H, 2, n, d2)    S = 1 (shared by the batch) or S = B (one memory per sequence)
  vals (S * N, dv)         N = n * n; sequence b reads rows of memory grp(b) = b if S == B else 0
  per token, HK = H * topk selected (slot, weight) pairs, heads pooled in one softmax

The value table is updated in place on a private clone, window by window (sparse write-back of the
touched rows only). For the backward pass the forward keeps, per token, the rows it read
(T * HK * dv floats) and one copy of the (small) key tables per window; the backward walks the
windows in reverse and keeps the value-table adjoint only for rows some window touched (compact
table indexed by the sorted unique touched rows), so memory never depends on N * dv per window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import _native

ENTROPY_EPS = 1e-8  # the addressing loss' log(pbar + 1e-8), SPEC "Update"

Tensor = torch.Tensor


@dataclass(frozen=True)
class Config:
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


def segments(rows: Tensor, pairs: Optional[Tensor] = None):
    """Bucket (row, pair) pairs by row for a one-writer-per-row scatter.

    rows: flat row id of every pair; pairs: the pair ids to keep (default all).
    Returns (urows, offsets, order, count_of_pair_row) with `order` the kept pair ids grouped by
    row in increasing pair order (stable sort: deterministic summation order).
    """
    if pairs is None:
        pairs = torch.arange(rows.numel(), device=rows.device)
    prow = rows[pairs]
    srt, perm = torch.sort(prow, stable=True)
    order = pairs[perm]
    urows, counts = torch.unique_consecutive(srt, return_counts=True)
    offsets = torch.zeros(urows.numel() + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return urows, offsets, order, counts.repeat_interleave(counts)


def row_add_(table: Tensor, rows: Tensor, x: Tensor) -> None:
    """table[rows[i]] += x[i] for 2-D table/x, deterministic (sorted segments, one writer per row)."""
    if rows.numel() == 0:
        return
    urows, offsets, order, _ = segments(rows)
    ones = torch.ones(rows.numel(), dtype=table.dtype, device=table.device)
    _native.scatter_rows(table, urows, offsets, order, ones, x.contiguous(), 1)


def scalar_add_(vec: Tensor, idx: Tensor, x: Tensor) -> None:
    """vec[idx[i]] += x[i] (1-D), deterministic on every device."""
    row_add_(vec.view(-1, 1), idx, x.reshape(-1, 1))


def key_rows(half_rows: Tensor, grp: Tensor, H: int, n: int) -> Tensor:
    """Flat row ids into keys.view(S*H*2*n, d2) for sub-key indices half_rows (B, L, H, 2, j)."""
    B = half_rows.shape[0]
    h = torch.arange(H, device=half_rows.device).view(1, 1, H, 1, 1)
    c = torch.arange(2, device=half_rows.device).view(1, 1, 1, 2, 1)
    return ((grp.view(B, 1, 1, 1, 1) * H + h) * 2 + c) * n + half_rows


def sub_scores(qh: Tensor, kflat: Tensor, kid: Tensor, score: str, eps: float):
    """Sub-scores of the selected sub-keys. qh (B,L,H,2,d2), kid (B,L,H,2,j) -> s (B,L,H,2,j).

    Also returns what the derivatives need: (s, e = q - K or K rows, inv = 1 / (eps + d) or None).
    """
    kg = kflat[kid]  # (B, L, H, 2, j, d2)
    if score == "idw":
        e = qh.unsqueeze(4) - kg
        inv = 1.0 / (eps + (e * e).sum(-1))
        return torch.log(inv), e, inv  # -log(eps + d)
    return (qh.unsqueeze(4) * kg).sum(-1), kg, None


def dscore(qh: Tensor, e: Tensor, inv: Optional[Tensor], score: str):
    """(ds/dq, ds/dK) per selected pair, shapes (B,L,H,2,j,d2)."""
    if score == "idw":
        gk = 2.0 * e * inv.unsqueeze(-1)
        return -gk, gk
    return e, qh.unsqueeze(4).expand_as(e)


def score_vjp(qh, kflat, kid, a, score, eps):
    """For coefficients a (B,L,H,2,j) on the sub-scores: (dq (B,L,H,2,d2), dK rows (.., d2))."""
    _, e, inv = sub_scores(qh, kflat, kid, score, eps)
    dq, dk = dscore(qh, e, inv, score)
    return (a.unsqueeze(-1) * dq).sum(4), a.unsqueeze(-1) * dk


def read_kid(idx: Tensor, grp: Tensor, H: int, n: int) -> Tensor:
    """Both halves' sub-key rows of selected slots idx (B,L,H,k) -> (B,L,H,2,k)."""
    return key_rows(torch.stack((idx // n, idx % n), dim=3), grp, H, n)


def read_weights(qh, kflat, idx, grp, H, n, score, eps):
    """Pooled softmax weights (B, L, H*k) of the selected slots, from the exact sub-scores."""
    s, _, _ = sub_scores(qh, kflat, read_kid(idx, grp, H, n), score, eps)
    B, L = idx.shape[:2]
    return torch.softmax(s.sum(3).reshape(B, L, -1), dim=-1)


# ----------------------------------------------------------------------------------------------
# addressing loss (marginal entropy of per-half top-k softmax), its gradient and its second order


class _AddrTerms:
    """Everything the addressing-loss gradient and its VJP share for one window."""

    def __init__(self, kflat, qh, half_idx, grp, H, n, rows_per_group, cfg: Config):
        self.kid = key_rows(half_idx, grp, H, n)
        self.s, self.e, self.inv = sub_scores(qh, kflat, self.kid, cfg.score, cfg.eps)
        self.P = torch.softmax(self.s, dim=-1)
        self.R = float(rows_per_group)
        self.flat = self.kid.reshape(-1)
        pbar = torch.zeros(kflat.shape[0], dtype=kflat.dtype, device=kflat.device)
        scalar_add_(pbar, self.flat, self.P.reshape(-1))
        self.pbar = pbar / self.R
        w, d = cfg.addr_loss_weight, ENTROPY_EPS
        pe = self.pbar + d
        self.phi = w * (torch.log(pe) + self.pbar / pe)  # dL/dpbar
        self.dphi = w * (1.0 / pe + d / (pe * pe))
        self.u = self.phi[self.kid] / self.R  # dL/dP
        self.gamma = self.P * (self.u - (self.P * self.u).sum(-1, keepdim=True))  # dL/ds
        self.dq, self.dk = dscore(qh, self.e, self.inv, cfg.score)
        self.qh, self.cfg = qh, cfg

    def grad_keys(self, kflat: Tensor) -> Tensor:
        g = torch.zeros_like(kflat)
        row_add_(g, self.flat, (self.gamma.unsqueeze(-1) * self.dk).reshape(-1, kflat.shape[1]))
        return g

    def vjp(self, lam: Tensor):
        """For F = <lam, dL/dK>: (dF/dK as a dense table, dF/dq (B,L,H,2,d2))."""
        lg = lam[self.kid]
        psi = (lg * self.dk).sum(-1)
        P, u = self.P, self.u
        pdot = P * (psi - (P * psi).sum(-1, keepdim=True))
        dpbar = torch.zeros_like(self.pbar)
        scalar_add_(dpbar, self.flat, pdot.reshape(-1))
        dpbar = dpbar / self.R
        du = (self.dphi * dpbar)[self.kid] / self.R
        chi = pdot * (u - (P * u).sum(-1, keepdim=True)) + P * (
            du - (pdot * u).sum(-1, keepdim=True) - (P * du).sum(-1, keepdim=True))
        if self.cfg.score == "idw":
            dpsi_de = 2.0 * self.inv.unsqueeze(-1) * (lg - psi.unsqueeze(-1) * self.e)
            dpsi_dq, dpsi_dk = dpsi_de, -dpsi_de
        else:
            dpsi_dq, dpsi_dk = lg, None
        g = self.gamma.unsqueeze(-1)
        gq = (chi.unsqueeze(-1) * self.dq + g * dpsi_dq).sum(4)
        rows = chi.unsqueeze(-1) * self.dk
        if dpsi_dk is not None:
            rows = rows + g * dpsi_dk
        gk = torch.zeros_like(lam)
        row_add_(gk, self.flat, rows.reshape(-1, lam.shape[1]))
        return gk, gq


# ----------------------------------------------------------------------------------------------
# the value write-back


def contributing(v_w, g_w, mask_w, la):
    """Targets y, contribution flags and token weights wt*1[contrib] for one window (B, L)."""
    B, L, dv = v_w.shape
    y = torch.zeros_like(v_w)
    contrib = torch.zeros(B, L, dtype=torch.bool, device=v_w.device)
    if la < L:
        y[:, : L - la] = v_w[:, la:]
        contrib[:, : L - la] = mask_w[:, : L - la] > 0
    wt = g_w * mask_w * contrib
    return y, contrib, wt


def value_pairs(rows: Tensor, contrib: Tensor, HK: int):
    """Segments of the contributing (row, pair) pairs and the per-pair factor 1 / N_row."""
    pid = torch.nonzero(contrib.reshape(-1, 1).expand(-1, HK).reshape(-1)).squeeze(1)
    urows, offsets, order, cnt = segments(rows.reshape(-1), pid)
    inv_count = torch.zeros(rows.numel(), dtype=torch.float64, device=rows.device)
    inv_count[order] = 1.0 / cnt.to(torch.float64)
    return urows, offsets, order, inv_count


# ----------------------------------------------------------------------------------------------
# forward


def search(qh_w: Tensor, K: Tensor, per_seq: bool, cfg: Config):
    """Native product-key top-k for the tokens of qh_w (B, L, H, 2, d2)."""
    B, L, H, _, d2 = qh_w.shape
    M = B * L
    k = cfg.topk
    if per_seq:
        dots = torch.einsum("blhcd,bhcnd->blhcn", qh_w, K)
    else:
        dots = torch.einsum("blhcd,hcnd->blhcn", qh_w, K[0])
    n = K.shape[3]
    dots = dots.reshape(M, H, 2, n).contiguous()
    opts = dict(dtype=qh_w.dtype, device=qh_w.device)
    idx = torch.empty(M, H, k, dtype=torch.long, device=qh_w.device)
    half_idx = torch.empty(M, H, 2, k, dtype=torch.long, device=qh_w.device)
    score = torch.empty(M, H, k, **opts)
    half_score = torch.empty(M, H, 2, k, **opts)
    qn = kn = None
    if cfg.score == "idw":
        qn = (qh_w * qh_w).sum(-1).reshape(M, H, 2).contiguous()
        kn = (K * K).sum(-1).contiguous()
    _native.topk_select(dots, qn, kn, k, L if per_seq else M, cfg.score, cfg.eps, idx, score,
                        half_idx, half_score)
    return idx.view(B, L, H, k), half_idx.view(B, L, H, 2, k)


def forward(q, v, g, mask, keys, values, pend_idx, pend_half, cfg: Config, keep: bool):
    """Run every window of one call. Returns
    (vhat, new_keys, new_values, idx, half_idx, w, saved_rows, keys_hist); the last two are empty
    unless `keep` (what the backward needs)."""
    B, T, H, dk = q.shape
    S, _, _, n, d2 = keys.shape
    N, dv, k = n * n, values.shape[-1], cfg.topk
    HK = H * k
    per_seq = S > 1
    dev, dt = q.device, values.dtype
    grp = _group_of_batch(B, S, dev)
    row_base = (grp * N).view(B, 1, 1)
    K = keys.clone()
    V = values.reshape(S * N, dv).clone()
    qh = q.reshape(B, T, H, 2, d2)
    P = pend_idx.shape[1]
    wins = windows(T, cfg.chunk_size)
    vhat = torch.empty(B, T, dv, dtype=dt, device=dev)
    idx_all = torch.empty(B, T, H, k, dtype=torch.long, device=dev)
    half_all = torch.empty(B, T, H, 2, k, dtype=torch.long, device=dev)
    w_all = torch.empty(B, T, HK, dtype=dt, device=dev)
    saved = torch.empty((B, T, HK, dv) if keep else (0,), dtype=dt, device=dev)
    hist = torch.empty((len(wins), S, H, 2, n, d2) if keep else (0,), dtype=dt, device=dev)
    if P:
        idx_all[:, :P] = pend_idx
        half_all[:, :P] = pend_half
    for wi, (s0, s1) in enumerate(wins):
        L = s1 - s0
        if keep:
            hist[wi] = K
        a0 = max(s0, P)
        if a0 < s1:
            i, hi = search(qh[:, a0:s1].contiguous(), K, per_seq, cfg)
            idx_all[:, a0:s1] = i
            half_all[:, a0:s1] = hi
        qh_w = qh[:, s0:s1].contiguous()
        idx_w = idx_all[:, s0:s1]
        kflat = K.view(-1, d2)
        w = read_weights(qh_w, kflat, idx_w, grp, H, n, cfg.score, cfg.eps)
        w_all[:, s0:s1] = w
        rows = (idx_w.reshape(B, L, HK) + row_base).reshape(B * L, HK)
        out = torch.empty(B * L, dv, dtype=dt, device=dev)
        sv = torch.empty(B * L, HK, dv, dtype=dt, device=dev) if keep else None
        _native.gather_rows(V, rows, w.reshape(B * L, HK).contiguous(), out, sv)
        vhat[:, s0:s1] = out.view(B, L, dv)
        if keep:
            saved[:, s0:s1] = sv.view(B, L, HK, dv)
        if L < cfg.chunk_size and not cfg.flush:
            continue
        # value write-back: V_i -= lr * HK / N_i * sum w r over the contributing pairs of row i
        y, contrib, wt = contributing(v[:, s0:s1], g[:, s0:s1], mask[:, s0:s1], cfg.lookahead)
        r = (wt.unsqueeze(-1) * (out.view(B, L, dv) - y)).reshape(B * L, dv)
        urows, offsets, order, inv_count = value_pairs(rows, contrib, HK)
        coef = (-cfg.lr * HK) * w.reshape(-1) * inv_count.to(dt)
        _native.scatter_rows(V, urows, offsets, order, coef, r, HK)
        # key update: K -= lr * dL_addr/dK
        rpg = L if per_seq else B * L
        terms = _AddrTerms(kflat, qh_w, half_all[:, s0:s1], grp, H, n, rpg, cfg)
        K = (kflat - cfg.lr * terms.grad_keys(kflat)).view_as(K)
    return vhat, K, V.view_as(values), idx_all, half_all, w_all, saved, hist


# ----------------------------------------------------------------------------------------------
# backward


def backward(gvhat, gkeys, gvalues, q, v, g, mask, hist, idx_all, half_all, w_all, saved, vhat,
             values_shape, cfg: Config, need_gvalues: bool = True):
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
    touched, cid = torch.unique(rows_all, return_inverse=True)
    if gvalues is not None:
        A = gvalues.reshape(S * N, dv)[touched].contiguous()  # adjoint of touched rows only
    else:
        A = torch.zeros(touched.numel(), dv, dtype=dt, device=dev)
    gK = gkeys.reshape(S * H * 2 * n, d2).clone() if gkeys is not None else \
        torch.zeros(S * H * 2 * n, d2, dtype=dt, device=dev)
    qh = q.reshape(B, T, H, 2, d2)
    gq = torch.zeros(B, T, H, 2, d2, dtype=dt, device=dev)
    gv = torch.zeros(B, T, dv, dtype=dt, device=dev)
    gg = torch.zeros(B, T, dtype=dt, device=dev)
    for wi, (s0, s1) in reversed(list(enumerate(windows(T, cfg.chunk_size)))):
        L = s1 - s0
        M = B * L
        kflat = hist[wi].reshape(-1, d2)
        qh_w = qh[:, s0:s1].contiguous()
        w = w_all[:, s0:s1].reshape(M, HK).contiguous()
        cid_w = cid[:, s0:s1].reshape(M, HK).contiguous()
        vhat_w = vhat[:, s0:s1].reshape(M, dv)
        gvh = gvhat[:, s0:s1].reshape(M, dv).clone()
        gw = torch.zeros(M, HK, dtype=dt, device=dev)
        if L == cfg.chunk_size or cfg.flush:
            # keys: K' = K - lr * G(K, q)  ->  gK -= lr * dG/dK^T gK ; gq -= lr * dG/dq^T gK
            rpg = L if per_seq else B * L
            terms = _AddrTerms(kflat, qh_w, half_all[:, s0:s1], grp, H, n, rpg, cfg)
            dk_sec, dq_sec = terms.vjp(gK)
            gK = gK - cfg.lr * dk_sec
            gq[:, s0:s1] -= cfg.lr * dq_sec
            # values: V' = V + sum_p coef_p r_t(p),  coef_p = -lr * HK * w_p / N_row(p)
            y, contrib, wt = contributing(v[:, s0:s1], g[:, s0:s1], mask[:, s0:s1], cfg.lookahead)
            rows = (idx_all[:, s0:s1].reshape(B, L, HK) + (grp * N).view(B, 1, 1)).reshape(M, HK)
            _, _, _, inv_count = value_pairs(rows, contrib, HK)
            fac = ((-cfg.lr * HK) * inv_count.to(dt)).view(M, HK)
            diff = vhat_w - y.reshape(M, dv)
            r = wt.reshape(M, 1) * diff
            rbar = torch.empty(M, dv, dtype=dt, device=dev)
            _native.gather_rows(A, cid_w, (fac * w).contiguous(), rbar)
            dotr = torch.empty(M, HK, dtype=dt, device=dev)
            _native.gather_dot(A, cid_w, r.contiguous(), dotr)
            gw += fac * dotr
            wt_f = wt.reshape(M, 1)
            gvh += wt_f * rbar
            gy = (-wt_f * rbar).view(B, L, dv)
            la = cfg.lookahead
            if la < L:
                gv[:, s0 + la:s1] += gy[:, : L - la]
            gwt = (rbar * diff).sum(-1).view(B, L) * contrib
            gg[:, s0:s1] += gwt * mask[:, s0:s1]
        # the read: vhat = sum_l w_l V[row_l] at the state V^(c) the window read
        gw += (saved[:, s0:s1].reshape(M, HK, dv) * gvh.unsqueeze(1)).sum(-1)
        urows, offsets, order, _ = segments(cid_w.reshape(-1))
        _native.scatter_rows(A, urows, offsets, order, w.reshape(-1), gvh.contiguous(), HK)
        gsc = w * (gw - (w * gw).sum(-1, keepdim=True))
        kid = read_kid(idx_all[:, s0:s1], grp, H, n)
        a = gsc.view(B, L, H, 1, k).expand(B, L, H, 2, k)
        dq_r, dk_rows = score_vjp(qh_w, kflat, kid, a, cfg.score, cfg.eps)
        gq[:, s0:s1] += dq_r
        row_add_(gK, kid.reshape(-1), dk_rows.reshape(-1, d2))
    if not need_gvalues:
        gvin = torch.empty(0, dtype=dt, device=dev)
    else:
        gvin = gvalues.reshape(S * N, dv).clone() if gvalues is not None else \
            torch.zeros(S * N, dv, dtype=dt, device=dev)
        gvin[touched] = A
        gvin = gvin.view(values_shape)
    return gq.view(B, T, H, dk), gv, gg, gK.view(S, H, 2, n, d2), gvin
