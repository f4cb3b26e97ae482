"""Tests of the pure-PyTorch oracle ``fwpkm_ext/reference.py`` against independent
brute-force computations (python loops, hand formulas).  float64, tiny sizes.

reference.py is loaded by file path so these tests never need the compiled extension
that ``fwpkm_ext/__init__.py`` imports.
"""

import importlib.util
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

_REF_PATH = Path(__file__).resolve().parents[1] / "fwpkm_ext" / "reference.py"
_spec = importlib.util.spec_from_file_location("fwpkm_reference_under_test", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

DT = torch.float64


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=DT) * scale


def _rand(gen, *shape, lo=0.0, hi=1.0):
    return torch.rand(*shape, generator=gen, dtype=DT) * (hi - lo) + lo


# --------------------------------------------------------------------------- brute force


def bf_sub(qm, Km, score="idw", eps=1e-3):
    """Sub-scores of one half-query (d,) against Km (n, d), one slot at a time."""
    out = []
    for i in range(Km.shape[0]):
        if score == "idw":
            diff = qm - Km[i]
            out.append(-torch.log(eps + (diff * diff).sum()))
        else:
            out.append((qm * Km[i]).sum())
    return torch.stack(out)


def bf_topk_token(qt, Kh, k, score="idw", eps=1e-3):
    """Top-k over ALL n*n slots of one token/head: sort by (-score, slot)."""
    n, d = Kh.shape[1], Kh.shape[2]
    s1 = bf_sub(qt[:d], Kh[0], score, eps)
    s2 = bf_sub(qt[d:], Kh[1], score, eps)
    allc = [(s1[i1] + s2[i2], i1 * n + i2) for i1 in range(n) for i2 in range(n)]
    allc.sort(key=lambda p: (-float(p[0]), p[1]))
    return [p[1] for p in allc[:k]], torch.stack([p[0] for p in allc[:k]])


def bf_addr_loss(K, rows, topk, score="idw", eps=1e-3, w_addr=1.0):
    """Marginal-entropy addressing loss for one memory K (H,2,n,d) and a list of (H,dk) rows."""
    H, _, n, d = K.shape
    tot = K.new_zeros(())
    for h in range(H):
        for m in range(2):
            Ps = []
            for qt in rows:
                s = bf_sub(qt[h, m * d:(m + 1) * d], K[h, m], score, eps)
                kth = sorted(s.tolist(), reverse=True)[topk - 1]
                keep = torch.tensor([x >= kth for x in s.tolist()])
                s_m = torch.where(keep, s, torch.full_like(s, -math.inf))
                Ps.append(torch.softmax(s_m, dim=0))
            pbar = torch.stack(Ps).mean(0)
            tot = tot - (pbar * torch.log(pbar + 1e-8)).sum()
    return -w_addr * tot


