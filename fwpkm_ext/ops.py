"""torch.library registrations of the native ops (autograd, fake tensors, torch.compile).

  fwpkm_ext::topk        product-key top-k (indices + their scores; not differentiable)
  fwpkm_ext::gather      weighted row gather, differentiable w.r.t. the table and the weights
  fwpkm_ext::memory      one complete FwPKM call (every window read and written), differentiable
                         w.r.t. q, v, g, keys and values through every fast update
  fwpkm_ext::memory_inplace  the same call writing the given tables in place (declared mutation):
                         streaming inference without autograd
  fwpkm_ext::*_backward  their backward passes, ops of their own so that compiled graphs can
                         call them

Each op allocates its outputs with torch and hands raw buffers to the native kernels.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _alloc, recurrence, _native

_NS = "fwpkm_ext"


def _cfg(topk, chunk_size, lookahead, lr, addr_loss_weight, score, eps, flush) -> recurrence.RecurrenceConfig:
    return recurrence.RecurrenceConfig(int(topk), int(chunk_size), int(lookahead), float(lr),
                          float(addr_loss_weight), str(score), float(eps), bool(flush))


def _exact(fn):
    """Run an op's implementation with autocast off. Under torch.autocast the matmuls inside
    (query . sub-key scores, the key update) would otherwise come out in bf16/fp16, which the
    native kernels refuse and which would round the scores that pick the slots. The tables stay
    float32, so the op computes in float32 whatever autocast does outside it."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return inner


# ------------------------------------------------------------------------------------------------
# topk


