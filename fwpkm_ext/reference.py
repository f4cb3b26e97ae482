"""Pure-PyTorch reference (oracle) for Fast-weight Product Key Memory.

This module implements the project's SPEC.md (the algorithm contract) literally, with autograd, and is the
ground truth every fast backend is tested against.  It is *never* the fast path:
it favours clarity over speed, builds dense per-window tables (one ``N x dv`` value
table per window, as the authors' code does) and keeps the whole autograd graph.

Conventions used throughout
---------------------------
* ``B`` batch, ``T`` tokens, ``H`` read heads, ``dk`` query/key dim (even),
  ``d = dk // 2`` half dim, ``n`` sub-keys per half, ``N = n * n`` slots,
  ``dv`` value dim, ``k`` top-k per head, ``C`` window (chunk) size.
* A fast-weight state is either *shared* (keys ``(H, 2, n, d)`` or ``(1, H, 2, n, d)``,
  values ``(N, dv)`` or ``(1, N, dv)``: one memory for every sequence of the batch) or
  *per sequence* (keys ``(B, H, 2, n, d)``, values ``(B, N, dv)``).  Returned states
  have the same shapes as the inputs.
* Slot index of the pair ``(i1, i2)`` is ``i1 * n + i2``.
* Ordering of selected entries: score descending, ties broken by the smaller index.
* dtype: all floating inputs are promoted to a common dtype (``torch.promote_types``),
  which is then the dtype of every output.  Tests use float64.

Interpretation choices (where SPEC.md leaves room) are documented in the docstrings
of the functions they affect; in short:

* Addressing loss: "entries below the row's k-th largest" keeps exactly the k sub-keys the
  read selects (ties at the k-th place broken by the smaller index, as everywhere); the
  selection is not differentiated.
* When the state is shared, a batch with a shared state of leading dim 1 is accepted
  as well as no leading dim.
* ``lookahead = 0`` is accepted (target = own value); negative lookahead is an error.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "sub_scores_reference",
    "product_key_topk_reference",
    "gather_reference",
    "read_reference",
    "window_targets_reference",
    "value_update_reference",
    "addressing_loss_reference",
    "key_update_reference",
    "fwpkm_memory_reference",
]

_SCORES = ("idw", "dot")

# Upper bound on the number of elements of the (rows, n, d) difference tensor that the
# direct IDW distance materialises at once (only matters for benchmark sizes).
_DIFF_CHUNK_ELEMS = 1 << 25


# --------------------------------------------------------------------------- helpers


def _check_score(score: str) -> None:
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")


def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _common_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    dt = None
    for x in xs:
        if x is None:
            continue
        dt = x.dtype if dt is None else torch.promote_types(dt, x.dtype)
    assert dt is not None
    return dt


def _with_state_dim(name: str, t: Tensor, dims: int, shape: str, B: int) -> Tensor:
    """A state table with its leading state dim: shared ``shape`` gets S = 1; a given leading
    dim must be 1 (shared) or B (per sequence)."""
    _check_float(name, t)
    if t.dim() == dims:
        t = t.unsqueeze(0)
    elif t.dim() != dims + 1:
        raise ValueError(f"{name} must have shape {shape} or (B, {shape[1:]}, got {tuple(t.shape)}")
    if t.shape[0] not in (1, B):
        raise ValueError(
            f"{name} leading (state) dim must be 1 (shared) or B={B} (per sequence), got {t.shape[0]}")
    return t


def _normalize_keys(keys: Tensor, B: int, H: Optional[int] = None, dk: Optional[int] = None
                    ) -> Tuple[Tensor, bool]:
    """Return keys as ``(S, H, 2, n, d)`` and whether the state is per sequence (S == B > 1)."""
    k5 = _with_state_dim("keys", keys, 4, "(H, 2, n, dk/2)", B)
    S, Hk, two, n, d = k5.shape
    if two != 2:
        raise ValueError(f"keys dim -3 must be 2 (the two halves), got shape {tuple(keys.shape)}")
    if H is not None and Hk != H:
        raise ValueError(f"keys has {Hk} heads but q has H={H}")
    if dk is not None and 2 * d != dk:
        raise ValueError(f"keys half dim {d} does not match q dim dk={dk} (need dk/2)")
    if n < 1 or d < 1:
        raise ValueError(f"keys has an empty dimension: {tuple(keys.shape)}")
    # S == 1 (also with B == 1) is treated as shared; it is the same thing either way.
    return k5, S != 1


def _normalize_values(values: Tensor, B: int) -> Tuple[Tensor, bool]:
    """Return values as ``(S, N, dv)`` and whether the state is per sequence."""
    v3 = _with_state_dim("values", values, 2, "(N, dv)", B)
    S = v3.shape[0]
    return v3, (S == B and S != 1)


def _check_q(q: Tensor) -> Tuple[int, int, int, int]:
    _check_float("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, T, H, dk), got {tuple(q.shape)}")
    B, T, H, dk = q.shape
    if dk % 2 != 0:
        raise ValueError(f"q last dim dk must be even, got {dk}")
    if H < 1:
        raise ValueError("q must have at least one head (H >= 1)")
    return B, T, H, dk


def _check_topk(topk: int, n: int) -> None:
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if topk > n:
        raise ValueError(f"topk={topk} must be <= n_subkeys={n}")


def _search_inputs(q: Tensor, keys: Tensor, topk: int, score: str):
    """Checked queries and keys of a search, in their common dtype: (q, keys as (S, H, 2, n, d),
    (B, T, H, dk))."""
    _check_score(score)
    B, T, H, dk = _check_q(q)
    k5, _ = _normalize_keys(keys, B, H, dk)
    _check_topk(topk, k5.shape[3])
    dt = _common_dtype(q, keys)
    return q.to(dt), k5.to(dt), (B, T, H, dk)


def _sorted_desc_smaller_index_first(s: Tensor) -> Tensor:
    """Permutation sorting the last dim by value descending, ties -> smaller position first.

    Uses a stable ascending sort of the negated (detached) values, so equal values keep
    their original (ascending index) order."""
    return torch.sort(-s.detach(), dim=-1, stable=True).indices


# --------------------------------------------------------------------------- read


def sub_scores_reference(qh: Tensor, kh: Tensor, *, score: str = "idw", eps: float = 1e-3) -> Tensor:
    """Dense sub-scores of half-queries against one half of the sub-keys.

    Args:
        qh: ``(S, R, H, d)`` half-queries (``R`` rows per state ``S``).
        kh: ``(S, H, n, d)`` sub-keys of the same half.
        score: ``"idw"`` -> ``-log(eps + ||q - K_i||^2)`` computed directly as the squared
            norm of the difference (no ``||a||^2 + ||b||^2 - 2ab`` expansion);
            ``"dot"`` -> ``q . K_i``.
    Returns:
        ``(S, R, H, n)`` scores, differentiable w.r.t. ``qh`` and ``kh``.
    """
    _check_score(score)
    if score == "dot":
        return torch.einsum("srhd,shnd->srhn", qh, kh)
    S, R, H, d = qh.shape
    n = kh.shape[2]
    per_row = max(1, H * n * d)
    step = max(1, _DIFF_CHUNK_ELEMS // (S * per_row))
    pieces = []
    for r0 in range(0, R, step):
        diff = qh[:, r0:r0 + step, :, None, :] - kh[:, None, :, :, :]  # (S, r, H, n, d)
        pieces.append((diff * diff).sum(-1))
    if not pieces:
        dist2 = qh.new_zeros((S, 0, H, n))
    else:
        dist2 = torch.cat(pieces, dim=1)
    return -torch.log(eps + dist2)


def product_key_topk_reference(
    q: Tensor,
    keys: Tensor,
    topk: int,
    *,
    score: str = "idw",
    eps: float = 1e-3,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Product-key top-k selection (SPEC "Read", steps 1-4).

    Args:
        q: ``(B, T, H, dk)`` queries.
        keys: ``(H, 2, n, dk/2)`` (or ``(1, H, 2, n, dk/2)``) shared, or
            ``(B, H, 2, n, dk/2)`` per sequence.
        topk: ``k``, the number of slots selected per head (``1 <= k <= n``).
        score: ``"idw"`` (``-log(eps + ||q_m - K[h,m,i]||^2)``) or ``"dot"`` (``q_m . K[h,m,i]``).
        eps: IDW epsilon.

    Returns:
        ``idx`` ``(B, T, H, k)`` int64 slot ``i1 * n + i2``;
        ``scores`` ``(B, T, H, k)`` = ``s_1[i1] + s_2[i2]``;
        ``half_idx`` ``(B, T, H, 2, k)`` int64 per-half top-k indices;
        ``half_scores`` ``(B, T, H, 2, k)``.
        Everything is sorted by score descending, exact ties broken by the smaller index
        (sub-key index for the halves, slot index for the final selection).  Scores are
        differentiable w.r.t. ``q`` and ``keys``; indices are not.

    The candidate trick is exact, also under the tie rule: a slot ``(i1, i2)`` in the true
    top-k has ``i1`` in the top-k of ``s_1`` and ``i2`` in the top-k of ``s_2``.
    """
    q, k5, (B, T, H, dk) = _search_inputs(q, keys, topk, score)
    S, _, _, n, d = k5.shape
    k = topk

    # rows grouped per state: (S, R, H, dk)
    qs = q.reshape(S, (B // S) * T, H, dk)
    half_idx_l, half_sc_l = [], []
    for m in range(2):
        qm = qs[..., m * d:(m + 1) * d]
        s_m = sub_scores_reference(qm, k5[:, :, m], score=score, eps=eps)  # (S, R, H, n)
        order = _sorted_desc_smaller_index_first(s_m)[..., :k]
        half_idx_l.append(order)
        half_sc_l.append(torch.gather(s_m, -1, order))
    I1, I2 = half_idx_l
    a, b = half_sc_l
    cand = (a[..., :, None] + b[..., None, :]).reshape(*a.shape[:-1], k * k)
    slots = (I1[..., :, None] * n + I2[..., None, :]).reshape(*I1.shape[:-1], k * k)
    # tie rule on the candidates: order by slot first, then stable sort by score
    by_slot = torch.argsort(slots, dim=-1, stable=True)
    slots = torch.gather(slots, -1, by_slot)
    cand = torch.gather(cand, -1, by_slot)
    order = _sorted_desc_smaller_index_first(cand)[..., :k]
    idx = torch.gather(slots, -1, order)
    scores = torch.gather(cand, -1, order)

    idx = idx.reshape(B, T, H, k)
    scores = scores.reshape(B, T, H, k)
    half_idx = torch.stack([I1, I2], dim=-2).reshape(B, T, H, 2, k)
    half_scores = torch.stack([a, b], dim=-2).reshape(B, T, H, 2, k)
    return idx, scores, half_idx, half_scores


def gather_reference(values: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """Weighted gather: ``vhat[b, t] = sum_j w[b, t, j] * values[idx[b, t, j]]``.

    Args:
        values: ``(N, dv)`` (or ``(1, N, dv)``) shared, or ``(B, N, dv)`` per sequence.
        idx: ``(B, T, L)`` int64 slot indices in ``[0, N)``.
        w: ``(B, T, L)`` weights.
    Returns:
        ``(B, T, dv)``, differentiable w.r.t. ``values`` and ``w``.
    """
    if idx.dim() != 3:
        raise ValueError(f"idx must have shape (B, T, L), got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be an integer tensor (int64), got {idx.dtype}")
    _check_float("w", w)
    if w.shape != idx.shape:
        raise ValueError(f"w shape {tuple(w.shape)} must equal idx shape {tuple(idx.shape)}")
    B, T, L = idx.shape
    v3, _ = _normalize_values(values, B)
    S, N, dv = v3.shape
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= N):
        raise ValueError(f"idx entries must lie in [0, N={N})")
    dt = _common_dtype(values, w)
    v3 = v3.to(dt)
    w = w.to(dt)
    idx = idx.long()
    if S == 1:
        rows = v3[0][idx]  # (B, T, L, dv)
    else:
        b = torch.arange(B, device=idx.device).view(B, 1, 1)
        rows = v3[b, idx]  # (B, T, L, dv)
    return (w.unsqueeze(-1) * rows).sum(dim=2)


def read_reference(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    topk: int,
    score: str = "idw",
    eps: float = 1e-3,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Memory read with a fixed state (SPEC "Read", steps 1-6).

    Returns ``(vhat (B, T, dv), idx (B, T, H*k), w (B, T, H*k))``, where ``w`` is the
    softmax (temperature 1) over the ``H*k`` selected scores of each token (heads pooled)
    and the flat position ``h*k + j`` holds head ``h``'s ``j``-th selection.
    """
    B, T, H, _ = _check_q(q)
    idx, sc, _, _ = product_key_topk_reference(q, keys, topk, score=score, eps=eps)
    idx = idx.reshape(B, T, H * topk)
    w = torch.softmax(sc.reshape(B, T, H * topk), dim=-1)
    vhat = gather_reference(values, idx, w)
    return vhat, idx, w


# --------------------------------------------------------------------------- update


def window_targets_reference(
    vhat: Tensor,
    v: Tensor,
    g: Tensor,
    mask: Tensor,
    lookahead: int,
) -> Tuple[Tensor, Tensor]:
    """Residuals and contributing set of ONE window (SPEC "Update", first bullets).

    Args:
        vhat: ``(B, L, dv)`` reads of the window's tokens.
        v: ``(B, L, dv)`` value projections of the window's tokens.
        g: ``(B, L)`` gates.  mask: ``(B, L)`` (float; ``> 0`` means present).
        lookahead: ``la >= 0``; target of position ``t`` is ``v[t + la]`` inside the window.
    Returns:
        ``r`` ``(B, L, dv)`` with ``r_t = g_t * mask_t * (vhat_t - v_{t+la})`` on contributing
        positions and 0 elsewhere, and ``contributing`` ``(B, L)`` bool
        (target inside the window and ``mask > 0``).
    """
    B, L, dv = vhat.shape
    contributing = torch.zeros(B, L, dtype=torch.bool, device=vhat.device)
    r = torch.zeros_like(vhat)
    if lookahead < L:
        src = L - lookahead  # positions 0 .. src-1 have a target
        y = v[:, lookahead:]
        wt = (g * mask)[:, :src]
        res = wt.unsqueeze(-1) * (vhat[:, :src] - y)
        contributing[:, :src] = mask[:, :src] > 0
        # keep non-contributing residuals exactly zero (and free of inf/nan)
        res = torch.where(contributing[:, :src].unsqueeze(-1), res, torch.zeros_like(res))
        r = torch.cat([res, r[:, src:]], dim=1)
    return r, contributing


def value_update_reference(
    values: Tensor,
    idx: Tensor,
    w: Tensor,
    r: Tensor,
    contributing: Tensor,
    lr: float,
    topk: int,
    heads: int,
) -> Tensor:
    """Value (memorisation) update of one window, out of place.

    ``V_i <- V_i - lr * (k*H / N_i) * sum_{(t,j) contributing, idx_tj = i} w_tj * r_t``
    with ``N_i`` = number of contributing ``(t, h, j)`` entries reading slot ``i``, counted
    over all sequences sharing the memory (over each sequence alone for a per-sequence
    state).  Rows with ``N_i = 0`` are untouched.

    Args:
        values: ``(N, dv)`` / ``(1, N, dv)`` shared, or ``(B, N, dv)`` per sequence.
        idx, w: ``(B, L, H*k)`` slots and read weights of the window's tokens.
        r: ``(B, L, dv)`` residuals ``wt_t * (vhat_t - y_t)``.
        contributing: ``(B, L)`` bool, the set ``U``.
        lr: fast-weight step. topk: ``k``. heads: ``H``.
    Returns:
        New values with the shape of ``values``; differentiable w.r.t. ``values``, ``w``, ``r``.
    """
    B = idx.shape[0]
    v3, _ = _normalize_values(values, B)
    S, N, dv = v3.shape
    if idx.shape != w.shape or idx.dim() != 3:
        raise ValueError(f"idx and w must both be (B, L, H*k), got {tuple(idx.shape)} and {tuple(w.shape)}")
    if idx.shape[-1] != topk * heads:
        raise ValueError(f"idx last dim {idx.shape[-1]} must equal topk*heads={topk * heads}")
    if r.shape[:2] != idx.shape[:2] or r.shape[-1] != dv:
        raise ValueError(f"r must be (B, L, dv={dv}), got {tuple(r.shape)}")
    if contributing.shape != idx.shape[:2]:
        raise ValueError(f"contributing must be (B, L), got {tuple(contributing.shape)}")
    dt = _common_dtype(values, w, r)
    v3 = v3.to(dt)
    contributing = contributing.bool()

    # flat slot index into the (S*N, dv) table: sequence b uses state b (per seq) or 0
    if S == 1:
        off = torch.zeros(B, 1, 1, dtype=torch.long, device=idx.device)
    else:
        off = (torch.arange(B, device=idx.device) * N).view(B, 1, 1)
    flat_idx = (idx.long() + off)[contributing]  # (M, H*k)
    w_c = w.to(dt)[contributing]  # (M, H*k)
    r_c = r.to(dt)[contributing]  # (M, dv)
    if flat_idx.numel() == 0:
        return values.to(dt)
    counts = torch.bincount(flat_idx.reshape(-1), minlength=S * N).to(dt)  # N_i
    scale = (topk * heads) / counts[flat_idx]  # (M, H*k), N_i >= 1 here
    contrib = (scale * w_c).unsqueeze(-1) * r_c.unsqueeze(1)  # (M, H*k, dv)
    flat = v3.reshape(S * N, dv)
    new_flat = flat.index_add(0, flat_idx.reshape(-1), contrib.reshape(-1, dv), alpha=-lr)
    return new_flat.reshape(values.shape)


def _addressing_loss_one_memory(k4: Tensor, q: Tensor, topk: int, score: str, eps: float,
                                addr_loss_weight: float, rows_on: Optional[Tensor] = None) -> Tensor:
    """Loss for one memory: k4 ``(H, 2, n, d)``, q ``(R, H, dk)`` all rows sharing it;
    ``rows_on`` ``(R,)`` 0/1: rows left out of the marginal (skipped tokens) have 0."""
    H, _, n, d = k4.shape
    total = q.new_zeros(())
    for m in range(2):
        qm = q[..., m * d:(m + 1) * d].unsqueeze(0)  # (1, R, H, d)
        s = sub_scores_reference(qm, k4[:, m].unsqueeze(0), score=score, eps=eps)[0]  # (R, H, n)
        # exactly the k selected sub-keys (ties broken by the smaller index, like the read)
        top = _sorted_desc_smaller_index_first(s.detach())[..., :topk]
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
        s_masked = s.masked_fill(~keep, float("-inf"))
        P = torch.softmax(s_masked, dim=-1)  # (R, H, n)
        if rows_on is None:
            pbar = P.mean(dim=0)  # (H, n)
        else:
            pbar = (P * rows_on.view(-1, 1, 1)).sum(0) / rows_on.sum().clamp_min(1.0)
        Hm = -(pbar * torch.log(pbar + 1e-8)).sum(dim=-1)  # (H,)
        total = total + Hm.sum()
    return -addr_loss_weight * total


def addressing_loss_reference(
    keys: Tensor,
    q: Tensor,
    topk: int,
    *,
    score: str = "idw",
    eps: float = 1e-3,
    addr_loss_weight: float = 1.0,
    addr_mask: Optional[Tensor] = None,
) -> Tensor:
    """Addressing loss (marginal entropy) of ONE window (SPEC "Update", keys bullet).

    For every token row of the window (all ``B*T`` rows sharing the memory; any mask is
    ignored), per head ``h`` and half ``m``: ``P = softmax`` over the ``n`` sub-scores, with
    every entry outside the row's top-k set to ``-inf``; with exact ties at the k-th place the
    top-k is the one the read selects (ties broken by the smaller index), so exactly ``k``
    entries survive (the selection is not differentiated); ``pbar`` = mean of ``P`` over rows;
    ``H_m = -sum pbar * log(pbar + 1e-8)``; ``L = -w_addr * sum_{h,m} H_m``.

    Args:
        keys: ``(H, 2, n, dk/2)`` / ``(1, H, 2, n, dk/2)`` shared, or ``(B, H, 2, n, dk/2)``
            per sequence; then each sequence is its own memory and the result is the sum
            over sequences of their losses (rows = that sequence's tokens only).
        q: ``(B, T, H, dk)`` the window's queries.
        addr_mask: ``(B, T)`` 0/1 or None: tokens with 0 are left out of the marginal (the
            tokens skipped for non-finite input, SPEC "Inputs that must never reach the
            tables"); ``pbar`` is then the mean over the kept rows of each memory.
    Returns:
        Scalar loss, differentiable (to any order) w.r.t. ``keys`` and ``q``.
    """
    q, k5, (B, T, H, dk) = _search_inputs(q, keys, topk, score)
    S, _, _, n, _ = k5.shape
    if T == 0:
        return (k5.sum() * 0).reshape(())
    qs = q.reshape(S, (B // S) * T, H, dk)
    ons = None if addr_mask is None else addr_mask.to(q.dtype).reshape(S, (B // S) * T)
    losses = [
        _addressing_loss_one_memory(k5[s], qs[s], topk, score, eps, addr_loss_weight,
                                    None if ons is None else ons[s])
        for s in range(S)
    ]
    return torch.stack(losses).sum()


def key_update_reference(
    keys: Tensor,
    q: Tensor,
    topk: int,
    *,
    lr: float = 1.0,
    score: str = "idw",
    eps: float = 1e-3,
    addr_loss_weight: float = 1.0,
    create_graph: Optional[bool] = None,
    addr_mask: Optional[Tensor] = None,
) -> Tensor:
    """Key (addressing) update of one window: ``K <- K - lr * dL_addr/dK``.

    The gradient is taken with ``torch.autograd.grad``.  With ``create_graph`` (default:
    whenever grad mode is on and ``keys`` or ``q`` requires grad) the result stays
    differentiable (second order) w.r.t. ``q`` and ``keys``; otherwise the result is
    detached.  Works under ``torch.no_grad()`` too.  Returns a new tensor shaped like ``keys``.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and (keys.requires_grad or q.requires_grad)
    dt = _common_dtype(keys, q)
    with torch.enable_grad():
        if create_graph and keys.requires_grad:
            kk = keys.to(dt)
            qq = q.to(dt)
        else:
            kk = keys.detach().to(dt).requires_grad_(True)
            qq = q.to(dt) if create_graph else q.detach().to(dt)
        loss = addressing_loss_reference(kk, qq, topk, score=score, eps=eps,
                                         addr_loss_weight=addr_loss_weight, addr_mask=addr_mask)
        (grad,) = torch.autograd.grad(loss, kk, create_graph=create_graph)
    if not create_graph:
        return (keys.detach().to(dt) - lr * grad.detach())
    return kk - lr * grad


# --------------------------------------------------------------------------- memory


def fwpkm_memory_reference(
    q: Tensor,
    v: Tensor,
    g: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    topk: int,
    chunk_size: int,
    lookahead: int = 1,
    lr: float = 1.0,
    addr_loss_weight: float = 1.0,
    mask: Optional[Tensor] = None,
    score: str = "idw",
    eps: float = 1e-3,
    flush: bool = True,
    addr_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Full FwPKM memory over a sequence: windowed reads and fast-weight updates.

    Windows are absolute: ``[0, C), [C, 2C), ...``.  Reads of window ``c`` use the state left
    by window ``c-1``.  After each window the state is updated (SPEC "Update"):

    * values: :func:`value_update_reference` with the residuals of
      :func:`window_targets_reference` (targets ``v[t+la]`` inside the window, contributing
      set = target exists and ``mask > 0``, ``wt = g * mask``);
    * keys: :func:`key_update_reference` (addressing loss over all rows of the window,
      mask ignored), both computed from the state the window read.

    The last, shorter window is updated when ``flush=True`` and left pending (not written)
    when ``flush=False``.  Everything stays differentiable: the outer loss backpropagates
    through every fast update into ``q``, ``v``, ``g`` (and the initial state if it requires
    grad), second order through the key update.

    Args:
        q: ``(B, T, H, dk)``; v: ``(B, T, dv)``; g: ``(B, T)`` (or ``(B, T, 1)``);
        keys: ``(H, 2, n, dk/2)`` shared or ``(B, H, 2, n, dk/2)`` per sequence
            (a leading dim of 1 also means shared);
        values: ``(N, dv)`` shared or ``(B, N, dv)`` per sequence, ``N = n*n``;
        mask: ``(B, T)`` or None (= ones).
        addr_mask: ``(B, T)`` 0/1 or None (= ones): tokens left out of the addressing loss
            (skipped tokens; see :func:`addressing_loss_reference`).
    Returns:
        ``(vhat (B, T, dv), new_keys, new_values)``; states keep the input shapes.
        Inputs are never modified in place.
    """
    _check_score(score)
    B, T, H, dk = _check_q(q)
    k5, k_per_seq = _normalize_keys(keys, B, H, dk)
    v3, v_per_seq = _normalize_values(values, B)
    n = k5.shape[3]
    N, dv = v3.shape[1], v3.shape[2]
    if N != n * n:
        raise ValueError(f"values has N={N} rows but keys imply n*n={n * n}")
    if k5.shape[0] != v3.shape[0]:
        raise ValueError(
            f"keys and values must both be shared or both per sequence "
            f"(keys state dim {k5.shape[0]}, values state dim {v3.shape[0]})")
    _check_topk(topk, n)
    _check_float("v", v)
    if v.dim() != 3 or v.shape[0] != B or v.shape[1] != T or v.shape[2] != dv:
        raise ValueError(f"v must have shape (B={B}, T={T}, dv={dv}), got {tuple(v.shape)}")
    _check_float("g", g)
    if g.dim() == 3 and g.shape[-1] == 1:
        g = g.squeeze(-1)
    if g.shape != (B, T):
        raise ValueError(f"g must have shape (B={B}, T={T}), got {tuple(g.shape)}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != (B, T):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape (B={B}, T={T}), got {shape}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 0:
        raise ValueError(f"lookahead must be a non-negative int, got {lookahead!r}")

    dt = _common_dtype(q, v, g, keys, values)
    q, v, g = q.to(dt), v.to(dt), g.to(dt)
    mask_f = torch.ones(B, T, dtype=dt, device=q.device) if mask is None else mask.to(dt)

    K = keys.to(dt)
    V = values.to(dt)
    C = chunk_size
    outs = []
    for start in range(0, T, C):
        end = min(start + C, T)
        qw = q[:, start:end]
        vhat_w, idx_w, w_w = read_reference(qw, K, V, topk=topk, score=score, eps=eps)
        outs.append(vhat_w)
        if end - start < C and not flush:
            break  # pending partial window: read, not written
        r_w, contrib_w = window_targets_reference(
            vhat_w, v[:, start:end], g[:, start:end], mask_f[:, start:end], lookahead)
        V_new = value_update_reference(V, idx_w, w_w, r_w, contrib_w, lr, topk, H)
        K_new = key_update_reference(K, qw, topk, lr=lr, score=score, eps=eps,
                                     addr_loss_weight=addr_loss_weight,
                                     addr_mask=None if addr_mask is None else addr_mask[:, start:end])
        V, K = V_new, K_new
    vhat = torch.cat(outs, dim=1) if outs else v.new_zeros(B, 0, dv)
    if K is keys:
        K = keys.clone()
    if V is values:
        V = values.clone()
    return vhat, K.reshape(keys.shape), V.reshape(values.shape)