def bf_memory(q, v, g, keys, values, *, topk, C, la=1, lr=1.0, w_addr=1.0, mask=None,
              score="idw", eps=1e-3, flush=True):
    """Token-by-token simulation of SPEC "Read" + "Update" (no autograd through it)."""
    q, v, g = q.detach(), v.detach(), g.detach()
    B, T, H, dk = q.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=DT)
    per_seq = keys.dim() == 5 and keys.shape[0] > 1
    if per_seq:
        groups = [[b] for b in range(B)]
        Ks = [keys[b].detach().clone() for b in range(B)]
        Vs = [values[b].detach().clone() for b in range(B)]
    else:
        groups = [list(range(B))]
        Ks = [keys.detach().reshape(keys.shape[-4:]).clone()]
        Vs = [values.detach().reshape(values.shape[-2:]).clone()]
    out = torch.zeros(B, T, v.shape[-1], dtype=DT)
    for gi, grp in enumerate(groups):
        K, V = Ks[gi], Vs[gi]
        for start in range(0, T, C):
            end = min(start + C, T)
            reads = {}
            for b in grp:
                for t in range(start, end):
                    slots, scs = [], []
                    for h in range(H):
                        s_idx, s_sc = bf_topk_token(q[b, t, h], K[h], topk, score, eps)
                        slots += s_idx
                        scs.append(s_sc)
                    w = torch.softmax(torch.cat(scs), dim=0)
                    vh = sum(w[j] * V[slots[j]] for j in range(len(slots)))
                    out[b, t] = vh
                    reads[(b, t)] = (slots, w, vh)
            if end - start < C and not flush:
                break
            counts = defaultdict(int)
            delta = {}
            for b in grp:
                for t in range(start, end):
                    if t + la < end and mask[b, t] > 0:
                        slots, w, vh = reads[(b, t)]
                        r = g[b, t] * mask[b, t] * (vh - v[b, t + la])
                        for j, i in enumerate(slots):
                            counts[i] += 1
                            delta[i] = delta.get(i, 0) + w[j] * r
            Vn = V.clone()
            for i, dsum in delta.items():
                Vn[i] = V[i] - lr * (topk * H / counts[i]) * dsum
            Kl = K.clone().requires_grad_(True)
            rows = [q[b, t] for b in grp for t in range(start, end)]
            loss = bf_addr_loss(Kl, rows, topk, score, eps, w_addr)
            (gK,) = torch.autograd.grad(loss, Kl)
            K = (K - lr * gK).detach()
            V = Vn
        Ks[gi], Vs[gi] = K, V
    if per_seq:
        return out, torch.stack(Ks), torch.stack(Vs)
    return out, Ks[0].reshape(keys.shape), Vs[0].reshape(values.shape)


def _make(seed, B, T, H, dk, n, dv, per_seq=False):
    gen = _gen(seed)
    S = (B,) if per_seq else ()
    q = _randn(gen, B, T, H, dk)
    v = _randn(gen, B, T, dv)
    g = _rand(gen, B, T, lo=0.2, hi=1.0)
    keys = _rand(gen, *S, H, 2, n, dk // 2, lo=-1.0, hi=1.0)
    values = _randn(gen, *S, n * n, dv, scale=dv ** -0.5)
    return q, v, g, keys, values


# --------------------------------------------------------------------------- (a) top-k


@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("per_seq", [False, True])
def test_topk_matches_brute_force(score, per_seq):
    B, T, H, dk, n, k = 2, 3, 2, 6, 5, 4
    q, _, _, keys, _ = _make(1, B, T, H, dk, n, 2, per_seq=per_seq)
    idx, sc, hidx, hsc = ref.product_key_topk_reference(q, keys, k, score=score)
    assert idx.dtype == torch.int64 and hidx.dtype == torch.int64
    assert idx.shape == (B, T, H, k) and sc.shape == (B, T, H, k)
    assert hidx.shape == (B, T, H, 2, k) and hsc.shape == (B, T, H, 2, k)
    d = dk // 2
    for b in range(B):
        Kb = keys[b] if per_seq else keys
        for t in range(T):
            for h in range(H):
                slots, scores = bf_topk_token(q[b, t, h], Kb[h], k, score)
                assert idx[b, t, h].tolist() == slots
                torch.testing.assert_close(sc[b, t, h], scores, rtol=0, atol=1e-12)
                for m in range(2):
                    s = bf_sub(q[b, t, h, m * d:(m + 1) * d], Kb[h, m], score)
                    order = sorted(range(n), key=lambda i: (-float(s[i]), i))[:k]
                    assert hidx[b, t, h, m].tolist() == order
                    torch.testing.assert_close(hsc[b, t, h, m], s[order], rtol=0, atol=1e-12)
    # sorted descending
    assert (sc[..., :-1] >= sc[..., 1:]).all()


def test_topk_exact_ties_break_by_smaller_index():
    # integer coordinates -> exact distances -> exact ties; duplicate sub-keys too
    n, k = 4, 3
    half0 = torch.tensor([[1.0], [-1.0], [1.0], [3.0]], dtype=DT)  # i=0,1,2 tie for q=0
    half1 = torch.tensor([[2.0], [0.0], [-2.0], [0.0]], dtype=DT)  # i=1,3 tie (best); 0,2 tie
    keys = torch.stack([half0, half1]).unsqueeze(0)  # (1, 2, 4, 1)
    q = torch.zeros(1, 1, 1, 2, dtype=DT)
    idx, sc, hidx, hsc = ref.product_key_topk_reference(q, keys, k)
    assert hidx[0, 0, 0, 0].tolist() == [0, 1, 2]
    assert hidx[0, 0, 0, 1].tolist() == [1, 3, 0]
    slots, scores = bf_topk_token(q[0, 0, 0], keys[0], k)
    # best score: halves {0,1,2} x {1,3}: slots 1,3,5,7,9,11 all tie -> smallest three
    assert slots == [1, 3, 5]
    assert idx[0, 0, 0].tolist() == slots
    torch.testing.assert_close(sc[0, 0, 0], scores, rtol=0, atol=0)
    # also for a whole batch of random integer data with many ties
    gen = _gen(7)
    keys = torch.randint(-2, 3, (2, 2, 5, 2), generator=gen).to(DT)
    q = torch.randint(-2, 3, (2, 4, 2, 4), generator=gen).to(DT)
    for score in ("idw", "dot"):
        idx, sc, _, _ = ref.product_key_topk_reference(q, keys, 5, score=score)
        for b in range(2):
            for t in range(4):
                for h in range(2):
                    slots, scores = bf_topk_token(q[b, t, h], keys[h], 5, score)
                    assert idx[b, t, h].tolist() == slots
                    torch.testing.assert_close(sc[b, t, h], scores, rtol=0, atol=0)


def test_topk_scores_differentiable():
    q, _, _, keys, _ = _make(3, 1, 2, 1, 4, 4, 2)
    q.requires_grad_(True)
    keys.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ref.product_key_topk_reference(a, b, 3)[1], (q, keys))