@torch.library.custom_op(f"{_NS}::topk", mutates_args=())
@_exact
def topk(q: Tensor, keys: Tensor, topk: int, score: str, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (B,T,H,dk), keys (S,H,2,n,dk/2) -> idx, scores (B,T,H,k), half_idx, half_scores (B,T,H,2,k).

    Scores are recomputed for the selected pairs exactly as the memory's read path computes them.
    """
    B, T, H, dk = q.shape
    d2 = dk // 2
    cfg = _cfg(topk, 1, 1, 0.0, 0.0, score, eps, True)
    qh = q.reshape(B, T, H, 2, d2).contiguous()
    idx, half = recurrence.search(qh, keys, keys.shape[0] > 1, cfg)
    grp = recurrence._group_of_batch(B, keys.shape[0], q.device)
    win = recurrence.Window(keys, qh, idx, half, grp, keys.shape[0] > 1, cfg)
    ss = win.read_sub_scores().view(B, T, H, 2, topk)
    hs = win.half.s.view(B, T, H, 2, topk)
    return idx, ss.sum(3), half, hs


@topk.register_fake
def _(q, keys, topk, score, eps):
    B, T, H, _ = q.shape
    i = q.new_empty(B, T, H, topk, dtype=torch.long)
    return i, q.new_empty(B, T, H, topk), q.new_empty(B, T, H, 2, topk, dtype=torch.long), \
        q.new_empty(B, T, H, 2, topk)


@torch.library.custom_op(f"{_NS}::topk_indices", mutates_args=())
@_exact
def topk_indices(q: Tensor, keys: Tensor, topk: int, score: str, eps: float) -> Tensor:
    """Only the selected slots (B,T,H,k) of `topk`: the search, no exact pair scores (a caller
    that differentiates the scores recomputes the selected ones, e.g. with pair_scores)."""
    B, T, H, dk = q.shape
    if B * T == 0:
        return q.new_empty(B, T, H, topk, dtype=torch.long)
    cfg = _cfg(topk, 1, 1, 0.0, 0.0, score, eps, True)
    qh = q.reshape(B, T, H, 2, dk // 2).contiguous()
    return recurrence.search(qh, keys, keys.shape[0] > 1, cfg)[0]


@topk_indices.register_fake
def _(q, keys, topk, score, eps):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, topk, dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# gather


@torch.library.custom_op(f"{_NS}::gather", mutates_args=())
@_exact
def gather(table: Tensor, rows: Tensor, w: Tensor) -> Tensor:
    """out[m] = sum_l w[m,l] * table[rows[m,l]]; table (R,D), rows/w (M,L)."""
    out = table.new_empty(rows.shape[0], table.shape[1])
    _native.gather_rows(table, rows, w, out)
    return out


@gather.register_fake
def _(table, rows, w):
    return table.new_empty(rows.shape[0], table.shape[1])


@torch.library.custom_op(f"{_NS}::gather_backward", mutates_args=())
@_exact
def gather_backward(gout: Tensor, table: Tensor, rows: Tensor, w: Tensor, need_table: bool) -> Tuple[Tensor, Tensor]:
    gw = w.new_empty(w.shape)
    gout = gout.contiguous()
    if not need_table:
        _native.gather_dot(table, rows, gout, gw)
        return gw, table.new_empty(0)
    urows, offsets, order, _ = recurrence.segments(rows.reshape(-1), R=table.shape[0])
    coef = w.reshape(-1).contiguous()
    if table.device.type == "cpu":
        # one sequential write of every row (zeros where no pair lands) into a buffer a previous
        # step's gradient left, when free: no zero pass before a random scatter, and no page
        # faults for a fresh 512 MiB at the paper's PKM. The weights' gradient (gather_dot's
        # values) comes from the same pass over the table in row order: no random row reads
        gt = _alloc.reusable(table.shape, table.dtype, table.device)
        _native.scatter_rows_dense(gt, urows, offsets, order, coef, gout, rows.shape[1],
                                   src=table.contiguous(), gw=gw)
    else:
        _native.gather_dot(table, rows, gout, gw)
        gt = _alloc.zeros(table.shape, table.dtype, table.device)
        _native.scatter_rows(gt, urows, offsets, order, coef, gout, rows.shape[1])
    return gw, gt


@gather_backward.register_fake
def _(gout, table, rows, w, need_table):
    return w.new_empty(w.shape), table.new_empty(table.shape if need_table else (0,))


def _gather_setup(ctx, inputs, output):
    table, rows, w = inputs
    ctx.save_for_backward(table, rows, w)


def _gather_bwd(ctx, gout):
    table, rows, w = ctx.saved_tensors
    gw, gt = gather_backward(gout, table, rows, w, bool(ctx.needs_input_grad[0]))
    return (gt if ctx.needs_input_grad[0] else None), None, gw


gather.register_autograd(_gather_bwd, setup_context=_gather_setup)


# ------------------------------------------------------------------------------------------------
# the fused memory call


@torch.library.custom_op(f"{_NS}::memory", mutates_args=())
@_exact
def memory(q: Tensor, v: Tensor, g: Tensor, mask: Tensor, keys: Tensor, values: Tensor,
           pend_idx: Tensor, pend_half: Tensor, topk: int, chunk_size: int, lookahead: int,
           lr: float, addr_loss_weight: float, score: str, eps: float, flush: bool,
           keep: bool, want_values: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One FwPKM call over all windows; see fwpkm_ext.functional.fwpkm_memory for the contract.

    keys (S,H,2,n,d2), values (S,N,dv); pend_idx (B,P,H,k) / pend_half (B,P,H,2,k): precomputed
    top-k of the first P tokens (pending tokens of a streaming state, P < chunk_size).
    Returns (vhat, new_keys, new_values, idx, half_idx, w, saved_rows, keys_hist, window_cache);
    the last three are what the backward needs (empty unless keep): window_cache holds each
    window's exact pair scores and addressing terms, so the backward does not recompute them.
    Without want_values, new_values is an empty tensor and the N x dv table is never copied
    (training, when the final state is not kept).
    Tokens with mask < 0 are skipped (no write, outside the addressing loss).
    """
    cfg = _cfg(topk, chunk_size, lookahead, lr, addr_loss_weight, score, eps, flush)
    return recurrence.forward(q, v, g, mask, keys, values, pend_idx, pend_half, cfg, keep,
                           want_values=want_values)


@memory.register_fake
def _(q, v, g, mask, keys, values, pend_idx, pend_half, topk, chunk_size, lookahead, lr,
      addr_loss_weight, score, eps, flush, keep, want_values=True):
    B, T, H, _ = q.shape
    dv = values.shape[-1]
    HK = H * topk
    W = -(-T // chunk_size)
    e = values.new_empty
    return (e(B, T, dv), keys.new_empty(keys.shape), e(values.shape if want_values else (0,)),
            e(B, T, H, topk, dtype=torch.long), e(B, T, H, 2, topk, dtype=torch.long), e(B, T, HK),
            e((B, T, HK, dv) if keep else (0,)), e((W,) + tuple(keys.shape) if keep else (0,)),
            e((W, recurrence.Window.cache_width(B, chunk_size, H, topk, keys.shape[0] * H * 2 * keys.shape[3]))
              if keep else (0,)))


@torch.library.custom_op(f"{_NS}::memory_backward", mutates_args=())
@_exact
def memory_backward(gvhat: Tensor, gkeys: Optional[Tensor], gvalues: Optional[Tensor], q: Tensor,
                    v: Tensor, g: Tensor, mask: Tensor, hist: Tensor, idx: Tensor, half_idx: Tensor,
                    w: Tensor, saved: Tensor, vhat: Tensor, values_shape: List[int], topk: int,
                    chunk_size: int, lookahead: int, lr: float, addr_loss_weight: float, score: str,
                    eps: float, flush: bool, need_gvalues: bool,
                    wcache: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _cfg(topk, chunk_size, lookahead, lr, addr_loss_weight, score, eps, flush)
    return recurrence.backward(gvhat, gkeys, gvalues, q, v, g, mask, hist, idx, half_idx, w, saved,
                            vhat, tuple(values_shape), cfg, need_gvalues, wcache)


@memory_backward.register_fake
def _(gvhat, gkeys, gvalues, q, v, g, mask, hist, idx, half_idx, w, saved, vhat, values_shape,
      topk, chunk_size, lookahead, lr, addr_loss_weight, score, eps, flush, need_gvalues, wcache=None):
    e = hist.new_empty
    return (e(q.shape), e(v.shape), e(g.shape), e(hist.shape[1:]),
            e(tuple(values_shape) if need_gvalues else (0,)))


@torch.library.custom_op(f"{_NS}::memory_inplace", mutates_args=("keys", "values"))
@_exact
def memory_inplace(q: Tensor, v: Tensor, g: Tensor, mask: Tensor, keys: Tensor, values: Tensor,
                   pend_idx: Tensor, pend_half: Tensor, topk: int, chunk_size: int, lookahead: int,
                   lr: float, addr_loss_weight: float, score: str, eps: float,
                   flush: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The inference twin of `memory`: the same call, writing the given keys (S,H,2,n,d2) and
    values (S,N,dv) in place (declared: they are mutated), once, after every window succeeded.
    Returns (vhat, idx, half_idx). Not differentiable: the streaming path without autograd."""
    cfg = _cfg(topk, chunk_size, lookahead, lr, addr_loss_weight, score, eps, flush)
    out = recurrence.forward(q, v, g, mask, keys, values, pend_idx, pend_half, cfg, False, inplace=True)
    return out[0], out[3], out[4]


@memory_inplace.register_fake
def _(q, v, g, mask, keys, values, pend_idx, pend_half, topk, chunk_size, lookahead, lr,
      addr_loss_weight, score, eps, flush):
    B, T, H, _ = q.shape
    e = values.new_empty
    return e(B, T, values.shape[-1]), e(B, T, H, topk, dtype=torch.long), e(B, T, H, 2, topk, dtype=torch.long)


_SCALARS = ("topk", "chunk_size", "lookahead", "lr", "addr_loss_weight", "score", "eps", "flush")


def _memory_setup(ctx, inputs, output):
    q, v, g, mask, keys, values, _, _, *scalars = inputs
    vhat, _, _, idx, half, w, saved, hist, wcache = output
    if not scalars[len(_SCALARS)] and any(ctx.needs_input_grad[:6]):
        raise RuntimeError("fwpkm_ext::memory was called with keep=False on inputs that need grad")
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, v, g, mask, hist, idx, half, w, saved, vhat, wcache)
    ctx.scalars = scalars[: len(_SCALARS)]
    ctx.n_scalar_args = len(scalars)
    ctx.values_shape = list(values.shape)


def _memory_bwd(ctx, gvhat, gkeys, gvalues, *_):
    q, v, g, mask, hist, idx, half, w, saved, vhat, wcache = ctx.saved_tensors
    if gvhat is None:
        gvhat = torch.zeros_like(vhat)
    need_v = bool(ctx.needs_input_grad[5])
    gq, gv, gg, gk, gvals = memory_backward(gvhat, gkeys, gvalues, q, v, g, mask, hist, idx, half, w,
                                            saved, vhat, ctx.values_shape, *ctx.scalars, need_v,
                                            wcache)
    ng = ctx.needs_input_grad
    return ((gq if ng[0] else None), (gv if ng[1] else None), (gg if ng[2] else None), None,
            (gk if ng[4] else None), (gvals if need_v else None)) + (None,) * (2 + ctx.n_scalar_args)


memory.register_autograd(_memory_bwd, setup_context=_memory_setup)


# ------------------------------------------------------------------------------------------------
# exact sub-scores of selected (query half, sub-key row) pairs, differentiable


@torch.library.custom_op(f"{_NS}::pair_scores", mutates_args=())
@_exact
def pair_scores(x: Tensor, kflat: Tensor, rows: Tensor, score: str, eps: float) -> Tensor:
    """s[m, j] = sub-score of query half x[m] (M2, d2) against key row kflat[rows[m, j]]."""
    return _pairs(x, kflat, rows, score, eps).s.contiguous()


def _pairs(x, kflat, rows, score, eps):
    x, kflat, rows = x.contiguous(), kflat.contiguous(), rows.contiguous()
    kn = recurrence.key_norms(kflat) if score == "idw" else None
    xn = recurrence.key_norms(x) if score == "idw" else None
    return recurrence.Pairs(kflat, kn, x, xn, rows, score, eps)


@pair_scores.register_fake
def _(x, kflat, rows, score, eps):
    return x.new_empty(rows.shape)


@torch.library.custom_op(f"{_NS}::slot_scores", mutates_args=())
@_exact
def slot_scores(q: Tensor, keys: Tensor, idx: Tensor) -> Tensor:
    """Dot sub-scores (B,T,H,2,k) of the selected slots idx (B,T,H,k): each half of q (B,T,H,dk)
    against its sub-key row of keys (S,H,2,n,dk/2) (S = 1 shared, S = B one memory per
    sequence), the values pair_scores gives over read_kid's rows, bit for bit. Not
    differentiable: a caller that needs gradients uses pair_scores. On CPU one native pass that
    dots each distinct half row of a (token, head) once and builds no row-id tensors."""
    B, T, H, dk = q.shape
    k = idx.shape[-1]
    per_seq = keys.shape[0] > 1
    if q.device.type == "cpu":
        s = _native.slot_scores(q.reshape(B * T, H, 2, dk // 2).contiguous(), keys.contiguous(),
                                idx.reshape(B * T, H, k).contiguous(), max(T if per_seq else B * T, 1))
        return s.view(B, T, H, 2, k)
    return _slot_scores_torch(q, keys, idx)


def _slot_scores_torch(q: Tensor, keys: Tensor, idx: Tensor) -> Tensor:
    """slot_scores off the CPU: read_kid's rows, then the pair dots (gather_dot)."""
    B, T, H, dk = q.shape
    k, n = idx.shape[-1], keys.shape[3]
    kid = recurrence.read_kid(idx, recurrence._group_of_batch(B, keys.shape[0], q.device), H, n)
    x, kflat = q.reshape(-1, dk // 2).contiguous(), keys.reshape(-1, dk // 2).contiguous()
    return _pairs(x, kflat, kid.reshape(-1, k), "dot", 0.0).s.reshape(B, T, H, 2, k).contiguous()


@slot_scores.register_fake
def _(q, keys, idx):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, 2, idx.shape[-1])


@torch.library.custom_op(f"{_NS}::pair_scores_backward", mutates_args=())
@_exact
def pair_scores_backward(gs: Tensor, x: Tensor, kflat: Tensor, rows: Tensor, score: str,
                         eps: float) -> Tuple[Tensor, Tensor]:
    gk = torch.zeros_like(kflat)
    # the dot score's derivatives need no score: do not recompute the pair dots
    pairs = recurrence.Pairs.known(kflat.contiguous(), x.contiguous(), rows.contiguous(), score) \
        if score == "dot" else _pairs(x, kflat, rows, score, eps)
    gx = pairs.vjp(gs.contiguous(), gk)
    return gx, gk


@pair_scores_backward.register_fake
def _(gs, x, kflat, rows, score, eps):
    return x.new_empty(x.shape), kflat.new_empty(kflat.shape)


def _pair_setup(ctx, inputs, output):
    x, kflat, rows, score, eps = inputs
    ctx.save_for_backward(x, kflat, rows)
    ctx.score, ctx.eps = score, eps


def _pair_bwd(ctx, gs):
    x, kflat, rows = ctx.saved_tensors
    gx, gk = pair_scores_backward(gs, x, kflat, rows, ctx.score, ctx.eps)
    return gx, gk, None, None, None


pair_scores.register_autograd(_pair_bwd, setup_context=_pair_setup)
