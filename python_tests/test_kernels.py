"""The native kernels of fwpkm_ext (fwpkm_ext/_native.py, csrc/kernels.h) and the torch.library
ops built on them (fwpkm_ext/ops.py), checked against independent torch computations and the
pure-PyTorch oracle fwpkm_ext/reference.py.  CPU only, tiny shapes, float32 and float64.
"""
import math

import pytest
import torch

import fwpkm_ext
from fwpkm_ext import recurrence, _native, ops
from fwpkm_ext import functional as F
from fwpkm_ext import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
F32 = torch.float32
DTYPES = [F32, F64]
# closeness of floating results (indices are always compared exactly)
TOL = {F32: dict(rtol=2e-5, atol=2e-5), F64: dict(rtol=1e-11, atol=1e-11)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def rand(g, *shape, dtype=F64, lo=0.0, hi=1.0):
    return (torch.rand(*shape, generator=g, dtype=F64) * (hi - lo) + lo).to(dtype)


def randint(g, lo, hi, *shape):
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64)


# ================================================================================ topk_select


def topk_oracle(dots, qn, kn, k, tokens_per_group, kind, eps):
    """Independent torch version of the topk_select contract (csrc/kernels.h)."""
    M, H, _, n = dots.shape
    if kind == "idw":
        grp = torch.arange(M) // tokens_per_group
        dist = (qn.unsqueeze(-1) + kn[grp] - 2 * dots).clamp_min(0)
        s = -torch.log(eps + dist)
    else:
        s = dots.clone()
    # per half: descending score, ties -> smaller sub-key index (stable sort keeps index order)
    hidx = torch.sort(-s, dim=-1, stable=True).indices[..., :k]  # (M,H,2,k)
    hsc = s.gather(-1, hidx)
    cand = (hsc[:, :, 0, :, None] + hsc[:, :, 1, None, :]).reshape(M, H, k * k)
    slot = (hidx[:, :, 0, :, None] * n + hidx[:, :, 1, None, :]).reshape(M, H, k * k)
    p = torch.argsort(slot, dim=-1, stable=True)
    slot, cand = slot.gather(-1, p), cand.gather(-1, p)
    p = torch.sort(-cand, dim=-1, stable=True).indices[..., :k]
    return slot.gather(-1, p), cand.gather(-1, p), hidx, hsc