def test_gather_reference():
    gen = _gen(4)
    V = _randn(gen, 9, 3)
    idx = torch.randint(0, 9, (2, 3, 4), generator=gen)
    w = _randn(gen, 2, 3, 4)
    out = ref.gather_reference(V, idx, w)
    Vb = _randn(gen, 2, 9, 3)
    outb = ref.gather_reference(Vb, idx, w)
    for b in range(2):
        for t in range(3):
            exp = sum(w[b, t, j] * V[idx[b, t, j]] for j in range(4))
            torch.testing.assert_close(out[b, t], exp)
            expb = sum(w[b, t, j] * Vb[b, idx[b, t, j]] for j in range(4))
            torch.testing.assert_close(outb[b, t], expb)


@pytest.mark.parametrize("per_seq", [False, True])
def test_addressing_loss_matches_brute_force(per_seq):
    B, T, H, dk, n, k = 2, 3, 2, 4, 5, 2
    q, _, _, keys, _ = _make(5, B, T, H, dk, n, 2, per_seq=per_seq)
    L = ref.addressing_loss_reference(keys, q, k, addr_loss_weight=0.7)
    if per_seq:
        exp = sum(bf_addr_loss(keys[b], [q[b, t] for t in range(T)], k, w_addr=0.7)
                  for b in range(B))
    else:
        exp = bf_addr_loss(keys, [q[b, t] for b in range(B) for t in range(T)], k, w_addr=0.7)
    torch.testing.assert_close(L, exp)


# --------------------------------------------------------------------------- (b) one token


@pytest.mark.parametrize("lr,gate", [(1.0, 1.0), (0.5, 0.3)])
def test_single_token_update_moves_vhat_toward_target(lr, gate):
    # H=1, k=2, n=3, d=1: q=(0,0) ties exactly on sub-keys +-a / +-c -> slots 0 and 1,
    # uniform weights 1/2.
    a, c = 0.5, 0.25
    keys = torch.tensor([[[[a], [-a], [5.0]], [[c], [-c], [7.0]]]], dtype=DT)  # (1,2,3,1)
    gen = _gen(11)
    values = _randn(gen, 9, 3)
    q = torch.tensor([[[[0.0, 0.0]], [[5.0, 7.0]]]], dtype=DT)  # (1,2,1,2)
    v = _randn(gen, 1, 2, 3)
    g = torch.tensor([[gate, 0.9]], dtype=DT)
    idx, sc, _, _ = ref.product_key_topk_reference(q, keys, 2)
    assert idx[0, 0, 0].tolist() == [0, 1]
    assert sc[0, 0, 0, 0] == sc[0, 0, 0, 1]
    vhat, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=2, chunk_size=2,
                                              lookahead=1, lr=lr)
    vh0 = 0.5 * (values[0] + values[1])
    torch.testing.assert_close(vhat[0, 0], vh0)
    y = v[0, 1]
    # V_i <- V_i - lr * (k*H/N_i) * w * r,  k*H = 2, N_i = 1, w = 1/2, r = g*(vhat - y)
    exp_row = lambda i: values[i] - lr * 2.0 * 0.5 * gate * (vh0 - y)
    torch.testing.assert_close(V2[0], exp_row(0))
    torch.testing.assert_close(V2[1], exp_row(1))
    assert torch.equal(V2[2:], values[2:])  # only the two read rows change
    new_read = 0.5 * (V2[0] + V2[1])
    torch.testing.assert_close(new_read, vh0 - lr * gate * (vh0 - y))
    if lr == 1.0 and gate == 1.0:
        torch.testing.assert_close(new_read, y)  # one full step memorises exactly
    # moved toward y
    assert (new_read - y).norm() < (vh0 - y).norm() + 1e-15
    # keys got the addressing gradient (and only that)
    L = lambda K: ref.addressing_loss_reference(K, q, 2)
    Kl = keys.clone().requires_grad_(True)
    (gK,) = torch.autograd.grad(L(Kl), Kl)
    torch.testing.assert_close(K2, keys - lr * gK)


# --------------------------------------------------------------------------- (c) N_i counting