def run_topk_select(dots, qn, kn, k, tpg, kind, eps=1e-3):
    """The kernel on dots (M, H, 2, n); on CPU also on the same dots in blocks of tokens
    (block = 1, M and tpg where it divides M: (M / block, H, 2, block, n), as search_dots(blocked)
    writes them), which must give the same bits."""
    M, H, _, n = dots.shape
    runs = []
    for block in [0] + (sorted({1, M} | ({tpg} if M % tpg == 0 else set())) if not dots.is_cuda and M else []):
        idx = torch.full((M, H, k), -7, dtype=torch.long)
        score = torch.full((M, H, k), float("nan"), dtype=dots.dtype)
        half_idx = torch.full((M, H, 2, k), -7, dtype=torch.long)
        half_score = torch.full((M, H, 2, k), float("nan"), dtype=dots.dtype)
        d = dots if block == 0 else dots.view(M // block, block, H, 2, n).permute(0, 2, 3, 1, 4).contiguous()
        _native.topk_select(d, qn, kn, k, tpg, kind, eps, idx, score, half_idx, half_score, block=block)
        runs.append((idx, score, half_idx, half_score))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    return runs[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["idw", "dot"])
@pytest.mark.parametrize("M,H,n,k,tpg", [(6, 1, 5, 2, 6), (6, 2, 7, 3, 2), (5, 3, 4, 4, 2),
                                         (4, 1, 6, 1, 4), (7, 2, 9, 9, 3)])
def test_topk_select_raw_vs_oracle(dtype, kind, M, H, n, k, tpg):
    """Raw kernel on arbitrary dots / norms (key groups of tokens_per_group tokens)."""
    g = gen(M * 100 + n * 10 + k)
    G = -(-M // tpg)
    dots = randn(g, M, H, 2, n, dtype=dtype)
    qn = rand(g, M, H, 2, dtype=dtype, lo=1.0, hi=3.0)
    kn = rand(g, G, H, 2, n, dtype=dtype, lo=1.0, hi=3.0)
    if kind == "dot":
        qn = kn = None
    got = run_topk_select(dots, qn, kn, k, tpg, kind, 1e-3)
    want = topk_oracle(dots.double(), None if qn is None else qn.double(),
                       None if kn is None else kn.double(), k, tpg, kind, 1e-3)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1].to(dtype), **TOL[dtype])
    torch.testing.assert_close(got[3], want[3].to(dtype), **TOL[dtype])
    # descending order
    assert (got[1][..., :-1] >= got[1][..., 1:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["idw", "dot"])
@pytest.mark.parametrize("values", ["random", "ties", "nan"])
@pytest.mark.parametrize("n,k", [(16, 1), (40, 2), (128, 8), (200, 3), (512, 8), (512, 32),
                                 (1000, 32), (513, 31)])
def test_topk_select_long_lists_vs_oracle(dtype, kind, values, n, k):
    """Lists of at least 16 k entries take the threshold path (block maxima, then a partial sort
    of the candidates): random values, heavy exact ties (a few distinct values) and NaN entries
    (ranked below every number) all give the oracle's order."""
    M, H, tpg = 5, 2, 3
    g = gen(n * 31 + k * 7 + len(values))
    G = -(-M // tpg)
    if values == "ties":
        dots = randint(g, -2, 3, M, H, 2, n).to(dtype)
    else:
        dots = randn(g, M, H, 2, n, dtype=dtype)
    if values == "nan":
        dots[torch.rand(dots.shape, generator=g) < 0.05] = float("nan")
        dots[0, 0, 0, : n - k + 1] = float("nan")  # one list with only k - 1 numbers
    qn = torch.full((M, H, 2), 8.0, dtype=dtype) if values == "ties" else rand(g, M, H, 2, dtype=dtype, lo=4.0, hi=8.0)
    kn = torch.zeros(G, H, 2, n, dtype=dtype) if values == "ties" else rand(g, G, H, 2, n, dtype=dtype, hi=4.0)
    if kind == "dot":
        qn = kn = None
    got = run_topk_select(dots, qn, kn, k, tpg, kind, 1e-3)
    want = topk_oracle(dots.double(), None if qn is None else qn.double(),
                       None if kn is None else kn.double(), k, tpg, kind, 1e-3)
    assert torch.equal(got[2], want[2]), "per-half indices"
    assert torch.equal(got[0], want[0]), "slots"
    torch.testing.assert_close(got[3], want[3].to(dtype), equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(got[1], want[1].to(dtype), equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("values", ["random", "grid", "huge", "inf", "zeros", "close"])
@pytest.mark.parametrize("n,k", [(64, 8), (256, 16), (300, 24), (512, 32), (640, 40), (1024, 64),
                                 (512, 20)])
def test_topk_select_counting_paths_vs_oracle(values, n, k):
    """The AVX2 float selection ranks block maxima, candidates and the k x k merge's sums by
    counting, and hands ties, NaN, infinities and long candidate lists to the general path. Each
    case here steers into one of those: distinct values (counted), a coarse grid (half lists
    distinct but tied sums, and tied candidates), sums that overflow to inf, infinite entries,
    +0 next to -0 (equal, so a tie), and near-equal values (long candidate lists). The oracle
    runs in the kernel's own dtype, so a dot sum rounds (or overflows) the same way in both."""
    M, H, tpg = 6, 2, 4
    g = gen(n * 13 + k * 3 + len(values))
    G = -(-M // tpg)
    dots = randn(g, M, H, 2, n, dtype=F32)
    if values == "grid":  # distinct per list mostly, but x + y = x' + y' often
        dots = randint(g, -400, 400, M, H, 2, n).to(F32) / 8
    elif values == "huge":
        dots = dots * 2e38
    elif values == "inf":
        dots[torch.rand(dots.shape, generator=g) < 0.02] = float("inf")
        dots[torch.rand(dots.shape, generator=g) < 0.02] = -float("inf")
    elif values == "zeros":
        dots = dots.clamp_max(0.0)  # half of each list zero; the sign of zero varies
        dots[torch.rand(dots.shape, generator=g) < 0.5] *= -1
        dots = dots.clamp_max(0.0)
        dots[dots == 0] = torch.where(torch.rand((int((dots == 0).sum()),), generator=g) < 0.5,
                                      torch.tensor(-0.0), torch.tensor(0.0))
    elif values == "close":
        dots = 1.0 + randn(g, M, H, 2, n, dtype=F32) * 1e-7
    for kind in ("dot", "idw"):
        qn = rand(g, M, H, 2, dtype=F32, lo=4.0, hi=8.0) if kind == "idw" else None
        kn = rand(g, G, H, 2, n, dtype=F32, hi=4.0) if kind == "idw" else None
        got = run_topk_select(dots, qn, kn, k, tpg, kind, 1e-3)
        want = topk_oracle(dots, qn, kn, k, tpg, kind, 1e-3)
        assert torch.equal(got[2], want[2]), f"{kind}: per-half indices"
        assert torch.equal(got[0], want[0]), f"{kind}: slots"
        tol = dict(rtol=0, atol=0) if kind == "dot" else TOL[F32]  # IDW: torch's log vs libm's
        torch.testing.assert_close(got[3], want[3], equal_nan=True, **tol)
        torch.testing.assert_close(got[1], want[1], equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_select_idw_clamps_negative_distance_and_breaks_ties(dtype):
    """qn + kn - 2 dot < 0 (cancellation) is clamped to 0: those sub-keys all score -log(eps),
    an exact tie broken by the smaller index."""
    M, H, n, k = 3, 1, 6, 3
    dots = torch.zeros(M, H, 2, n, dtype=dtype)
    dots[..., [1, 3, 4]] = 10.0  # distance 1 + 1 - 20 < 0 for these
    qn = torch.ones(M, H, 2, dtype=dtype)
    kn = torch.ones(1, H, 2, n, dtype=dtype)
    idx, score, hidx, hsc = run_topk_select(dots, qn, kn, k, M, "idw", 1e-3)
    assert (hidx == torch.tensor([1, 3, 4])).all()
    top = -torch.log(torch.tensor(1e-3, dtype=dtype))
    torch.testing.assert_close(hsc, top.expand_as(hsc), **TOL[dtype])
    assert (idx == torch.tensor([1 * n + 1, 1 * n + 3, 1 * n + 4])).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 5, 13, 31])
def test_topk_select_idw_score_ties_from_unequal_distances(dtype, k):
    """The IDW scan ranks distances and scores only the survivors. Many unequal distances here
    round to one score (distances ~1e3 a few ulps apart, shuffled indices), so the smaller index
    must win those ties: every top-k must be the head of the full ranking (k = n, where every
    candidate is scored), and the k x k merge must agree too."""
    M, H, n = 6, 1, 40
    g = gen(k * 7 + (dtype == torch.float64))
    base = torch.tensor(1000.0, dtype=dtype)
    ulp = torch.nextafter(base, torch.tensor(2000.0, dtype=dtype)) - base
    steps = torch.randint(0, 12, (M, H, 2, n), generator=g).to(dtype)
    if dtype == torch.float64:
        steps = steps * 2 ** 20  # float64 scores only tie for much closer distances
    dist = base + steps * ulp
    qn = torch.zeros(M, H, 2, dtype=dtype)
    kn = torch.zeros(1, H, 2, n, dtype=dtype)
    dots = -dist / 2  # dist = qn + kn - 2 dot
    full = run_topk_select(dots, qn, kn, n, M, "idw")
    part = run_topk_select(dots, qn, kn, k, M, "idw")
    assert torch.equal(part[2], full[2][..., :k])
    assert torch.equal(part[3], full[3][..., :k])
    ties = (full[3][..., 1:] == full[3][..., :-1]).sum()
    assert ties > 0  # the case is the one this test is about
    # within equal scores the indices rise
    same = full[3][..., 1:] == full[3][..., :-1]
    assert (full[2][..., 1:][same] > full[2][..., :-1][same]).all()


def make_q_keys(g, B, T, H, dk, n, per_seq, dtype):
    q = randn(g, B, T, H, dk, dtype=dtype)
    S = B if per_seq else 1
    keys = rand(g, S, H, 2, n, dk // 2, dtype=dtype, lo=-1.0, hi=1.0)
    return q, (keys if per_seq else keys[0])


TOPK_CASES = [
    # B, T, H, dk, n, k, per_seq
    (2, 5, 1, 6, 5, 2, False),
    (1, 4, 1, 4, 4, 1, False),   # k = 1
    (2, 3, 1, 4, 5, 5, False),   # k = n, odd n
    (2, 4, 3, 6, 7, 3, False),   # H > 1, odd n
    (3, 4, 2, 4, 6, 2, True),    # per-sequence keys
    (3, 2, 2, 8, 3, 3, True),    # per-sequence, k = n
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("B,T,H,dk,n,k,per_seq", TOPK_CASES)
def test_product_key_topk_vs_reference(dtype, score, B, T, H, dk, n, k, per_seq):
    g = gen(B * 1000 + T * 100 + n * 10 + k + 7 * per_seq)
    q, keys = make_q_keys(g, B, T, H, dk, n, per_seq, dtype)
    idx, sc, hidx, hsc = fwpkm_ext.product_key_topk(q, keys, k, score=score)
    r_idx, r_sc, r_hidx, r_hsc = ref.product_key_topk_reference(q.double(), keys.double(), k,
                                                                score=score)
    assert idx.shape == (B, T, H, k) and hidx.shape == (B, T, H, 2, k)
    assert idx.dtype == torch.int64 and sc.dtype == dtype
    assert torch.equal(idx, r_idx)
    assert torch.equal(hidx, r_hidx)
    torch.testing.assert_close(sc, r_sc.to(dtype), **TOL[dtype])
    torch.testing.assert_close(hsc, r_hsc.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("score", ["idw", "dot"])
def test_product_key_topk_duplicate_queries(score):
    g = gen(11)
    q, keys = make_q_keys(g, 2, 6, 2, 6, 5, False, F64)
    q[:, 3] = q[:, 0]
    q[1, 5] = q[0, 2]
    out = fwpkm_ext.product_key_topk(q, keys, 3, score=score)
    want = ref.product_key_topk_reference(q, keys, 3, score=score)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    for t in out:
        assert torch.equal(t[:, 3], t[:, 0])
        assert torch.equal(t[1, 5], t[0, 2])


def _assert_ties_broken_by_smaller_index(sc, ix):
    eq = sc[..., :-1] == sc[..., 1:]
    assert eq.any(), "test data should contain exact ties"
    assert (ix[..., :-1][eq] < ix[..., 1:][eq]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("per_seq", [False, True])
def test_product_key_topk_exact_ties(dtype, score, per_seq):
    """Integer-valued data with repeated sub-keys: many exact ties, broken by the smaller index
    (sub-key index per half, slot index for the merge), identical to the reference."""
    g = gen(5 + per_seq)
    B, T, H, dk, n, k = 2, 5, 2, 4, 6, 4
    q = randint(g, -1, 2, B, T, H, dk).to(dtype)
    S = B if per_seq else 1
    base = randint(g, -1, 2, S, H, 2, 3, dk // 2)
    keys = base[:, :, :, randint(g, 0, 3, n)].to(dtype)  # n sub-keys drawn from 3 distinct rows
    keys = keys if per_seq else keys[0]
    idx, sc, hidx, hsc = fwpkm_ext.product_key_topk(q, keys, k, score=score)
    r_idx, r_sc, r_hidx, r_hsc = ref.product_key_topk_reference(q, keys, k, score=score)
    assert torch.equal(hidx, r_hidx)
    assert torch.equal(idx, r_idx)
    torch.testing.assert_close(sc, r_sc, **TOL[dtype])
    torch.testing.assert_close(hsc, r_hsc, **TOL[dtype])
    _assert_ties_broken_by_smaller_index(hsc, hidx)
    _assert_ties_broken_by_smaller_index(sc, idx)


# ================================================================================ gather / scatter


def gather_case(g, R, D, M, L, dtype):
    table = randn(g, R, D, dtype=dtype)
    rows = randint(g, 0, R, M, L)
    rows[0, :] = rows[0, 0]  # duplicate rows inside one token
    rows[-1, 0] = rows[0, 0]
    w = randn(g, M, L, dtype=dtype)
    return table, rows, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,M,L", [(7, 3, 5, 4), (3, 1, 6, 2), (10, 5, 1, 1)])
@pytest.mark.parametrize("keep", [False, True])
def test_gather_rows(dtype, R, D, M, L, keep):
    g = gen(R * 100 + D * 10 + M)
    table, rows, w = gather_case(g, R, D, M, L, dtype)
    out = torch.full((M, D), float("nan"), dtype=dtype)
    saved = torch.full((M, L, D), float("nan"), dtype=dtype) if keep else None
    before = table.clone()
    _native.gather_rows(table, rows, w, out, saved)
    want = torch.einsum("ml,mld->md", w.double(), table.double()[rows])
    torch.testing.assert_close(out, want.to(dtype), **TOL[dtype])
    if keep:
        assert torch.equal(saved, table[rows])
    assert torch.equal(table, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,M,L", [(7, 3, 5, 4), (3, 1, 6, 2), (10, 5, 1, 1)])
def test_gather_dot(dtype, R, D, M, L):
    g = gen(R * 100 + D * 10 + M + 1)
    table, rows, _ = gather_case(g, R, D, M, L, dtype)
    x = randn(g, M, D, dtype=dtype)
    gw = torch.full((M, L), float("nan"), dtype=dtype)
    _native.gather_dot(table, rows, x, gw)
    want = torch.einsum("mld,md->ml", table.double()[rows], x.double())
    torch.testing.assert_close(gw, want.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 5, 16, 37, 256, 300])
def test_four_dots_at_once_are_the_single_dots_bits(dtype, D):
    """A token's pairs go four at a time (dot_lanes_4: four accumulator chains side by side) and
    the rest one by one (dot_lanes); each must be summed exactly as dot_lanes sums it, in every
    instruction-set variant and for every tail length (D mod 16). gather_dot with 4 + 3 pairs per
    token against the same pairs one per token (dot_lanes alone)."""
    g = gen(D * 7 + 1)
    R, M, L = 40, 9, 7
    table = randn(g, R, D, dtype=dtype) * 3
    rows = randint(g, 0, R, M, L)
    x = randn(g, M, D, dtype=dtype)
    first = _native.cpu_isa()
    try:
        for isa in _native.build_info()["cpu_isas"]:
            _native.set_cpu_isa(isa)
            grouped = torch.full((M, L), float("nan"), dtype=dtype)
            _native.gather_dot(table, rows, x, grouped)
            single = torch.full((M * L, 1), float("nan"), dtype=dtype)
            _native.gather_dot(table, rows.reshape(M * L, 1), x.repeat_interleave(L, 0), single)
            assert torch.equal(grouped, single.view(M, L)), isa
            torch.testing.assert_close(grouped, torch.einsum("mld,md->ml", table.double()[rows], x.double()).to(dtype),
                                       **TOL[dtype])
    finally:
        _native.set_cpu_isa(first)


def scatter_expected(table, rows_flat, pairs, coef, x, L):
    """index_add oracle: table[rows[p]] += coef[p] * x[p // L] for the pairs p given."""
    contrib = coef.double()[pairs].unsqueeze(-1) * x.double()[pairs // L]
    return table.double().index_add(0, rows_flat[pairs], contrib)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,M,L", [(9, 3, 6, 4), (4, 2, 8, 3), (30, 1, 5, 2)])
@pytest.mark.parametrize("subset", [False, True])
def test_scatter_rows_vs_index_add(dtype, R, D, M, L, subset):
    g = gen(R * 100 + D * 10 + M + subset)
    rows = randint(g, 0, max(2, R // 2), M, L)  # low rows only: many duplicates, some rows untouched
    rows_flat = rows.reshape(-1)
    pairs = torch.arange(M * L)
    if subset:
        pairs = pairs[rand(g, M * L) < 0.6]
    urows, offsets, order, cnt = recurrence.segments(rows_flat, pairs, counts=True)
    assert (cnt > 1).any()  # some segment holds several pairs of the same row
    table = randn(g, R, D, dtype=dtype)
    coef = randn(g, M * L, dtype=dtype)
    x = randn(g, M, D, dtype=dtype)
    want = scatter_expected(table, rows_flat, pairs, coef, x, L)
    got = table.clone()
    _native.scatter_rows(got, urows, offsets, order, coef, x, L)
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])
    untouched = torch.ones(R, dtype=torch.bool)
    untouched[rows_flat[pairs]] = False
    assert untouched.any()
    assert torch.equal(got[untouched], table[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_handmade_segments(dtype):
    """Contract as documented, with segments built by hand (not via recurrence.segments): rows in
    any order, pair ids in any order within a segment."""
    R, D, L = 8, 2, 2
    table = torch.arange(R * D, dtype=dtype).reshape(R, D)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=dtype)  # M = 3 -> 6 pairs
    coef = torch.tensor([1.0, -2.0, 3.0, 0.25, -1.0, 2.0], dtype=dtype)
    urows = torch.tensor([6, 1, 3])
    offsets = torch.tensor([0, 3, 4, 6])
    order = torch.tensor([5, 0, 3, 2, 4, 1])
    want = table.clone()
    for u, r in enumerate(urows.tolist()):
        for p in order[offsets[u]:offsets[u + 1]].tolist():
            want[r] += coef[p] * x[p // L]
    got = table.clone()
    _native.scatter_rows(got, urows, offsets, order, coef, x, L)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert not torch.equal(got, table)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_empty_segments(dtype):
    g = gen(3)
    table = randn(g, 5, 3, dtype=dtype)
    got = table.clone()
    e = torch.empty(0, dtype=torch.long)
    _native.scatter_rows(got, e, torch.zeros(1, dtype=torch.long), e,
                         randn(g, 4, dtype=dtype), randn(g, 2, 3, dtype=dtype), 2)
    assert torch.equal(got, table)
    # segments of an empty pair list, through the same helper the ops use
    urows, offsets, order, _ = recurrence.segments(randint(g, 0, 5, 8), torch.empty(0, dtype=torch.long))
    assert urows.numel() == 0 and offsets.tolist() == [0]
    _native.scatter_rows(got, urows, offsets, order, randn(g, 8, dtype=dtype),
                         randn(g, 4, 3, dtype=dtype), 2)
    assert torch.equal(got, table)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_and_gather_deterministic(dtype):
    """Two runs bit-identical, also with another thread count; enough rows and pairs that
    several threads share the work and rows get many contributions."""
    g = gen(17)
    R, D, M, L = 64, 33, 400, 8
    rows = randint(g, 0, R, M, L)
    urows, offsets, order, _ = recurrence.segments(rows.reshape(-1))
    table = randn(g, R, D, dtype=dtype)
    coef = randn(g, M * L, dtype=dtype)
    x = randn(g, M, D, dtype=dtype)
    w = randn(g, M, L, dtype=dtype)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 1, 2, 2):
            torch.set_num_threads(threads)
            t = table.clone()
            _native.scatter_rows(t, urows, offsets, order, coef, x, L)
            out = torch.empty(M, D, dtype=dtype)
            _native.gather_rows(t, rows, w, out)
            gw = torch.empty(M, L, dtype=dtype)
            _native.gather_dot(t, rows, x, gw)
            results.append((t, out, gw))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    want = scatter_expected(table, rows.reshape(-1), torch.arange(M * L), coef, x, L)
    torch.testing.assert_close(results[0][0], want.to(dtype), **TOL[dtype])


# ================================================================================ value write-back


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,k,n,dv,per_seq", [(2, 5, 1, 3, 3, 4, False),
                                                  (3, 4, 2, 2, 4, 3, True),
                                                  (1, 6, 2, 3, 2, 5, False)])
def test_value_write_back_vs_reference(dtype, B, L, H, k, n, dv, per_seq):
    """The write-back exactly as recurrence.forward does it (value_pairs + scatter_rows) against
    reference.value_update_reference; slots drawn from a small range so they repeat."""
    g = gen(B * 100 + L * 10 + H + per_seq)
    N, HK, lr = n * n, H * k, 0.7
    S = B if per_seq else 1
    values = randn(g, S, N, dv, dtype=dtype)
    idx = randint(g, 0, min(N, 5), B, L, HK)
    w = torch.softmax(randn(g, B, L, HK), -1).to(dtype)
    r = randn(g, B, L, dv, dtype=dtype)
    contrib = rand(g, B, L) < 0.7
    contrib[0, 0] = True
    contrib[-1, -1] = False
    grp = torch.arange(B) if per_seq else torch.zeros(B, dtype=torch.long)
    rows = (idx + (grp * N).view(B, 1, 1)).reshape(B * L, HK)
    urows, offsets, order, inv_count = recurrence.value_pairs(rows, contrib, HK)
    coef = (-lr * HK) * w.reshape(-1) * inv_count.to(dtype)
    V = values.reshape(S * N, dv).clone()
    _native.scatter_rows(V, urows, offsets, order, coef, r.reshape(B * L, dv).contiguous(), HK)
    want = ref.value_update_reference(values.double() if per_seq else values[0].double(), idx,
                                      w.double(), r.double(), contrib, lr, k, H)
    torch.testing.assert_close(V.view(S, N, dv), want.reshape(S, N, dv).to(dtype), **TOL[dtype])
    assert not torch.equal(V.view(S, N, dv), values)


# ================================================================================ ops.gather


@pytest.mark.parametrize("need_table", [True, False])
def test_ops_gather_forward_backward_vs_reference(need_table):
    g = gen(23)
    R, D, M, L = 6, 3, 7, 4
    table, rows, w = gather_case(g, R, D, M, L, F64)
    table.requires_grad_(need_table)
    w.requires_grad_(True)
    out = ops.gather(table, rows, w)
    table_r = table.detach().clone().requires_grad_(need_table)
    w_r = w.detach().clone().requires_grad_(True)
    want = ref.gather_reference(table_r, rows.unsqueeze(0), w_r.unsqueeze(0))[0]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    gout = randn(g, M, D)
    inputs = (table, w) if need_table else (w,)
    got_g = torch.autograd.grad(out, inputs, gout)
    want_g = torch.autograd.grad(want, (table_r, w_r) if need_table else (w_r,), gout)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # public wrapper: same thing
    torch.testing.assert_close(fwpkm_ext.gather(table, rows, w), want, rtol=1e-12, atol=1e-12)


def test_ops_gather_gradcheck():
    g = gen(29)
    table, rows, w = gather_case(g, 5, 3, 4, 3, F64)
    table.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, ww: ops.gather(t, rows, ww), (table, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_gather_backward_op(dtype):
    """fwpkm_ext::gather_backward against plain torch (gw = rows . gout, gtable = index_add)."""
    g = gen(31)
    R, D, M, L = 6, 4, 5, 3
    table, rows, w = gather_case(g, R, D, M, L, dtype)
    gout = randn(g, M, D, dtype=dtype)
    gw, gt = ops.gather_backward(gout, table, rows, w, True)
    want_gw = torch.einsum("mld,md->ml", table.double()[rows], gout.double())
    want_gt = torch.zeros(R, D, dtype=F64).index_add(
        0, rows.reshape(-1), (w.double().unsqueeze(-1) * gout.double().unsqueeze(1)).reshape(-1, D))
    torch.testing.assert_close(gw, want_gw.to(dtype), **TOL[dtype])
    torch.testing.assert_close(gt, want_gt.to(dtype), **TOL[dtype])
    gw2, gt2 = ops.gather_backward(gout, table, rows, w, False)
    assert torch.equal(gw2, gw) and gt2.numel() == 0


# ================================================================================ opcheck

# All four default opcheck sub-tests are run (test_schema, test_autograd_registration,
# test_faketensor, test_aot_dispatch_dynamic): none is restricted.


@pytest.mark.parametrize("score", ["idw", "dot"])
def test_opcheck_topk(score):
    g = gen(37)
    q, keys = make_q_keys(g, 2, 3, 2, 4, 5, True, F64)
    torch.library.opcheck(torch.ops.fwpkm_ext.topk.default, (q, keys, 3, score, 1e-3))
    q1, k1 = make_q_keys(g, 2, 3, 1, 6, 4, False, F32)
    torch.library.opcheck(torch.ops.fwpkm_ext.topk.default, (q1, k1.unsqueeze(0), 2, score, 1e-3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,dk,n,k,per_seq", [(2, 5, 3, 8, 5, 4, False), (3, 4, 2, 6, 7, 9, True),
                                                  (1, 6, 1, 4, 9, 70, False), (2, 3, 2, 10, 3, 1, True)])
def test_slot_scores_vs_pair_scores_and_float64(dtype, B, T, H, dk, n, k, per_seq):
    """The static PKM's graph-free read scores: pair_scores over read_kid's rows bit for bit
    (repeated half rows included, and k beyond the 64 rows the kernel remembers), and the
    float64 dot of each half with its sub-key row."""
    g = gen(B * 100 + k)
    q, keys = make_q_keys(g, B, T, H, dk, n, per_seq, dtype)
    keys5 = keys if per_seq else keys.unsqueeze(0)
    idx = randint(g, 0, n * n, B, T, H, k)
    idx[..., 1::2] = idx[..., :1]  # slots sharing both half rows
    grp = recurrence._group_of_batch(B, keys5.shape[0], "cpu")
    kid = recurrence.read_kid(idx, grp, H, n)
    want = ops.pair_scores(q.reshape(-1, dk // 2), keys5.reshape(-1, dk // 2), kid.reshape(-1, k), "dot",
                           1e-3).view(B, T, H, 2, k)
    got = ops.slot_scores(q, keys5, idx)
    assert torch.equal(got, want)
    assert torch.equal(ops._slot_scores_torch(q, keys5, idx), want)  # the path off the CPU
    qh = q.double().reshape(B, T, H, 2, 1, dk // 2)
    rows = keys5.double().reshape(-1, dk // 2)[kid]  # (B, T, H, 2, k, d2)
    torch.testing.assert_close(got, (qh * rows).sum(-1).to(dtype), **TOL[dtype])
    torch.library.opcheck(torch.ops.fwpkm_ext.slot_scores.default, (q, keys5, idx))
    bad = idx.clone()
    bad[-1, -1, -1, -1] = n * n
    with pytest.raises(ValueError, match=f"slot_scores: idx holds {n * n}, outside"):
        ops.slot_scores(q, keys5, bad)
    with pytest.raises(ValueError, match="^idx"):
        _native.slot_scores(q.reshape(B * T, H, 2, dk // 2), keys5, idx[..., 0], T)
    with pytest.raises(ValueError, match="^tokens_per_group"):
        _native.slot_scores(q.reshape(B * T, H, 2, dk // 2), keys5[:1], idx.reshape(B * T, H, k), 1)
    empty = ops.slot_scores(q[:, :0].contiguous(), keys5, idx[:, :0].contiguous())  # no tokens
    assert empty.shape == (B, 0, H, 2, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [0, 1, 37, 300_001])
def test_all_within_vs_torch(dtype, numel):
    """The finite-and-bounded check of the inputs and tables: every kind of bad element, at the
    first, a middle and the last place (the threaded size too), and limits between floats."""
    g = gen(numel + (dtype == F64))
    x = randn(g, numel, dtype=dtype) * 3

    def want(t, lim):
        ok = torch.isfinite(t).all()
        return bool(ok & (t.abs() <= lim).all()) if lim is not None else bool(ok)

    for lim in (None, 1e15, 2.5, 0.0, 1.0 + 1e-12, float("inf")):
        assert _native.all_within(x, lim) == want(x, lim), lim
    for at in sorted({0, numel // 2, numel - 1}) if numel else []:
        for bad in (float("nan"), float("inf"), -float("inf"), -2e15, 0.0):
            y = x.clone()
            y[at] = bad
            for lim in (None, 1e15):
                assert _native.all_within(y, lim) == want(y, lim), (at, bad, lim)
                assert recurrence.finite_within(y, lim) == want(y, lim)
    assert _native.all_within(x, 2 ** 60 + 1)  # an int a double cannot hold exactly
    one = torch.ones(3, dtype=dtype)  # a limit just below a float (float32 rounds it up to 1.0)
    assert not _native.all_within(one, 1.0 - 1e-12) and _native.all_within(one, 1.0)
    with pytest.raises(ValueError, match="^lim"):
        _native.all_within(x, float("nan"))
    with pytest.raises(ValueError, match="^lim"):
        _native.all_within(x, -1.0)
    with pytest.raises(TypeError, match="^x"):
        _native.all_within(x.to(torch.int32))


def test_opcheck_gather():
    g = gen(41)
    table, rows, w = gather_case(g, 6, 3, 5, 3, F64)
    torch.library.opcheck(torch.ops.fwpkm_ext.gather.default,
                          (table.requires_grad_(), rows, w.requires_grad_()))
    t2, r2, w2 = gather_case(g, 4, 2, 3, 2, F32)
    torch.library.opcheck(torch.ops.fwpkm_ext.gather.default, (t2, r2, w2.requires_grad_()))


def memory_args(seed, B, T, H, dk, n, dv, k, C, per_seq, la=1, mask_zeros=False, keep=True,
                score="idw"):
    g = gen(seed)
    S = B if per_seq else 1
    q = randn(g, B, T, H, dk).requires_grad_()
    v = randn(g, B, T, dv).requires_grad_()
    gt = rand(g, B, T, lo=0.1, hi=0.9).requires_grad_()
    mask = torch.ones(B, T, dtype=F64)
    if mask_zeros:
        mask[0, 1] = 0.0
        mask[-1, -2] = 0.0
    keys = rand(g, S, H, 2, n, dk // 2, lo=-1.0, hi=1.0).requires_grad_()
    values = randn(g, S, n * n, dv).requires_grad_()
    pend_idx = torch.empty(B, 0, H, k, dtype=torch.int64)
    pend_half = torch.empty(B, 0, H, 2, k, dtype=torch.int64)
    return (q, v, gt, mask, keys, values, pend_idx, pend_half, k, C, la, 0.5, 1.0, score, 1e-3,
            True, keep)


@pytest.mark.parametrize("case", [
    dict(seed=43, B=2, T=7, H=2, dk=4, n=4, dv=3, k=2, C=3, per_seq=False),
    dict(seed=47, B=2, T=6, H=1, dk=6, n=3, dv=2, k=2, C=4, per_seq=True, la=2, mask_zeros=True,
         score="dot"),
])
def test_opcheck_memory(case):
    args = memory_args(**case)
    torch.library.opcheck(torch.ops.fwpkm_ext.memory.default, args)


@pytest.mark.parametrize("case", [
    dict(seed=53, B=2, T=7, H=2, dk=4, n=4, dv=3, k=2, C=3, per_seq=False),
    dict(seed=59, B=2, T=6, H=1, dk=6, n=3, dv=2, k=2, C=4, per_seq=True, la=2, mask_zeros=True,
         score="dot"),
])
def test_opcheck_memory_inplace(case):
    """The in-place streaming op: declared mutation of keys and values (opcheck's schema test
    fails an op that writes what it does not declare), and it writes exactly what the
    functional op returns."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in memory_args(**case)][:-1]
    torch.library.opcheck(torch.ops.fwpkm_ext.memory_inplace.default, args)
    keys, values = args[4].clone(), args[5].clone()
    want = torch.ops.fwpkm_ext.memory(*args[:4], keys, values, *args[6:], False)
    got = torch.ops.fwpkm_ext.memory_inplace(*args[:4], keys, values, *args[6:])
    assert torch.equal(got[0], want[0]) and torch.equal(keys, want[1]) and torch.equal(values, want[2])


# ================================================================================ bad inputs


def _raises(exc, name):
    return pytest.raises(exc, match=rf"^{name}\b")


def _topk_buffers(M, H, n, k, dtype=F64):
    return dict(dots=torch.zeros(M, H, 2, n, dtype=dtype), qn=torch.zeros(M, H, 2, dtype=dtype),
                kn=torch.zeros(1, H, 2, n, dtype=dtype), idx=torch.empty(M, H, k, dtype=torch.long),
                score=torch.empty(M, H, k, dtype=dtype),
                half_idx=torch.empty(M, H, 2, k, dtype=torch.long),
                half_score=torch.empty(M, H, 2, k, dtype=dtype))


def _call_topk(b, k=2, tpg=3, kind="idw"):
    _native.topk_select(b["dots"], b["qn"], b["kn"], k, tpg, kind, 1e-3, b["idx"], b["score"],
                        b["half_idx"], b["half_score"])


def test_topk_select_bad_inputs():
    M, H, n, k = 3, 1, 4, 2
    _call_topk(_topk_buffers(M, H, n, k))  # the good call works
    for name, bad, exc in [
        ("dots", torch.zeros(M, H, 2, n, dtype=torch.float16), TypeError),
        ("dots", torch.zeros(M, H, 3, n, dtype=F64), ValueError),
        ("dots", torch.zeros(M, H, n, 2, dtype=F64).transpose(2, 3), ValueError),
        ("qn", None, TypeError),
        ("qn", torch.zeros(M, H, 2, dtype=F32), TypeError),
        ("qn", torch.zeros(M, H, 3, dtype=F64), ValueError),
        ("kn", torch.zeros(2, H, 2, n, dtype=F64), ValueError),
        ("idx", torch.empty(M, H, k, dtype=torch.int32), TypeError),
        ("idx", torch.empty(M, H, k + 1, dtype=torch.long), ValueError),
        ("score", torch.empty(M, H, k, dtype=F32), TypeError),
        ("half_idx", torch.empty(M, H, k, 2, dtype=torch.long).transpose(2, 3), ValueError),
        ("half_score", torch.empty(M, H, 2, k + 1, dtype=F64), ValueError),
    ]:
        b = _topk_buffers(M, H, n, k)
        b[name] = bad
        with _raises(exc, name):
            _call_topk(b)
    with _raises(ValueError, "topk"):
        _call_topk(_topk_buffers(M, H, n, n + 1), k=n + 1)
    with _raises(ValueError, "topk"):
        _call_topk(_topk_buffers(M, H, n, 0), k=0)
    with _raises(ValueError, "score"):
        _call_topk(_topk_buffers(M, H, n, k), kind="cosine")
    # blocks of tokens (CPU): the block must match dots' blocks and divide M
    b = _topk_buffers(M, H, n, k)
    blocked = b["dots"].view(1, M, H, 2, n).permute(0, 2, 3, 1, 4).contiguous()
    args = (b["qn"], b["kn"], k, M, "idw", 1e-3, b["idx"], b["score"], b["half_idx"], b["half_score"])
    _native.topk_select(blocked, *args, block=M)  # the good call works
    for dots, block in ((blocked, 2), (b["dots"], M), (blocked, -1), (blocked, True)):
        with _raises(ValueError, "dots" if isinstance(block, int) and not isinstance(block, bool)
                     and block > 0 else "block"):
            _native.topk_select(dots, *args, block=block)


def test_gather_scatter_bad_inputs():
    R, D, M, L = 5, 3, 4, 2
    table = torch.zeros(R, D, dtype=F64)
    rows = torch.zeros(M, L, dtype=torch.long)
    w = torch.zeros(M, L, dtype=F64)
    out = torch.zeros(M, D, dtype=F64)
    with _raises(TypeError, "table"):
        _native.gather_rows(table.to(torch.float16), rows, w.half(), out.half())
    with _raises(TypeError, "table"):
        _native.gather_rows(table.long(), rows, w, out)
    with _raises(ValueError, "table"):
        _native.gather_rows(torch.zeros(D, R, dtype=F64).t(), rows, w, out)
    with _raises(TypeError, "rows"):
        _native.gather_rows(table, rows.int(), w, out)
    with _raises(ValueError, "rows"):
        _native.gather_rows(table, torch.zeros(L, M, dtype=torch.long).t(), w, out)
    with _raises(TypeError, "w"):
        _native.gather_rows(table, rows, w.float(), out)
    with _raises(ValueError, "w"):
        _native.gather_rows(table, rows, torch.zeros(M, L + 1, dtype=F64), out)
    with _raises(ValueError, "out"):
        _native.gather_rows(table, rows, w, torch.zeros(M, D + 1, dtype=F64))
    with _raises(TypeError, "out"):
        _native.gather_rows(table, rows, w, out.float())
    with _raises(ValueError, "saved"):
        _native.gather_rows(table, rows, w, out, torch.zeros(M, L, D + 1, dtype=F64))
    with _raises(TypeError, "x"):
        _native.gather_dot(table, rows, out.float(), w.clone())
    with _raises(ValueError, "gw"):
        _native.gather_dot(table, rows, out, torch.zeros(M, L + 1, dtype=F64))
    urows = torch.tensor([1, 3])
    offsets = torch.tensor([0, 1, 2])
    order = torch.tensor([0, 5])
    coef = torch.zeros(M * L, dtype=F64)
    x = torch.zeros(M, D, dtype=F64)
    _native.scatter_rows(table, urows, offsets, order, coef, x, L)  # the good call works
    with _raises(TypeError, "urows"):
        _native.scatter_rows(table, urows.int(), offsets, order, coef, x, L)
    with _raises(ValueError, "offsets"):
        _native.scatter_rows(table, urows, offsets[:2], order, coef, x, L)
    with _raises(TypeError, "order"):
        _native.scatter_rows(table, urows, offsets, order.float(), coef, x, L)
    with _raises(TypeError, "coef"):
        _native.scatter_rows(table, urows, offsets, order, coef.float(), x, L)
    with _raises(ValueError, "coef"):
        _native.scatter_rows(table, urows, offsets, order, coef[:-1], x, L)
    with _raises(ValueError, "x"):
        _native.scatter_rows(table, urows, offsets, order, coef, torch.zeros(M, D + 1, dtype=F64), L)
    with _raises(ValueError, "x"):
        _native.scatter_rows(table, urows, offsets, order, coef, torch.zeros(D, M, dtype=F64).t(), L)
    with _raises(TypeError, "table"):
        _native.scatter_rows(table.half(), urows, offsets, order, coef.half(), x.half(), L)
    with _raises(TypeError, "coef"):  # the table's dtype rules: a float32 table with float64 data
        _native.scatter_rows(table.float(), urows, offsets, order, coef, x, L)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    table = torch.zeros(5, 3, dtype=F64)
    rows = torch.zeros(4, 2, dtype=torch.long)
    w = torch.zeros(4, 2, dtype=F64)
    with _raises(ValueError, "rows"):
        _native.gather_rows(table, rows.cuda(), w, torch.zeros(4, 3, dtype=F64))
    with _raises(ValueError, "out"):
        _native.gather_rows(table, rows, w, torch.zeros(4, 3, dtype=F64, device="cuda"))


@pytest.mark.parametrize("score", ["idw", "dot"])
def test_pair_scores_op_matches_direct_scores_and_gradchecks(score):
    """fwpkm_ext::pair_scores (used by the PKM layer): values against the direct difference form,
    gradients by gradcheck, registration by opcheck."""
    from fwpkm_ext import ops

    torch.manual_seed(11)
    M2, J, R, d2 = 7, 3, 5, 4
    x = torch.randn(M2, d2, dtype=torch.float64, requires_grad=True)
    kflat = torch.randn(R, d2, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, R, (M2, J))
    rows[0] = rows[1]  # repeated rows across query halves
    s = ops.pair_scores(x, kflat, rows, score, 1e-3)
    kg = kflat[rows]
    if score == "idw":
        want = -torch.log(1e-3 + ((x.unsqueeze(1) - kg) ** 2).sum(-1))
    else:
        want = (x.unsqueeze(1) * kg).sum(-1)
    torch.testing.assert_close(s, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b: ops.pair_scores(a, b, rows, score, 1e-3), (x, kflat))
    torch.library.opcheck(ops.pair_scores, (x, kflat, rows, score, 1e-3))


# ------------------------------------------------------------------------------------------------
# segment_rows: the native bucketing behind recurrence.segments on CPU


def _segments_by_torch_sort(rows, pairs=None):
    if pairs is None:
        pairs = torch.arange(rows.numel())
    srt, perm = torch.sort(rows[pairs], stable=True)
    urows, cnt = torch.unique_consecutive(srt, return_counts=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cnt.cumsum(0)])
    return urows, offsets, pairs[perm]


@pytest.mark.parametrize("Q,R", [(0, 7), (1, 1), (5, 3), (37, 2), (4096, 262144), (8192, 1024),
                                 (3000, 3000), (20011, 2 ** 22 + 3), (100, 2 ** 40), (9, 2 ** 62)])
@pytest.mark.parametrize("subset", [False, True])
def test_segment_rows_equals_stable_sort(Q, R, subset):
    # both paths (counting sort when R is small against Q, radix otherwise), heavy duplicates
    # (R < Q) and huge ranges, all pairs or a subset in increasing pair order
    g = torch.Generator().manual_seed(Q + R % 1000)
    rows = (torch.rand(Q, generator=g, dtype=torch.float64) * R).long().clamp_max(R - 1)
    if Q > 2:  # the extreme ids too
        rows[0], rows[-1] = 0, R - 1
    pairs = torch.nonzero(torch.rand(Q, generator=g) < 0.6).squeeze(1) if subset else None
    got = _native.segment_rows(rows, R, pairs)
    want = _segments_by_torch_sort(rows, pairs)
    for name, a, b in zip(("urows", "offsets", "order"), got, want):
        assert torch.equal(a, b), name
    # and through recurrence.segments with the row counts
    u, off, order, cnt = recurrence.segments(rows, pairs, counts=True, R=R)
    assert torch.equal(order, want[2]) and torch.equal(cnt, (off[1:] - off[:-1]).repeat_interleave(off[1:] - off[:-1]))
    if Q:  # R inferred from the rows
        assert torch.equal(recurrence.segments(rows, pairs)[2], want[2])
    # unique_rows == torch.unique (sorted, with the inverse)
    u, inv = recurrence.unique_rows(rows.view(1, -1), R, inverse=True)
    u2, inv2 = torch.unique(rows.view(1, -1), return_inverse=True)
    assert torch.equal(u, u2) and torch.equal(inv, inv2)


def test_segment_rows_refuses_bad_rows_naming_them():
    with pytest.raises(ValueError, match=r"row id 5 of pair 1 is outside \[0, 5\)"):
        _native.segment_rows(torch.tensor([0, 5, 1]), 5)
    with pytest.raises(ValueError, match=r"row id -1 of pair 0"):
        _native.segment_rows(torch.tensor([-1, 2]), 10 ** 6)  # the radix path checks too
    with pytest.raises(TypeError, match=r"^rows"):
        _native.segment_rows(torch.tensor([0.0]), 2)
    with pytest.raises(ValueError, match=r"^R"):
        _native.segment_rows(torch.tensor([0]), -1)



def _read_positions_by_torch(idx, half, n):
    k = idx.shape[-1]
    sub = torch.stack((idx // n, idx % n), dim=-2).reshape(-1, k)
    hv = half.reshape(-1, k)
    return ((hv.unsqueeze(2) == sub.unsqueeze(1)) * torch.arange(k).view(1, k, 1)).sum(1)


@pytest.mark.parametrize("lead,n,k", [((1,), 3, 1), ((2, 3), 50, 7), ((1, 37, 4), 512, 32),
                                      ((300,), 1000, 8)])
def test_read_positions_native_equals_torch(lead, n, k):
    """The native positions of the selected slots' sub-keys in the half lists: the torch
    comparison's result, and each position points at its sub-key; a slot the list lacks gets 0
    on both paths (what the torch path gives)."""
    g = gen(n + k)
    G = math.prod(lead)
    half = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(2 * G)]).view(*lead, 2, k)
    hv = half.view(G, 2, k)
    a, b = randint(g, 0, k, G, k), randint(g, 0, k, G, k)
    idx = (torch.gather(hv[:, 0], 1, a) * n + torch.gather(hv[:, 1], 1, b)).view(*lead, k)
    pos = _native.read_positions(idx, half, n)
    assert torch.equal(pos, _read_positions_by_torch(idx, half, n))
    assert torch.equal(pos.view(G, 2, k)[:, 0], a) and torch.equal(pos.view(G, 2, k)[:, 1], b)
    assert torch.equal(recurrence.read_positions(idx, half, n), pos)
    if n > k:  # a sub-key outside the first half's list: 0 on both paths
        missing = next(i for i in range(n) if i not in hv[0, 0].tolist())
        idx.view(G, k)[0, 0] = missing * n + hv[0, 1, 0]
        pos = _native.read_positions(idx, half, n)
        assert int(pos[0, 0]) == 0 and torch.equal(pos, _read_positions_by_torch(idx, half, n))



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,Q", [(1, 1, 1), (7, 3, 40), (1000, 37, 257), (5000, 512, 3000)])
def test_map_rows_adds_new_rows_in_first_occurrence_order(dtype, R, D, Q):
    """Compact ids: each row keeps the id it got first, new rows get U, U + 1, ... in the order
    they first occur, their values are copied in, rows already mapped are neither renumbered
    nor copied again."""
    g = gen(R + Q)
    table = randn(g, R, D, dtype=dtype)
    cap = min(R, 2 * Q)
    slot = torch.full((R,), -1, dtype=torch.long)
    touched = torch.full((cap,), -7, dtype=torch.long)
    compact = torch.full((cap, D), float("nan"), dtype=dtype)
    U = 0
    seen = {}
    for call in range(2):
        rows = randint(g, 0, R, Q // 2 + 1, 2)
        cid = torch.empty_like(rows)
        before = compact[:U].clone()
        U = _native.map_rows(slot, rows, cid, touched, U, table, compact)
        for r in rows.reshape(-1).tolist():
            seen.setdefault(r, len(seen))
        want = torch.tensor([seen[r] for r in rows.reshape(-1).tolist()]).view_as(rows)
        assert torch.equal(cid, want) and U == len(seen)
        assert torch.equal(touched[:U], torch.tensor(sorted(seen, key=seen.get)))
        assert torch.equal(compact[:U], table[touched[:U]])
        assert torch.equal(compact[:before.shape[0]], before)
        on = slot >= 0
        assert int(on.sum()) == U and torch.equal(slot[touched[:U]], torch.arange(U))


def test_map_rows_refusals_leave_the_map_as_it_was():
    table = torch.randn(10, 4)
    slot = torch.full((10,), -1, dtype=torch.long)
    touched = torch.empty(3, dtype=torch.long)
    compact = torch.empty(3, 4)
    U = _native.map_rows(slot, torch.tensor([4]), torch.empty(1, dtype=torch.long), touched, 0, table, compact)
    assert U == 1
    kept = slot.clone()
    with pytest.raises(ValueError, match=r"row id 10 at 2 is outside \[0, 10\)"):
        _native.map_rows(slot, torch.tensor([5, 4, 10]), torch.empty(3, dtype=torch.long), touched, U, table, compact)
    assert torch.equal(slot, kept)
    with pytest.raises(ValueError, match=r"more than 3 distinct rows"):
        _native.map_rows(slot, torch.tensor([1, 2, 3, 4]), torch.empty(4, dtype=torch.long), touched, U, table, compact)
    assert torch.equal(slot, kept)
    with pytest.raises(ValueError, match=r"^U"):
        _native.map_rows(slot, torch.tensor([1]), torch.empty(1, dtype=torch.long), touched, 4, table, compact)
    with pytest.raises(ValueError, match=r"^compact"):
        _native.map_rows(slot, torch.tensor([1]), torch.empty(1, dtype=torch.long), touched, 0, table, compact[:2])
    with pytest.raises(TypeError, match=r"^rows"):
        _native.map_rows(slot, torch.tensor([1.0]), torch.empty(1, dtype=torch.long), touched, 0, table, compact)

def test_read_positions_refuses_bad_arguments():
    idx, half = torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"^idx"):
        _native.read_positions(idx.float(), half, 5)
    with pytest.raises(ValueError, match=r"^half"):
        _native.read_positions(idx, half[:, :1], 5)
    with pytest.raises(ValueError, match=r"^n"):
        _native.read_positions(idx, half, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,M,L", [(1, 1, 1, 1), (5, 3, 0, 2), (300, 7, 40, 3), (257, 64, 500, 8),
                                     (2000, 33, 64, 5)])
def test_scatter_rows_dense_equals_zeros_then_scatter(dtype, R, D, M, L):
    """The dense variant writes every row once: the segment sums where pairs land, zeros
    elsewhere, whatever the buffer held (NaN here), bit-identical to zeroing then scattering;
    chunk edges (256 rows) and rows without pairs included."""
    g = gen(R * 7 + M)
    rows = randint(g, 0, R, M, L)
    if M:
        rows[0, 0] = R - 1
    x = randn(g, M, D, dtype=dtype)
    coef = randn(g, M * L, dtype=dtype)
    urows, offsets, order, _ = recurrence.segments(rows.reshape(-1), R=R)
    want = torch.zeros(R, D, dtype=dtype)
    _native.scatter_rows(want, urows, offsets, order, coef, x, L)
    got = torch.full((R, D), float("nan"), dtype=dtype)
    _native.scatter_rows_dense(got, urows, offsets, order, coef, x, L)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"^x"):
        _native.scatter_rows_dense(got, urows, offsets, order, coef, x[:, :D - 1] if D > 1 else x.new_empty(M, 2), L)
    # with src: the pairs' dots with src's rows too, bit-identical to gather_dot's
    src = randn(g, R, D, dtype=dtype)
    gw_want = torch.empty(M, L, dtype=dtype)
    _native.gather_dot(src, rows, x, gw_want)
    got2 = torch.full((R, D), float("nan"), dtype=dtype)
    gw = torch.full((M, L), float("nan"), dtype=dtype)
    _native.scatter_rows_dense(got2, urows, offsets, order, coef, x, L, src=src, gw=gw)
    assert torch.equal(got2, want)
    assert torch.equal(gw, gw_want)
    if M:
        torch.testing.assert_close(gw, (src.double()[rows] * x.double()[:, None]).sum(-1).to(dtype), **TOL[dtype])
    with pytest.raises(ValueError, match=r"^gw: give src"):
        _native.scatter_rows_dense(got2, urows, offsets, order, coef, x, L, src=src)
    with pytest.raises(ValueError, match=r"^src"):
        _native.scatter_rows_dense(got2, urows, offsets, order, coef, x, L, src=src[:, :0], gw=gw)
    with pytest.raises(ValueError, match=r"^gw: expected"):
        _native.scatter_rows_dense(got2, urows, offsets, order, coef, x, L, src=src, gw=gw.new_empty(M * L + 1))
    if M:
        with pytest.raises(ValueError, match=r"^gw: must not share memory with table"):
            _native.scatter_rows_dense(got2, urows, offsets, order, coef, x, L, src=src,
                                       gw=got2.view(-1)[: M * L])
        with pytest.raises(ValueError, match=r"^gw: must not share memory with coef"):
            _native.scatter_rows_dense(got2, urows, offsets, order, coef, x, L, src=src, gw=coef)
        part = recurrence.segments(rows.reshape(-1), torch.arange(M * L - 1), R=R)
        with pytest.raises(ValueError, match=r"^gw: expected .* in segments"):  # a pair in no segment
            _native.scatter_rows_dense(got2, part[0], part[1], torch.cat([part[2], part[2][:1]]), coef,
                                       x, L, src=src, gw=gw)
    # rows of width 0: every dot is 0 (the kernel does not run)
    gw0 = torch.full((M, L), float("nan"), dtype=dtype)
    _native.scatter_rows_dense(torch.empty(R, 0, dtype=dtype), urows, offsets, order, coef,
                               x[:, :0].contiguous(), L, src=torch.empty(R, 0, dtype=dtype), gw=gw0)
    assert (gw0 == 0).all()

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 5, 37, 512])
def test_scatter_rows_counts_nonfinite_rows(dtype, D):
    """The value write counts the updated rows that end up holding a NaN or an infinity (the
    all-or-nothing commit's overflow check); rows it does not write are not looked at."""
    g = gen(D)
    R, M, L = 40, 12, 3
    table = randn(g, R, D, dtype=dtype)
    table[0, D // 2] = float("nan")  # never written: not counted
    rows = randint(g, 1, R, M, L)
    urows, offsets, order, _ = recurrence.segments(rows.reshape(-1), R=R)
    coef = randn(g, M * L, dtype=dtype)
    x = randn(g, M, D, dtype=dtype)
    big = torch.finfo(dtype).max
    x[2, D - 1] = big  # overflows the rows that token 2's pairs write (|coef| * max > max)
    coef[2 * L: 3 * L] = 4.0
    x[5, 0] = float("inf")
    want_rows = set(rows[2].tolist()) | set(rows[5].tolist())
    ref = table.clone()
    _native.scatter_rows(ref, urows, offsets, order, coef, x, L)
    count = torch.tensor([3], dtype=torch.long)  # added to
    _native.scatter_rows(table, urows, offsets, order, coef, x, L, nonfinite=count)
    assert torch.equal(table.nan_to_num(0, 1, -1), ref.nan_to_num(0, 1, -1))  # same writes
    bad_after = {int(r) for r in urows if not torch.isfinite(table[r]).all()}
    assert bad_after and bad_after <= want_rows
    assert int(count) == 3 + len(bad_after)
    with pytest.raises(TypeError, match="^nonfinite"):
        _native.scatter_rows(table, urows, offsets, order, coef, x, L, nonfinite=torch.zeros(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,M,L", [(1, 1, 1, 1), (5, 3, 0, 2), (7, 4, 9, 3), (300, 7, 40, 3),
                                     (1024, 33, 700, 8), (4096, 64, 1500, 32)])
def test_scatter_pairs_equals_bucketed_scatter(dtype, R, D, M, L):
    """The unsorted pair update adds each row's terms in pair order: bit-identical to
    scatter_rows over segment_rows' buckets, at one and at two threads, starting from a random
    table (not zeros), with rows that get many pairs and rows that get none."""
    g = gen(R * 13 + M)
    rows = randint(g, 0, R, M, L)
    if M:
        rows[:, 0] = rows[0, 0]  # one row with a long segment
    x = randn(g, M, D, dtype=dtype)
    coef = randn(g, M, L, dtype=dtype)
    base = randn(g, R, D, dtype=dtype)
    want = base.clone()
    urows, offsets, order, _ = recurrence.segments(rows.reshape(-1), R=R)
    _native.scatter_rows(want, urows, offsets, order, coef.reshape(-1), x, L)
    if M:
        assert not torch.equal(want, base)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            got = base.clone()
            _native.scatter_pairs(got, rows, coef, x)
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)


def test_scatter_pairs_refuses_bad_arguments_writing_nothing():
    g = gen(3)
    table = randn(g, 10, 4)
    x, coef = randn(g, 3, 4), randn(g, 3, 2)
    rows = randint(g, 0, 10, 3, 2)
    for bad in (10, -1):
        r = rows.clone()
        r[2, 1] = bad
        t = table.clone()
        with pytest.raises(ValueError, match=f"rows holds {bad}"):
            _native.scatter_pairs(t, r, coef, x)
        assert torch.equal(t, table)
    with _raises(ValueError, "x"):
        _native.scatter_pairs(table, rows, coef, x[:, :3].contiguous())
    with _raises(ValueError, "coef"):
        _native.scatter_pairs(table, rows, coef[:, :1].contiguous(), x)
    with _raises(TypeError, "coef"):
        _native.scatter_pairs(table, rows, coef.float(), x)
    with _raises(ValueError, "rows"):
        _native.scatter_pairs(table, rows.reshape(-1), coef, x)


# ================================================================================ instruction sets


def _every_kernel(g, dtype):
    """Each CPU kernel once on random data, with its torch oracle: [(name, got, want, exact)]."""
    out = []
    # short lists (a plain scan) and long ones (block maxima: k <= 8, k <= 16, k = 32)
    for M, H, n, k in ((37, 2, 70, 5), (40, 1, 512, 8), (20, 2, 512, 13), (12, 2, 512, 32)):
        dots = randn(g, M, H, 2, n, dtype=dtype)
        qn = rand(g, M, H, 2, dtype=dtype, lo=2.0, hi=4.0)
        kn = rand(g, -(-M // 13), H, 2, n, dtype=dtype, lo=0.5, hi=2.0)
        for kind in ("idw", "dot"):
            got = run_topk_select(dots, qn, kn, k, 13, kind)
            want = topk_oracle(dots.double(), qn.double(), kn.double(), k, 13, kind, 1e-3)
            out += [(f"topk_select {kind} n{n} k{k} idx", got[0], want[0], True),
                    (f"topk_select {kind} n{n} k{k} score", got[1], want[1].to(dtype), False)]
    R, D, Mr, L = 300, 37, 90, 6
    table, rows, w = gather_case(g, R, D, Mr, L, dtype)
    x = randn(g, Mr, D, dtype=dtype)
    o = torch.empty(Mr, D, dtype=dtype)
    _native.gather_rows(table, rows, w, o)
    out.append(("gather_rows", o, torch.einsum("ml,mld->md", w.double(), table.double()[rows]).to(dtype), False))
    gw = torch.empty(Mr, L, dtype=dtype)
    _native.gather_dot(table, rows, x, gw)
    out.append(("gather_dot", gw, torch.einsum("mld,md->ml", table.double()[rows], x.double()).to(dtype), False))
    qs, Ks, ids = randn(g, 30, 2, 2, 37, dtype=dtype), randn(g, 3, 2, 2, 11, 37, dtype=dtype), randint(g, 0, 121, 30, 2, 9)
    kid = recurrence.read_kid(ids.view(3, 10, 2, 9), torch.arange(3), 2, 11)
    sw = (qs.double().view(3, 10, 2, 2, 1, 37) * Ks.double().reshape(-1, 37)[kid]).sum(-1)
    out.append(("slot_scores", _native.slot_scores(qs, Ks, ids, 10), sw.reshape(30, 2, 2, 9).to(dtype), False))
    flat = rows.reshape(-1)
    pairs = torch.arange(flat.numel())
    want = scatter_expected(table, flat, pairs, w.reshape(-1), x, L).to(dtype)
    urows, offsets, order, _ = recurrence.segments(flat, R=R)
    t = table.clone()
    _native.scatter_rows(t, urows, offsets, order, w.reshape(-1).contiguous(), x, L)
    out.append(("scatter_rows", t, want, False))
    t = table.clone()
    _native.scatter_pairs(t, rows, w, x)
    out.append(("scatter_pairs", t, want, False))
    t = torch.full_like(table, float("nan"))
    _native.scatter_rows_dense(t, urows, offsets, order, w.reshape(-1).contiguous(), x, L)
    out.append(("scatter_rows_dense", t, (want - table).to(dtype), False))
    t, gwd = torch.full_like(table, float("nan")), torch.full(rows.shape, float("nan"), dtype=dtype)
    _native.scatter_rows_dense(t, urows, offsets, order, w.reshape(-1).contiguous(), x, L, src=table, gw=gwd)
    out.append(("scatter_rows_dense with src", t, (want - table).to(dtype), False))
    out.append(("scatter_rows_dense gw", gwd, (table.double()[rows] * x.double()[:, None]).sum(-1).to(dtype), False))
    K = table * 0.3
    kn, xn = (K * K).sum(-1), (x * x).sum(-1)
    s, inv = _native.idw_pairs(K, rows, x, xn, kn, 1e-3)
    d = ((x.double().unsqueeze(1) - K.double()[rows]) ** 2).sum(-1)
    out.append(("idw_pairs", s, (-torch.log(1e-3 + d)).to(dtype), False))
    out.append(("row_norms", _native.row_norms(x), (x.double() ** 2).sum(-1).to(dtype), False))
    pos = randint(g, 0, L, Mr, L)
    out.append(("read_weights", _native.read_weights(s, pos, Mr // 2, 1), _read_weights_oracle(s, pos, Mr // 2, 1).to(dtype), False))
    gk = torch.empty(Mr, L, dtype=dtype)
    _native.gather_dot(K, rows, x, gk)
    for score, sc, iv in (("idw", s, inv), ("dot", gk, None)):
        _, P_want, pbar_want, new_want = _addr_by_torch(K, x, rows, score, 45.0, 0.8, 0.6)
        P, _, _, pbar, new, _ = _native.addr_step(sc, iv, rows, x, K, 45.0, 0.8, 0.6, 1e-8)
        out += [(f"addr_step {score} P", P, P_want.to(dtype), False),
                (f"addr_step {score} step", new - K, (new_want - K.double()).to(dtype), False)]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_isa_matches_the_oracles_and_is_deterministic(dtype):
    """Each instruction-set variant of the CPU kernels (csrc/cpu/isa.h) this build and CPU can
    run: every kernel against its float64 oracle, and bit-identical at one and two threads.
    Across variants the selections agree and the values agree to rounding."""
    avail = _native.build_info()["cpu_isas"]
    assert "base" in avail and _native.cpu_isa() in avail
    first = _native.cpu_isa()
    threads = torch.get_num_threads()
    results = {}
    try:
        for isa in avail:
            assert _native.set_cpu_isa(isa) in avail
            assert _native.cpu_isa() == isa
            runs = []
            for nt in (1, 2):
                torch.set_num_threads(nt)
                runs.append(_every_kernel(gen(99), dtype))
            for (name, got, want, exact), (_, got2, _, _) in zip(*runs):
                assert torch.equal(got, got2), f"{isa} {name}: differs between 1 and 2 threads"
                if exact:
                    assert torch.equal(got, want), f"{isa} {name}"
                else:
                    torch.testing.assert_close(got, want, **TOL[dtype], msg=f"{isa} {name}")
            results[isa] = runs[0]
    finally:
        torch.set_num_threads(threads)
        _native.set_cpu_isa(first)
    for isa in avail:
        for (name, got, _, exact), (_, ref_got, _, _) in zip(results[isa], results["base"]):
            if exact:
                assert torch.equal(got, ref_got), f"{isa} vs base: {name}"
    with pytest.raises(ValueError, match="^name"):
        _native.set_cpu_isa("sse9")
    assert _native.cpu_isa() == first


def test_cpu_isa_environment_variable_picks_the_variant(tmp_path):
    import os
    import subprocess
    import sys
    # run from elsewhere: in a source checkout with an installed package, the checkout's
    # fwpkm_ext/ (no built module) would shadow the installed one
    code = "from fwpkm_ext import _native; print(_native.cpu_isa())"
    # the package this test imports, first on the child's path (an in-place build is found
    # through the current directory only)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fwpkm_ext.__file__)))
    env = dict(os.environ, FWPKM_CPU_ISA="base",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = dict(env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    got = subprocess.run([sys.executable, "-c", code], **run)
    assert got.stdout.strip() == "base"
    avail = _native.build_info()["cpu_isas"]
    for name in ("avx2", "avx512"):  # each variant by name
        if name in avail:
            env["FWPKM_CPU_ISA"] = name
            got = subprocess.run([sys.executable, "-c", code], **run)
            assert got.stdout.strip() == name
    env["FWPKM_CPU_ISA"] = "sse9"  # not a variant: the widest, as without the variable
    got = subprocess.run([sys.executable, "-c", code], **run)
    assert got.stdout.strip() == avail[-1]
    env.pop("FWPKM_CPU_ISA")
    got = subprocess.run([sys.executable, "-c", code], **run)
    assert got.stdout.strip() == avail[-1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,M,L,cap", [(400, 9, 30, 4, 300), (8000, 64, 700, 4, 6000)])
def test_scatter_rows_logged_writes_like_scatter_rows_and_logs_first_writes(dtype, R, D, M, L, cap):
    """The in-place value write with its undo log: the table as scatter_rows leaves it, the
    non-finite count, and in the log each row written for the first time as it was before
    (rows logged by an earlier call are not logged again); the map as map_rows would leave it.
    The second size runs the threaded path (the count is a reduction over threads)."""
    g = gen(5)
    table = randn(g, R, D, dtype=dtype)
    slot = torch.full((R,), -1, dtype=torch.long)
    touched = torch.full((cap,), -5, dtype=torch.long)
    log = torch.full((cap, D), float("nan"), dtype=dtype)
    bad = torch.zeros(1, dtype=torch.long)
    U, expect = 0, 0
    for call in range(3):
        rows = randint(g, 0, R, M, L)
        x = randn(g, M, D, dtype=dtype)
        if call == 2:
            x[3: 3 + M // 10, 0] = float("inf")
        coef = randn(g, M * L, dtype=dtype)
        urows, offsets, order, _ = recurrence.segments(rows.reshape(-1), R=R)
        want = table.clone()
        want_bad = torch.zeros(1, dtype=torch.long)
        _native.scatter_rows(want, urows, offsets, order, coef, x, L, nonfinite=want_bad)
        old_slot = slot.clone()
        before = table.clone()
        U2 = _native.scatter_rows_logged(table, urows, offsets, order, coef, x, L, bad, slot, touched, U, log)
        assert torch.equal(table.nan_to_num(0, 7, -7), want.nan_to_num(0, 7, -7))
        expect += int((~torch.isfinite(table[urows])).any(1).sum())
        new = [int(r) for r in urows if old_slot[r] < 0]
        assert U2 == U + len(new)
        assert touched[U:U2].tolist() == new
        for u in range(U, U2):
            assert int(slot[touched[u]]) == u
            assert torch.equal(log[u], before[touched[u]])
        U = U2
    assert int(bad) == int(want_bad) == expect > 0
    # refusals: nothing written, the map as it was
    rows = torch.tensor([[3, R]])
    urows, offsets, order = torch.tensor([3, R]), torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    t0, s0 = table.clone(), slot.clone()
    with pytest.raises(ValueError, match="outside"):
        _native.scatter_rows_logged(table, urows, offsets, order, randn(g, 2, dtype=dtype),
                                    randn(g, 1, D, dtype=dtype), 2, bad, slot, touched, U, log)
    assert torch.equal(table.nan_to_num(0, 7, -7), t0.nan_to_num(0, 7, -7)) and torch.equal(slot, s0)
    free = [r for r in range(R) if slot[r] < 0][: cap - U + 1]
    urows = torch.tensor(free)
    n = len(free)
    with pytest.raises(ValueError, match="capacity"):
        _native.scatter_rows_logged(table, urows, torch.arange(n + 1), torch.arange(n),
                                    randn(g, n, dtype=dtype), randn(g, n, D, dtype=dtype), 1, bad,
                                    slot, touched, U, log)
    assert torch.equal(table.nan_to_num(0, 7, -7), t0.nan_to_num(0, 7, -7)) and torch.equal(slot, s0)


def _addr_by_torch(K, x, rows, score, rpg, w, lr, eps=1e-3):
    """The addressing terms and key step from their definitions (autograd through the pair
    scores): an oracle for addr_step that shares no code with it."""
    Kd = K.double().clone().requires_grad_(True)
    xd = x.double()
    Kr = Kd[rows]  # (M, L, D)
    if score == "idw":
        d = ((xd.unsqueeze(1) - Kr) ** 2).sum(-1)
        s = -torch.log(eps + d)
    else:
        s = (xd.unsqueeze(1) * Kr).sum(-1)
    P = torch.softmax(s, -1)
    pbar = torch.zeros(K.shape[0], dtype=torch.float64).index_add(0, rows.reshape(-1), P.reshape(-1)) / rpg
    loss = w * (pbar * torch.log(pbar + 1e-8)).sum()
    gK, = torch.autograd.grad(loss, Kd)
    return s.detach(), P.detach(), pbar.detach(), (Kd - lr * gK).detach()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("R,D,M,L", [(3, 2, 4, 2), (64, 9, 50, 5), (1024, 33, 300, 8)])
def test_addr_step_vs_autograd(dtype, score, R, D, M, L):
    """addr_step's P, pbar and key step against autograd of the addressing loss (float64
    oracle), from random keys and queries (not zeros); bit-identical at one and two threads;
    without want_keys the same terms and no step."""
    g = gen(R + M * 3 + L)
    K = randn(g, R, D, dtype=dtype, scale=0.3)
    x = randn(g, M, D, dtype=dtype)
    rows = randint(g, 0, R, M, L)
    rpg, w, lr = float(M) / 2, 0.8, 0.6
    s, P_want, pbar_want, new_want = _addr_by_torch(K, x, rows, score, rpg, w, lr)
    inv = torch.exp(s).to(dtype) if score == "idw" else None  # 1 / (eps + d)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(_native.addr_step(s.to(dtype), inv, rows, x, K, rpg, w, lr, 1e-8))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(outs[0][:5], outs[1][:5]):
        assert torch.equal(a, b)
    P, u, gamma, pbar, new, bad = outs[0]
    assert bad == 0 == outs[1][5]
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=2e-3, atol=2e-5)
    torch.testing.assert_close(P.double(), P_want, **tol)
    torch.testing.assert_close(pbar.double(), pbar_want, **tol)
    torch.testing.assert_close(new.double() - K.double(), new_want - K.double(), **tol)
    assert not torch.equal(new, K)
    P2, u2, gamma2, pbar2, none, _ = _native.addr_step(s.to(dtype), inv, rows, x, K, rpg, w, lr, 1e-8,
                                                      want_keys=False)
    K_inf = K.clone()
    K_inf[R // 2, 0] = float("inf")  # that row of the step is not finite, whatever its pairs
    *_, over, n_bad = _native.addr_step(s.to(dtype), inv, rows, x, K_inf, rpg, w, lr, 1e-8)
    assert n_bad == int((~torch.isfinite(over)).any(1).sum()) >= 1
    assert none is None and torch.equal(P2, P) and torch.equal(gamma2, gamma) and torch.equal(pbar2, pbar)
    bad = rows.clone()
    bad[-1, -1] = R
    with pytest.raises(ValueError, match=f"rows holds {R}"):
        _native.addr_step(s.to(dtype), inv, bad, x, K, rpg, w, lr, 1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("R,D,M,L", [(3, 2, 4, 2), (64, 9, 50, 5), (1024, 33, 300, 8)])
def test_addr_vjp_vs_double_autograd(dtype, score, R, D, M, L):
    """The backward through the key step: for F = <lam, dL_addr/dK>, addr_vjp's dF/dK and dF/dx
    against autograd of autograd of the addressing loss (float64 oracle, random keys, queries
    and lam), from addr_step's terms; bit-identical at one and two threads; bad rows refused."""
    g = gen(R * 5 + M + L)
    K = randn(g, R, D, dtype=dtype, scale=0.3)
    x = randn(g, M, D, dtype=dtype)
    lam = randn(g, R, D, dtype=dtype)
    rows = randint(g, 0, R, M, L)
    rpg, w, ent = float(M) / 2, 0.8, 1e-8
    s, *_ = _addr_by_torch(K, x, rows, score, rpg, w, 0.0)
    inv = torch.exp(s).to(dtype) if score == "idw" else None
    P, u, gamma, pbar, _, _ = _native.addr_step(s.to(dtype), inv, rows, x, K, rpg, w, 0.0, ent,
                                                want_keys=False)
    pe = pbar + ent
    dphi = w * (1.0 / pe + ent / (pe * pe))
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(_native.addr_vjp(P, u, gamma, dphi, inv, rows, x, K, lam, rpg))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    Kd = K.double().clone().requires_grad_(True)
    xd = x.double().clone().requires_grad_(True)
    Kr = Kd[rows]
    if score == "idw":
        sd = -torch.log(1e-3 + ((xd.unsqueeze(1) - Kr) ** 2).sum(-1))
    else:
        sd = (xd.unsqueeze(1) * Kr).sum(-1)
    Pd = torch.softmax(sd, -1)
    pb = torch.zeros(R, dtype=F64).index_add(0, rows.reshape(-1), Pd.reshape(-1)) / rpg
    gK, = torch.autograd.grad(w * (pb * torch.log(pb + ent)).sum(), Kd, create_graph=True)
    want_k, want_x = torch.autograd.grad((lam.double() * gK).sum(), (Kd, xd))
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == F64 else dict(rtol=3e-3, atol=3e-4)
    gk, gx = outs[0]
    torch.testing.assert_close(gk.double(), want_k, **tol)
    torch.testing.assert_close(gx.double(), want_x, **tol)
    bad = rows.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="rows holds -1"):
        _native.addr_vjp(P, u, gamma, dphi, inv, bad, x, K, lam, rpg)
    with pytest.raises(ValueError, match="^lam"):
        _native.addr_vjp(P, u, gamma, dphi, inv, rows, x, K, lam[:-1], rpg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q,R,keep", [(1, 1, 1.0), (40, 7, 0.5), (4096, 3000, 0.9), (300, 5, 0.0)])
def test_segment_coefs_equals_the_torch_expression(dtype, Q, R, keep):
    """The value write's coefficients from the segments: bit-identical to scale * w * (1 / N_row)
    over the kept pairs as torch computes it (value_pairs), 0 for the pairs left out."""
    g = gen(Q + R)
    rows = randint(g, 0, R, Q)
    w = rand(g, Q, dtype=dtype)
    kept = torch.rand(Q, generator=g) < keep
    pid = torch.nonzero(kept).squeeze(1)
    urows, offsets, order, cnt = recurrence.segments(rows, pid, counts=True, R=R)
    inv = torch.zeros(Q, dtype=torch.float64)
    inv[order] = 1.0 / cnt.to(torch.float64)
    want = -0.75 * w * inv.to(dtype)
    got = _native.segment_coefs(offsets, order, w, -0.75)
    assert torch.equal(got[kept], want[kept])
    assert torch.equal(got[~kept], torch.zeros_like(got[~kept]))
    if order.numel():
        with pytest.raises(ValueError, match="^order"):
            _native.segment_coefs(offsets, torch.full_like(order, Q), w, -0.75)
    with _raises(TypeError, "w"):
        _native.segment_coefs(offsets, order, rows, -0.75)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D", [(1, 1), (7, 5), (300, 256), (2000, 37)])
def test_row_norms_vs_oracle(dtype, R, D):
    """Squared row norms (key_norms on the CPU) against float64, bit-identical at one and two
    threads; a 1-D tensor is refused by name."""
    x = randn(gen(R + D), R, D, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(_native.row_norms(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].double(), (x.double() ** 2).sum(-1), **TOL[dtype])
    assert torch.equal(recurrence.key_norms(x.view(R, 1, D)), outs[0].view(R, 1))
    with _raises(ValueError, "x"):
        _native.row_norms(x.reshape(-1))


def _read_weights_oracle(s, pos, M, H):
    """float64: per token, softmax over its H * k slots of the two halves' sub-scores at pos."""
    k = s.shape[1]
    a = torch.gather(s.double(), 1, pos).view(M, H, 2, k).sum(2)
    return torch.softmax(a.reshape(M, H * k), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,k", [(1, 1, 1), (7, 3, 5), (300, 2, 8)])
def test_read_weights_vs_oracle(dtype, M, H, k):
    """read_weights against the float64 gather + sum + softmax, from random scores (not zeros),
    bit-identical at one and two threads; a position outside [0, k) is refused by name."""
    g = gen(M * 7 + H + k)
    s = randn(g, M * H * 2, k, dtype=dtype, scale=3.0)
    pos = randint(g, 0, k, M * H * 2, k)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(_native.read_weights(s, pos, M, H))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].double(), _read_weights_oracle(s, pos, M, H), **TOL[dtype])
    torch.testing.assert_close(outs[0].sum(1).double(), torch.ones(M, dtype=F64), **TOL[dtype])
    bad = pos.clone()
    bad[-1, -1] = k
    with pytest.raises(ValueError, match=f"pos holds {k}"):
        _native.read_weights(s, bad, M, H)
    with _raises(ValueError, "pos"):
        _native.read_weights(s, pos[:-2].contiguous(), M, H)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("B,per_seq,H,la,big", [(1, False, 1, 1, False), (3, False, 2, 0, False),
                                              (3, True, 2, 2, False), (2, True, 1, 5, False),
                                              (2, False, 2, 1, True)])
def test_window_step_equals_the_op_by_op_path(monkeypatch, window_step_calls, dtype, score, B, per_seq, H, la,
                                              big):
    """An in-place call whose writing windows run as single window_step calls gives the bits of
    the op-by-op window loop: outputs, keys, values and counters, over calls whose first window
    has pending tokens (op by op), partial and flushed windows, several memories and heads, a
    lookahead beyond the window (nothing written) and masked-out tokens (mask 0). `big`: sizes
    at which every kernel of the window runs threaded (the residual, the logged write, the key
    step)."""
    n, dk, dv, k, C = (24, 32, 160, 4, 96) if big else (9, 10, 7, 3, 5)
    calls = window_step_calls

    def run(fused):
        monkeypatch.setattr(recurrence, "FUSED_WINDOWS", fused)
        g = gen(B * 11 + H + la)
        cfg = fwpkm_ext.MemoryConfig(n_subkeys=n, key_dim=dk, value_dim=dv, heads=H, topk=k, chunk_size=C,
                                     lookahead=la, score=score, lr=0.7)
        S = B if per_seq else 1
        st = fwpkm_ext.MemoryState(config=cfg, keys=randn(g, S, H, 2, n, dk // 2, dtype=dtype, scale=0.5),
                                   values=randn(g, S, n * n, dv, dtype=dtype), per_sequence=per_seq)
        T = 4 * C + 3
        q, v = randn(g, B, T, H, dk, dtype=dtype), randn(g, B, T, dv, dtype=dtype)
        gt = rand(g, B, T, dtype=dtype, lo=0.1)
        mask = (rand(g, B, T, dtype=dtype) > 0.2).to(dtype)
        outs = []
        with torch.no_grad():
            for a, b, flush in ((0, 2 * C + 2, False), (2 * C + 2, 3 * C + 4, False), (3 * C + 4, T, True)):
                vh, st = F.memory_step(q[:, a:b], v[:, a:b], gt[:, a:b], st, mask=mask[:, a:b],
                                       flush=flush, inplace=True)
                outs.append(vh)
        return torch.cat(outs, 1), st

    want, st_want = run(False)
    assert calls["n"] == 0
    got, st_got = run(True)
    assert calls["n"] > 0
    assert torch.equal(got, want)
    assert torch.equal(st_got.keys, st_want.keys)
    assert torch.equal(st_got.values, st_want.values)
    assert torch.equal(st_got.slot_reads, st_want.slot_reads)


def test_window_step_refuses_bad_arguments():
    """window_step's checks name the argument before anything is read or written."""
    g = gen(5)
    B, T, L, H, n, k, d2, dv = 2, 9, 4, 1, 6, 2, 3, 5
    V = randn(g, n * n, dv)
    t = dict(dots=randn(g, 1, H, 2, B * L, n), K=randn(g, 1, H, 2, n, d2), x=randn(g, B * L * H * 2, d2), v=randn(g, B, T, dv),
             g=rand(g, B, T), mask=torch.ones(B, T, dtype=F64), s0=0, L=L, la=1, kind="idw", eps=1e-3,
             lr=0.5, addr_w=0.1, ent_eps=1e-8, idx=torch.empty(B, T, H, k, dtype=torch.long),
             half=torch.empty(B, T, H, 2, k, dtype=torch.long), w=torch.empty(B, T, H * k, dtype=F64),
             vhat=torch.empty(B, T, dv, dtype=F64), V=V, new_keys=torch.empty(H * 2 * n, d2, dtype=F64),
             slot=torch.full((n * n,), -1, dtype=torch.long), touched=torch.empty(B * T * H * k, dtype=torch.long),
             used=torch.zeros(1, dtype=torch.long), log=torch.empty(B * T * H * k, dv, dtype=F64),
             nonfinite=torch.zeros(1, dtype=torch.long))
    assert _native.window_step(**t) == 0  # the good call runs
    before = V.clone()
    for name, val in (("mask", torch.ones(B, T - 1, dtype=F64)), ("s0", 6), ("L", 0), ("kind", "cosine"),
                      ("K", None), ("x", randn(g, B * L * H * 2, d2 + 1)), ("used", torch.tensor([10 ** 6])),
                      ("V", V[:-1]), ("slot", torch.zeros(n * n, dtype=torch.int32))):
        bad = dict(t, **{name: val})
        bad["V"] = V if name != "V" else val
        with _raises((ValueError, TypeError), name):
            _native.window_step(**bad)
    skipped = dict(t, mask=torch.where(torch.arange(T) == 2, -1.0, 1.0).to(F64).expand(B, T).contiguous())
    with _raises(ValueError, "mask"):
        _native.window_step(**skipped)
    with _raises(ValueError, "new_keys"):
        _native.window_step(**dict(t, new_keys=t["K"].view(H * 2 * n, d2)))
    with _raises(ValueError, "idx"):
        _native.window_step(**dict(t, idx=torch.empty(B, T, H, n + 1, dtype=torch.long)))
    # a later window of the same call: what changes from window to window is still checked
    for name, val in (("dots", randn(g, 1, H, 2, B * L, n + 1)), ("dots", randn(g, B * L, H, 2, n)),
                      ("dots", randn(g, B, H, 2, L, n)), ("x", randn(g, B * L * H * 2, d2 + 1)),
                      ("K", t["K"].float()), ("s0", 6), ("new_keys", t["K"].view(H * 2 * n, d2)),
                      ("used", torch.tensor([10 ** 6]))):
        with _raises((ValueError, TypeError), name):
            _native.window_step(**dict(t, **{name: val}), same_call=True)
    assert torch.equal(V, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D,M,L", [(1, 1, 1, 1), (9, 5, 7, 3), (1024, 64, 300, 8)])
def test_idw_pairs_vs_oracle(dtype, R, D, M, L):
    """IDW pair scores in one pass: 1 / (eps + d) bit-identical to the torch expression it
    replaces (Pairs), the score -log(eps + d) against float64, and a query equal to its key
    (distance rounding below 0, clamped) scoring -log(eps)."""
    g = gen(R * 3 + M)
    K = randn(g, R, D, dtype=dtype, scale=0.3)
    x = randn(g, M, D, dtype=dtype)
    rows = randint(g, 0, R, M, L)
    x[0] = K[rows[0, 0]]
    kn, xn = (K * K).sum(-1), (x * x).sum(-1)
    s, inv = _native.idw_pairs(K, rows, x, xn, kn, 1e-3)
    dot = recurrence.gather_x(K, rows, x)
    d = (xn.unsqueeze(1) + kn[rows] - 2.0 * dot).clamp_min(0.0)
    assert torch.equal(inv, 1.0 / (1e-3 + d))
    want = -torch.log(1e-3 + ((x.double().unsqueeze(1) - K.double()[rows]) ** 2).sum(-1))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), want, **tol)
    assert abs(float(s[0, 0]) + math.log(1e-3)) < (1e-9 if dtype == F64 else 1e-3)
    with _raises(ValueError, "kn"):
        _native.idw_pairs(K, rows, x, xn, kn[:-1].contiguous() if R > 1 else kn.new_empty(2), 1e-3)