@pytest.mark.parametrize("heads", [1, 2])
def test_counts_average_repeated_reads(heads):
    B, T, dk, n, dv, k = 1, 3, 4, 4, 3, 3
    gen = _gen(21)
    q1 = _randn(gen, dk)
    q = torch.stack([q1, q1, _randn(gen, dk)]).view(1, T, 1, dk).expand(1, T, heads, dk)
    q = q.contiguous()
    keys1 = _rand(gen, 1, 2, n, dk // 2, lo=-1, hi=1)
    keys = keys1.expand(heads, 2, n, dk // 2).contiguous()  # identical heads
    values = _randn(gen, n * n, dv)
    v = _randn(gen, B, T, dv)
    g = torch.tensor([[0.7, 0.4, 0.9]], dtype=DT)
    lr = 0.8
    vhat, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=k, chunk_size=3,
                                              lookahead=1, lr=lr)
    idx, sc, _, _ = ref.product_key_topk_reference(q[:, :1, :1], keys[:1], k)
    slots = idx[0, 0, 0].tolist()
    wj = torch.softmax(sc[0, 0, 0], 0)  # per-head weights of one head of H=1
    vh = sum(wj[j] * values[slots[j]] for j in range(k))
    torch.testing.assert_close(vhat[0, 0], vh)
    torch.testing.assert_close(vhat[0, 1], vh)
    r0 = g[0, 0] * (vh - v[0, 1])
    r1 = g[0, 1] * (vh - v[0, 2])
    # each slot read by 2 tokens (x heads): N_i = 2*H; the increment is the average
    exp = values.clone()
    for j, i in enumerate(slots):
        exp[i] = values[i] - lr * (k / 2.0) * wj[j] * (r0 + r1)
    torch.testing.assert_close(V2, exp)
    # identical heads give the same state as one head
    _, K1, V1 = ref.fwpkm_memory_reference(q[:, :, :1], v, g, keys[:1], values, topk=k,
                                           chunk_size=3, lookahead=1, lr=lr)
    torch.testing.assert_close(V1, V2)
    torch.testing.assert_close(K1.expand_as(K2), K2)


@pytest.mark.parametrize("per_seq", [False, True])
def test_value_update_matches_loops(per_seq):
    gen = _gen(31)
    B, L, H, k, N, dv = 2, 5, 2, 3, 6, 4
    values = _randn(gen, *((B,) if per_seq else ()), N, dv)
    idx = torch.randint(0, N, (B, L, H * k), generator=gen)  # many repeats
    w = _rand(gen, B, L, H * k)
    r = _randn(gen, B, L, dv)
    contributing = torch.rand(B, L, generator=gen) > 0.3
    contributing[0, 0] = True
    lr = 0.6
    out = ref.value_update_reference(values, idx, w, r, contributing, lr, k, H)
    exp = values.clone()
    mems = range(B) if per_seq else [None]
    for mem in mems:
        counts, acc = defaultdict(int), {}
        for b in range(B):
            if per_seq and b != mem:
                continue
            for t in range(L):
                if not contributing[b, t]:
                    continue
                for j in range(H * k):
                    i = int(idx[b, t, j])
                    counts[i] += 1
                    acc[i] = acc.get(i, 0) + w[b, t, j] * r[b, t]
        for i, s in acc.items():
            if per_seq:
                exp[mem, i] = values[mem, i] - lr * (k * H / counts[i]) * s
            else:
                exp[i] = values[i] - lr * (k * H / counts[i]) * s
    torch.testing.assert_close(out, exp)


# --------------------------------------------------------------------------- (d) semantics


CASES = [
    # B, T, H, dk, n, dv, k, C, la, per_seq, use_mask, flush, score
    (1, 7, 1, 4, 4, 3, 2, 3, 1, False, False, True, "idw"),
    (2, 9, 2, 4, 4, 2, 2, 4, 2, False, True, False, "idw"),
    (2, 9, 2, 4, 4, 2, 2, 4, 2, False, True, True, "idw"),
    (2, 5, 1, 4, 3, 2, 2, 8, 1, True, True, True, "idw"),    # T < C
    (2, 6, 1, 4, 3, 2, 2, 3, 3, True, False, True, "idw"),   # la == C: nothing contributes
    (1, 6, 2, 2, 3, 2, 3, 3, 0, False, True, True, "dot"),   # la = 0, dot scores
    (2, 7, 1, 4, 4, 2, 1, 2, 1, False, False, True, "idw"),  # k = 1
]


@pytest.mark.parametrize("case", CASES)
def test_memory_matches_token_loop(case):
    B, T, H, dk, n, dv, k, C, la, per_seq, use_mask, flush, score = case
    q, v, g, keys, values = _make(41, B, T, H, dk, n, dv, per_seq=per_seq)
    mask = None
    if use_mask:
        mask = (torch.rand(B, T, generator=_gen(42)) > 0.3).to(DT)
        mask[0, 1] = 0.5  # fractional weights are allowed
    kw = dict(topk=k, lookahead=la, lr=0.7, mask=mask, score=score, flush=flush)
    vhat, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, chunk_size=C,
                                              addr_loss_weight=0.9, **kw)
    bvhat, bK, bV = bf_memory(q, v, g, keys, values, topk=k, C=C, la=la, lr=0.7,
                              w_addr=0.9, mask=mask, score=score, flush=flush)
    assert K2.shape == keys.shape and V2.shape == values.shape
    torch.testing.assert_close(vhat, bvhat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(K2, bK, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(V2, bV, rtol=1e-10, atol=1e-10)


def test_lookahead_at_least_window_leaves_values():
    q, v, g, keys, values = _make(51, 2, 8, 2, 4, 4, 3)
    for la in (4, 5, 100):
        vhat, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=2,
                                                  chunk_size=4, lookahead=la)
        assert torch.equal(V2, values)
        assert not torch.equal(K2, keys)  # addressing still updates the keys
        # window 0 reads the initial state
        v0, _, _ = ref.read_reference(q[:, :4], keys, values, topk=2)
        torch.testing.assert_close(vhat[:, :4], v0)


def test_mask_semantics():
    B, T, dk, n, dv, k, lr = 1, 3, 4, 4, 3, 3, 1.0
    gen = _gen(61)
    q1 = _randn(gen, dk)
    q = torch.stack([q1, q1, _randn(gen, dk)]).view(1, T, 1, dk)
    keys = _rand(gen, 1, 2, n, dk // 2, lo=-1, hi=1)
    values = _randn(gen, n * n, dv)
    v = _randn(gen, B, T, dv)
    g = torch.tensor([[0.7, 0.4, 0.9]], dtype=DT)
    run = lambda **kw: ref.fwpkm_memory_reference(q, v, kw.pop("g", g), keys, values, topk=k,
                                                  chunk_size=3, lr=lr, **kw)
    vhat, K_ref, _ = run()
    idx, sc, _, _ = ref.product_key_topk_reference(q[:, :1], keys, k)
    slots, wj = idx[0, 0, 0].tolist(), torch.softmax(sc[0, 0, 0], 0)
    vh = vhat[0, 0]
    r0 = g[0, 0] * (vh - v[0, 1])
    # mask=0 on token 1: it is not counted -> N_i = 1
    _, K_m, V_m = run(mask=torch.tensor([[1.0, 0.0, 1.0]], dtype=DT))
    exp = values.clone()
    for j, i in enumerate(slots):
        exp[i] = values[i] - lr * k * wj[j] * r0
    torch.testing.assert_close(V_m, exp)
    torch.testing.assert_close(K_m, K_ref)  # mask ignored by the addressing loss
    # g=0 on token 1: still counted -> N_i = 2, the increment is halved
    _, _, V_g = run(g=torch.tensor([[0.7, 0.0, 0.9]], dtype=DT))
    exp = values.clone()
    for j, i in enumerate(slots):
        exp[i] = values[i] - lr * (k / 2.0) * wj[j] * r0
    torch.testing.assert_close(V_g, exp)
    # all masked: values untouched, keys as without mask
    _, K_0, V_0 = run(mask=torch.zeros(1, 3, dtype=DT))
    assert torch.equal(V_0, values)
    torch.testing.assert_close(K_0, K_ref)
    # fractional mask acts like scaling the gate (for mask > 0)
    m = torch.tensor([[0.5, 0.25, 2.0]], dtype=DT)
    out_a = run(mask=m)
    out_b = run(g=g * m)
    for x, y in zip(out_a, out_b):
        torch.testing.assert_close(x, y)


def test_partial_window_and_flush():
    q, v, g, keys, values = _make(71, 2, 10, 2, 4, 4, 3)
    kw = dict(topk=2, chunk_size=4, lookahead=1, lr=0.9)
    vh_f, K_f, V_f = ref.fwpkm_memory_reference(q, v, g, keys, values, flush=True, **kw)
    vh_n, K_n, V_n = ref.fwpkm_memory_reference(q, v, g, keys, values, flush=False, **kw)
    torch.testing.assert_close(vh_f, vh_n)  # reads never see the last window's own write
    # flush=False: the state after the complete windows only
    _, K_p, V_p = ref.fwpkm_memory_reference(q[:, :8], v[:, :8], g[:, :8], keys, values, **kw)
    torch.testing.assert_close(K_n, K_p)
    torch.testing.assert_close(V_n, V_p)
    # flush=True: the tail window [8,10) is updated with its own length
    kw_tail = dict(kw, chunk_size=2)
    vh_t, K_t, V_t = ref.fwpkm_memory_reference(q[:, 8:], v[:, 8:], g[:, 8:], K_p, V_p, **kw_tail)
    torch.testing.assert_close(vh_t, vh_f[:, 8:])
    torch.testing.assert_close(K_t, K_f)
    torch.testing.assert_close(V_t, V_f)
    assert not torch.equal(V_f, V_n)
    # T < C with flush=True is one window of length T
    out_a = ref.fwpkm_memory_reference(q[:, :3], v[:, :3], g[:, :3], keys, values,
                                       **dict(kw, chunk_size=16))
    out_b = ref.fwpkm_memory_reference(q[:, :3], v[:, :3], g[:, :3], keys, values,
                                       **dict(kw, chunk_size=3))
    for x, y in zip(out_a, out_b):
        torch.testing.assert_close(x, y)
    # windows are absolute: two calls of whole windows == one call
    a1 = ref.fwpkm_memory_reference(q[:, :4], v[:, :4], g[:, :4], keys, values, **kw)
    a2 = ref.fwpkm_memory_reference(q[:, 4:8], v[:, 4:8], g[:, 4:8], a1[1], a1[2], **kw)
    torch.testing.assert_close(torch.cat([a1[0], a2[0]], 1), vh_f[:, :8])
    torch.testing.assert_close(a2[1], K_p)
    torch.testing.assert_close(a2[2], V_p)


def test_inputs_not_modified_and_no_grad_mode():
    q, v, g, keys, values = _make(81, 2, 6, 1, 4, 3, 2)
    copies = [x.clone() for x in (q, v, g, keys, values)]
    with torch.no_grad():
        vhat, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=2, chunk_size=3)
    for x, c in zip((q, v, g, keys, values), copies):
        assert torch.equal(x, c)
    assert not (vhat.requires_grad or K2.requires_grad or V2.requires_grad)
    out = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=2, chunk_size=3)
    for x, y in zip(out, (vhat, K2, V2)):
        torch.testing.assert_close(x, y)
    # float32 in -> float32 out
    out32 = ref.fwpkm_memory_reference(*(x.float() for x in (q, v, g, keys, values)), topk=2,
                                       chunk_size=3)
    assert all(x.dtype == torch.float32 for x in out32)
    torch.testing.assert_close(out32[0].double(), vhat, rtol=1e-4, atol=1e-5)


def test_shape_validation():
    q, v, g, keys, values = _make(82, 1, 4, 1, 4, 3, 2)
    call = lambda **kw: ref.fwpkm_memory_reference(
        kw.get("q", q), kw.get("v", v), kw.get("g", g), kw.get("keys", keys),
        kw.get("values", values), topk=kw.get("topk", 2), chunk_size=kw.get("C", 2),
        lookahead=kw.get("la", 1), mask=kw.get("mask"))
    bad = [
        ("q", dict(q=q[0])),
        ("dk", dict(q=q[..., :3])),
        ("v", dict(v=v[:, :3])),
        ("g", dict(g=g[:, :2])),
        ("keys", dict(keys=keys[:, :1])),
        ("values", dict(values=values[:5])),
        ("topk", dict(topk=4)),
        ("chunk_size", dict(C=0)),
        ("lookahead", dict(la=-1)),
        ("mask", dict(mask=torch.ones(1, 3))),
    ]
    for word, kw in bad:
        with pytest.raises(ValueError, match=word):
            call(**kw)
    with pytest.raises(ValueError, match="score"):
        ref.product_key_topk_reference(q, keys, 2, score="cos")


# --------------------------------------------------------------------------- (e) per sequence


def test_per_sequence_equals_separate_runs():
    B, T, H, dk, n, dv = 3, 7, 2, 4, 4, 3
    q, v, g, keys, values = _make(91, B, T, H, dk, n, dv, per_seq=True)
    mask = (torch.rand(B, T, generator=_gen(92)) > 0.2).to(DT)
    kw = dict(topk=2, chunk_size=3, lookahead=1, lr=0.8)
    vhat, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, mask=mask, **kw)
    for b in range(B):
        vb, Kb, Vb = ref.fwpkm_memory_reference(q[b:b + 1], v[b:b + 1], g[b:b + 1], keys[b],
                                                values[b], mask=mask[b:b + 1], **kw)
        torch.testing.assert_close(vhat[b:b + 1], vb)
        torch.testing.assert_close(K2[b], Kb)
        torch.testing.assert_close(V2[b], Vb)
    # the addressing loss of per-sequence keys is the sum of the per-sequence losses
    L = ref.addressing_loss_reference(keys, q, 2)
    Ls = sum(ref.addressing_loss_reference(keys[b], q[b:b + 1], 2) for b in range(B))
    torch.testing.assert_close(L, Ls)


def test_shared_state_duplicate_sequences_equal_single():
    # shared memory, batch of two identical sequences: counts and sums both double, means
    # over rows are unchanged -> same state as batch 1
    q, v, g, keys, values = _make(93, 1, 7, 2, 4, 4, 3)
    kw = dict(topk=2, chunk_size=3, lookahead=1, lr=0.8)
    out1 = ref.fwpkm_memory_reference(q, v, g, keys, values, **kw)
    dup = lambda x: torch.cat([x, x], 0)
    out2 = ref.fwpkm_memory_reference(dup(q), dup(v), dup(g), keys, values, **kw)
    torch.testing.assert_close(out2[0], dup(out1[0]))
    torch.testing.assert_close(out2[1], out1[1])
    torch.testing.assert_close(out2[2], out1[2])
    # leading state dim 1 means shared too
    out3 = ref.fwpkm_memory_reference(dup(q), dup(v), dup(g), keys[None], values[None], **kw)
    torch.testing.assert_close(out3[1], out1[1][None])
    torch.testing.assert_close(out3[2], out1[2][None])


# --------------------------------------------------------------------------- (f) gradients


def test_gradients_flow_through_updates():
    B, T, H, dk, n, dv, C = 2, 8, 2, 4, 4, 3, 4
    q, v, g, keys, values = _make(101, B, T, H, dk, n, dv)
    for x in (q, v, g):
        x.requires_grad_(True)
    vhat, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=2, chunk_size=C)
    w = _randn(_gen(102), B, T, dv)
    # window 1's reads depend on window 0's q, v, g only through the fast updates
    gq, gv, gg = torch.autograd.grad((vhat[:, C:] * w[:, C:]).sum(), (q, v, g))
    for gr in (gq, gv, gg):
        assert torch.isfinite(gr).all()
        assert gr[:, :C].abs().sum() > 0
    # gradient through the key update alone (values never written when la >= C)
    vhat, _, _ = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=2, chunk_size=C,
                                            lookahead=C)
    (gq,) = torch.autograd.grad((vhat[:, C:] * w[:, C:]).sum(), q)
    assert gq[:, :C].abs().sum() > 0
    # gradient to the final state too
    _, K2, V2 = ref.fwpkm_memory_reference(q, v, g, keys, values, topk=2, chunk_size=C)
    gq, gv, gg = torch.autograd.grad(K2.sum() + (V2 ** 2).sum(), (q, v, g))
    assert gq.abs().sum() > 0 and gv.abs().sum() > 0 and gg.abs().sum() > 0


def _selection_margin(q, keys, k):
    """Smallest gap between the k-th and (k+1)-th sub-score / candidate (window 0 state)."""
    d = q.shape[-1] // 2
    gaps = []
    with torch.no_grad():
        for m in range(2):
            s = ref.sub_scores_reference(q[..., m * d:(m + 1) * d].reshape(1, -1, *q.shape[2:3], d),
                                         keys[:, m].unsqueeze(0))
            top = torch.sort(s, dim=-1, descending=True).values
            gaps.append((top[..., k - 1] - top[..., k]).min())
            gaps.append((top[..., :-1] - top[..., 1:]).min())
    return min(float(x) for x in gaps)


def test_gradcheck_full_memory():
    B, T, H, dk, n, dv, k, C = 1, 5, 2, 4, 3, 2, 2, 2
    q, v, g, keys, values = _make(111, B, T, H, dk, n, dv)
    assert _selection_margin(q, keys, k) > 1e-3  # away from ties
    q.requires_grad_(True)
    v.requires_grad_(True)
    g.requires_grad_(True)

    def f(q_, v_, g_):
        return ref.fwpkm_memory_reference(q_, v_, g_, keys, values, topk=k, chunk_size=C,
                                          lookahead=1, lr=0.5)

    assert torch.autograd.gradcheck(f, (q, v, g), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradcheck_full_memory_tiny_full_jacobian():
    # full (slow-mode) Jacobian comparison on a tinier case; 2 windows, second reads the
    # updated keys and values
    B, T, H, dk, n, dv, k, C = 1, 4, 1, 2, 3, 2, 2, 2
    q, v, g, keys, values = _make(112, B, T, H, dk, n, dv)
    assert _selection_margin(q, keys, k) > 1e-3
    for x in (q, v, g):
        x.requires_grad_(True)

    def f(q_, v_, g_):
        return ref.fwpkm_memory_reference(q_, v_, g_, keys, values, topk=k, chunk_size=C,
                                          lookahead=1, lr=0.5)

    assert torch.autograd.gradcheck(f, (q, v, g), eps=1e-6, atol=1e-6, rtol=1e-5)
