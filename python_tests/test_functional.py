"""The public functional API (fwpkm_ext/functional.py): the native CPU backend of fwpkm_memory
against the pure-PyTorch oracle (backend="reference") in float64, gradients through every fast
update, memory that does not grow with the number of windows, validation, determinism and
torch.compile.
"""
import math

import pytest
import torch

import fwpkm_ext
from fwpkm_ext import fwpkm_memory

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
F32 = torch.float32
RTOL, ATOL = 1e-8, 1e-10  # float64, native vs reference


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_inputs(seed, B, T, H, dk, n, dv, per_seq=False, dtype=F64, repeat_q=False):
    g = gen(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=F64)
    if repeat_q:  # only 2 distinct queries per sequence: the same slots are read again and again
        q = q[:, torch.arange(T) % 2]
    v = torch.randn(B, T, dv, generator=g, dtype=F64)
    v = (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-6) if dv > 1 else v
    gt = torch.sigmoid(torch.randn(B, T, generator=g, dtype=F64))
    S = B if per_seq else 1
    bound = 1.0 / math.sqrt(dk)
    keys = (torch.rand(S, H, 2, n, dk // 2, generator=g, dtype=F64) * 2 - 1) * bound * 4
    values = torch.randn(S, n * n, dv, generator=g, dtype=F64) / math.sqrt(dv)
    if not per_seq:
        keys, values = keys[0], values[0]
    return [t.to(dtype) for t in (q, v, gt, keys, values)]


def run(inputs, backend, cot=None, mask=None, **cfg):
    """Forward (and, with cotangents, the gradients of <cot, outputs> w.r.t. q, v, g, keys,
    values; None -> zeros)."""
    leaves = [t.detach().clone().requires_grad_(cot is not None) for t in inputs]
    outs = fwpkm_memory(*leaves, mask=mask, backend=backend, **cfg)
    if cot is None:
        return [o.detach() for o in outs], None
    loss = sum((o * c).sum() for o, c in zip(outs, cot))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]
    return [o.detach() for o in outs], grads


def cotangents(seed, outs):
    g = gen(seed)
    return [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]


NAMES_OUT = ("vhat", "new_keys", "new_values")
NAMES_IN = ("q", "v", "g", "keys", "values")


def compare(inputs, mask=None, grads=True, seed=0, **cfg):
    with torch.no_grad():
        probe = fwpkm_memory(*inputs, mask=mask, backend="reference", **cfg)
    cot = cotangents(seed + 1, probe) if grads else None
    o_c, g_c = run(inputs, "cpu", cot, mask, **cfg)
    o_r, g_r = run(inputs, "reference", cot, mask, **cfg)
    for name, a, b, x in zip(NAMES_OUT, o_c, o_r, (None,) + tuple(inputs[3:])):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    if grads:
        for name, a, b in zip(NAMES_IN, g_c, g_r):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"d/d{name}: {m}")
    return o_c, g_c


# ---------------------------------------------------------------------------- vs reference

CASES = {
    # name: (make_inputs kwargs, fwpkm_memory kwargs)
    "base": (dict(B=2, T=11, H=1, dk=6, n=5, dv=3), dict(topk=2, chunk_size=4)),
    "T_multiple_of_C": (dict(B=1, T=8, H=1, dk=4, n=4, dv=4), dict(topk=2, chunk_size=4)),
    "T_lt_C": (dict(B=2, T=3, H=1, dk=4, n=4, dv=3), dict(topk=2, chunk_size=8)),
    "one_token": (dict(B=1, T=1, H=2, dk=4, n=3, dv=2), dict(topk=2, chunk_size=4)),
    "C_1": (dict(B=1, T=4, H=1, dk=4, n=3, dv=2), dict(topk=2, chunk_size=1, lookahead=0)),
    "k1": (dict(B=2, T=9, H=1, dk=4, n=4, dv=3), dict(topk=1, chunk_size=4)),
    "k_eq_n": (dict(B=1, T=7, H=1, dk=4, n=3, dv=2), dict(topk=3, chunk_size=3)),
    "H3_shared_B2": (dict(B=2, T=10, H=3, dk=4, n=5, dv=3), dict(topk=2, chunk_size=4)),
    "per_seq": (dict(B=3, T=10, H=2, dk=6, n=4, dv=5, per_seq=True), dict(topk=3, chunk_size=4)),
    "per_seq_B1": (dict(B=1, T=9, H=1, dk=4, n=3, dv=3, per_seq=True), dict(topk=2, chunk_size=4)),
    "odd_dims": (dict(B=2, T=13, H=1, dk=2, n=7, dv=1), dict(topk=3, chunk_size=5)),
    "lookahead0": (dict(B=2, T=10, H=1, dk=4, n=4, dv=3), dict(topk=2, chunk_size=4, lookahead=0)),
    "lookahead2": (dict(B=2, T=10, H=1, dk=4, n=4, dv=3), dict(topk=2, chunk_size=4, lookahead=2)),
    "lookahead_eq_C": (dict(B=2, T=10, H=1, dk=4, n=4, dv=3),
                       dict(topk=2, chunk_size=4, lookahead=4)),
    "lookahead_gt_C": (dict(B=1, T=9, H=2, dk=4, n=4, dv=3),
                       dict(topk=2, chunk_size=3, lookahead=7)),
    "repeat_q": (dict(B=2, T=12, H=2, dk=4, n=4, dv=3, repeat_q=True),
                 dict(topk=3, chunk_size=5)),
    "repeat_q_per_seq": (dict(B=2, T=9, H=1, dk=4, n=3, dv=2, per_seq=True, repeat_q=True),
                         dict(topk=2, chunk_size=4)),
    "dot": (dict(B=2, T=11, H=2, dk=4, n=5, dv=3), dict(topk=2, chunk_size=4, score="dot")),
    "dot_per_seq": (dict(B=2, T=9, H=1, dk=6, n=4, dv=2, per_seq=True),
                    dict(topk=3, chunk_size=4, score="dot", lookahead=2)),
    "lr_waddr_eps": (dict(B=2, T=10, H=1, dk=4, n=4, dv=3),
                     dict(topk=2, chunk_size=4, lr=0.3, addr_loss_weight=2.5, eps=0.05)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    mk, cfg = CASES[name]
    inputs = make_inputs(hash(name) % 1000, **mk)
    outs, _ = compare(inputs, seed=len(name), **cfg)
    # the memory really changed (the test can see a wrong update); with lookahead >= the window
    # no token has a target (values stay), with topk = 1 the addressing softmax is one-hot
    # (no key gradient)
    la, C, T = cfg.get("lookahead", 1), cfg["chunk_size"], mk["T"]
    assert torch.equal(outs[2], inputs[4]) == (la >= min(C, T))
    assert torch.equal(outs[1], inputs[3]) == (cfg["topk"] == 1)


@pytest.mark.parametrize("T,C", [(3, 3), (4, 6)])
@pytest.mark.parametrize("per_seq", [False, True])
def test_first_order_gradients_one_window(T, C, per_seq):
    """One window (T <= C): gradients of the read and of the single update."""
    inputs = make_inputs(7 + T, B=2, T=T, H=2, dk=4, n=4, dv=3, per_seq=per_seq)
    compare(inputs, seed=T, topk=2, chunk_size=C)


def test_mask():
    inputs = make_inputs(3, B=2, T=11, H=1, dk=4, n=4, dv=3)
    mask = torch.tensor([[1, 0, 1, 1, 0.5, 0, 0, 1, 2, 1, 0],
                         [0, 1, -1, 1, 1, 1, 0, 0, 1, 1, 1]], dtype=F64)
    compare(inputs, mask=mask, topk=2, chunk_size=4)
    compare(inputs, mask=mask.bool(), topk=2, chunk_size=4, lookahead=2)


@pytest.mark.parametrize("per_seq", [False, True])
def test_all_zero_mask(per_seq):
    """No token writes: values unchanged (keys still move), no gradient reaches v and g
    through updates."""
    inputs = make_inputs(5, B=2, T=9, H=1, dk=4, n=4, dv=3, per_seq=per_seq)
    mask = torch.zeros(2, 9, dtype=F64)
    outs, grads = compare(inputs, mask=mask, topk=2, chunk_size=4)
    assert torch.equal(outs[2], inputs[4])
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0
    assert torch.count_nonzero(grads[0]) > 0


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2)])
def test_gradients_of_single_outputs(which):
    """A loss of only some outputs (the others' gradients arrive as None in the backward)."""
    mk, cfg = CASES["per_seq"]
    inputs = make_inputs(17, **mk)
    grads = []
    for backend in ("cpu", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = fwpkm_memory(*leaves, backend=backend, **cfg)
        loss = sum(outs[i].sin().sum() for i in which)
        gr = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads.append([torch.zeros_like(x) if d is None else d for x, d in zip(leaves, gr)])
    for name, a, b in zip(NAMES_IN, *grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("need", [(0,), (4,), (3,), (1, 2)])
def test_gradients_of_some_inputs(need):
    """Only some inputs require grad (e.g. values not: the dense value gradient is skipped)."""
    mk, cfg = CASES["H3_shared_B2"]
    inputs = make_inputs(19, **mk)
    cot = cotangents(3, fwpkm_memory(*inputs, backend="reference", **cfg))
    grads = []
    for backend in ("cpu", "reference"):
        leaves = [t.detach().clone().requires_grad_(i in need) for i, t in enumerate(inputs)]
        outs = fwpkm_memory(*leaves, backend=backend, **cfg)
        loss = sum((o * c).sum() for o, c in zip(outs, cot))
        grads.append(torch.autograd.grad(loss, [leaves[i] for i in need]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_no_grad_and_non_contiguous_inputs():
    """no_grad gives the same forward; strided (non-contiguous) inputs are handled."""
    mk, cfg = CASES["base"]
    q, v, gt, keys, values = make_inputs(23, **mk)
    want = fwpkm_memory(q, v, gt, keys, values, backend="reference", **cfg)
    with torch.no_grad():
        got = fwpkm_memory(q, v, gt, keys, values, backend="cpu", **cfg)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.detach(), rtol=RTOL, atol=ATOL)
    qs = q.transpose(0, 1).contiguous().transpose(0, 1)
    vs = v.transpose(1, 2).contiguous().transpose(1, 2)
    gs = gt.t().contiguous().t()
    ks = keys.transpose(-1, -2).contiguous().transpose(-1, -2)
    vals = values.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (qs, vs, gs, ks, vals))
    got2 = fwpkm_memory(qs, vs, gs, ks, vals, backend="cpu", **cfg)
    for a, b in zip(got2, got):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_identical_heads_hit_the_same_slots():
    """H = 2 heads with identical keys and queries: every token reads each slot twice (N_i counts
    (t, h, j) triples), plus repeated queries across tokens."""
    q, v, gt, keys, values = make_inputs(73, B=2, T=9, H=2, dk=4, n=4, dv=3, repeat_q=True)
    keys[1] = keys[0]
    q[:, :, 1] = q[:, :, 0]
    compare([q, v, gt, keys, values], topk=2, chunk_size=4)


def test_addressing_tie_at_kth_subscore():
    q, v, gt, keys, values = make_inputs(4, B=1, T=8, H=1, dk=4, n=4, dv=3)
    keys[:, :, 1] = keys[:, :, 0]  # sub-keys 0/1 and 2/3 identical in both halves
    keys[:, :, 3] = keys[:, :, 2]
    compare([q, v, gt, keys, values], grads=False, topk=3, chunk_size=4)


@pytest.mark.parametrize("per_seq", [False, True])
def test_empty_sequence(per_seq):
    """T = 0 (e.g. an empty streaming piece): no window, the state comes back unchanged (a copy),
    and the backward passes the state's gradients straight through (like the reference)."""
    B, H, dk, n, dv = 2, 1, 4, 3, 2
    g = gen(71)
    S = B if per_seq else 1
    q = torch.randn(B, 0, H, dk, generator=g, dtype=F64)
    v = torch.randn(B, 0, dv, generator=g, dtype=F64)
    gt = torch.rand(B, 0, generator=g, dtype=F64)
    keys = torch.rand(S, H, 2, n, dk // 2, generator=g, dtype=F64)
    values = torch.randn(S, n * n, dv, generator=g, dtype=F64)
    if not per_seq:
        keys, values = keys[0], values[0]
    inputs = [q, v, gt, keys, values]
    with torch.no_grad():
        outs = fwpkm_memory(*inputs, topk=2, chunk_size=3, backend="cpu")
    assert outs[0].shape == (B, 0, dv)
    assert torch.equal(outs[1], keys) and torch.equal(outs[2], values)
    compare(inputs, topk=2, chunk_size=3)


def test_float32_inputs():
    """float32 fast weights and inputs work and agree with the float64 computation."""
    mk, cfg = CASES["H3_shared_B2"]
    x64 = make_inputs(9, **mk)
    x32 = [t.float() for t in x64]
    cot = cotangents(1, fwpkm_memory(*x64, backend="reference", **cfg))
    o64, g64 = run(x64, "cpu", cot, **cfg)
    o32, g32 = run(x32, "cpu", [c.float() for c in cot], **cfg)
    for a, b in zip(o32, o64):
        assert a.dtype == F32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    for a, b in zip(g32, g64):
        assert a.dtype == F32
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


def test_low_precision_tokens_with_float32_state():
    """q/v/g in bfloat16 with float32 fast weights: outputs come out in float32."""
    mk, cfg = CASES["base"]
    x = [t.float() for t in make_inputs(13, **mk)]
    lo = [t.bfloat16() for t in x[:3]] + x[3:]
    outs = fwpkm_memory(*lo, backend="cpu", **cfg)
    want = fwpkm_memory(*[t.float() for t in lo], backend="cpu", **cfg)
    for a, b in zip(outs, want):
        assert a.dtype == F32
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- second order


def test_gradcheck_through_updates():
    """Finite differences through >= 2 windows (the value updates and the key update, itself a
    gradient: second order) w.r.t. q, v, g, keys and values."""
    q, v, gt, keys, values = make_inputs(21, B=1, T=7, H=1, dk=4, n=3, dv=2)
    leaves = [t.requires_grad_() for t in (q, v, gt, keys, values)]

    def f(*a):
        return fwpkm_memory(*a, topk=2, chunk_size=3, lr=0.7, backend="cpu")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_per_seq_dot_mask():
    q, v, gt, keys, values = make_inputs(22, B=2, T=5, H=1, dk=2, n=3, dv=2, per_seq=True)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0]], dtype=F64)
    leaves = [t.requires_grad_() for t in (q, v, gt, keys, values)]

    def f(*a):
        return fwpkm_memory(*a, topk=2, chunk_size=2, lookahead=1, mask=mask, score="dot",
                            backend="cpu")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- memory


def saved_bytes(backend, T, C, n, dv, seed=0):
    inputs = make_inputs(seed, B=1, T=T, H=1, dk=4, n=n, dv=dv)
    leaves = [t.requires_grad_() for t in inputs]
    total = [0]
    seen = set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fwpkm_memory(*leaves, topk=2, chunk_size=C, backend=backend)
    return total[0]


def test_saved_memory_does_not_grow_with_windows_times_table():
    C, n, dv = 4, 48, 16
    N = n * n
    table = N * dv * 8
    extra_windows = 4
    a = saved_bytes("cpu", 4 * C, C, n, dv)
    b = saved_bytes("cpu", 8 * C, C, n, dv)
    growth = b - a
    assert growth > 0
    assert growth < 0.05 * extra_windows * table, (a, b, table)
    assert b < 0.5 * table, (b, table)
    # the hooks do see what the fused op saves: at least the rows each token read (T*k*dv)
    assert a >= 4 * C * 2 * dv * 8


# ---------------------------------------------------------------------------- purity, determinism


def test_inputs_not_modified():
    mk, cfg = CASES["per_seq"]
    inputs = [t.requires_grad_() for t in make_inputs(31, **mk)]
    mask = torch.ones(3, 10, dtype=F64)
    mask[1, 2] = 0
    before = [t.detach().clone() for t in inputs] + [mask.clone()]
    versions = [t._version for t in inputs] + [mask._version]
    outs = fwpkm_memory(*inputs, mask=mask, backend="cpu", **cfg)
    sum(o.square().sum() for o in outs).backward()
    for t, b, ver in zip(inputs + [mask], before, versions):
        assert torch.equal(t.detach(), b)
        assert t._version == ver
    # the returned state does not share storage with the inputs
    assert outs[1].data_ptr() != inputs[3].data_ptr()
    assert outs[2].data_ptr() != inputs[4].data_ptr()


def test_deterministic():
    mk, cfg = CASES["repeat_q"]
    inputs = make_inputs(41, **mk)
    with torch.no_grad():
        cot = cotangents(2, fwpkm_memory(*inputs, backend="cpu", **cfg))
    o1, g1 = run(inputs, "cpu", cot, **cfg)
    o2, g2 = run(inputs, "cpu", cot, **cfg)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        o3, g3 = run(inputs, "cpu", cot, **cfg)
    finally:
        torch.set_num_threads(old)
    for a, b, c in zip(o1 + g1, o2 + g2, o3 + g3):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------- validation


def _raises(exc, name):
    return pytest.raises(exc, match=rf"^{name}\b")


def _bad_calls():
    q, v, gt, keys, values = make_inputs(51, B=2, T=5, H=1, dk=4, n=3, dv=2, dtype=F32)
    pk, pv = make_inputs(52, B=2, T=5, H=1, dk=4, n=3, dv=2, dtype=F32, per_seq=True)[3:]
    base = dict(q=q, v=v, g=gt, keys=keys, values=values, topk=2, chunk_size=2)

    def with_(**kw):
        d = dict(base)
        d.update(kw)
        return d

    return [
        ("keys", TypeError, with_(keys=keys.half(), values=values.half())),
        ("keys", TypeError, with_(keys=keys.bfloat16())),
        ("values", TypeError, with_(values=values.double())),
        ("q", ValueError, with_(q=q[..., :3])),
        ("q", TypeError, with_(q=q.long())),
        ("q", ValueError, with_(q=q[0])),
        ("keys", ValueError, with_(keys=keys[:, :, :, :1])),
        ("keys", ValueError, with_(keys=keys.transpose(1, 2).contiguous())),
        ("keys", ValueError, with_(keys=torch.cat([keys, keys], 0))),  # H = 2 for a 1-head q
        ("values", ValueError, with_(values=values[:-1])),
        ("values", ValueError, with_(values=pv)),  # shared keys with per-sequence values
        ("keys", ValueError, with_(keys=pk[:1].expand(3, -1, -1, -1, -1),
                                   values=pv[:1].expand(3, -1, -1))),  # per-seq batch 3 != 2
        ("keys", ValueError, with_(keys=pk[:1], values=pv[:1])),  # per-seq batch 1 != 2
        ("v", ValueError, with_(v=v[:, :4])),
        ("v", ValueError, with_(v=torch.cat([v, v], -1))),  # dv 4 for a dv-2 value table
        ("v", ValueError, with_(v=v[..., :1])),  # dv 1 would broadcast silently
        ("g", ValueError, with_(g=gt.unsqueeze(-1))),
        ("topk", ValueError, with_(topk=4)),
        ("topk", ValueError, with_(topk=0)),
        ("topk", TypeError, with_(topk=2.0)),
        ("chunk_size", ValueError, with_(chunk_size=0)),
        ("lookahead", ValueError, with_(lookahead=-1)),
        ("lr", ValueError, with_(lr=float("nan"))),
        ("lr", ValueError, with_(lr=float("inf"))),
        ("addr_loss_weight", ValueError, with_(addr_loss_weight=float("nan"))),
        ("eps", ValueError, with_(eps=0.0)),
        ("score", ValueError, with_(score="cosine")),
        ("backend", ValueError, with_(backend="tpu")),
        ("backend", ValueError, with_(backend="cuda")),
        ("mask", ValueError, with_(mask=torch.ones(2, 4))),
        ("mask", ValueError, with_(mask=torch.ones(2, 5, 1))),
    ]


@pytest.mark.parametrize("i,name", [(i, c[0]) for i, c in enumerate(_bad_calls())])
def test_bad_inputs(i, name):
    _, exc, kw = _bad_calls()[i]
    with _raises(exc, name):
        fwpkm_memory(kw.pop("q"), kw.pop("v"), kw.pop("g"), kw.pop("keys"), kw.pop("values"), **kw)


def test_good_call_of_bad_inputs_base():
    """The base of test_bad_inputs is itself valid (each bad call differs by one argument)."""
    q, v, gt, keys, values = make_inputs(51, B=2, T=5, H=1, dk=4, n=3, dv=2, dtype=F32)
    fwpkm_memory(q, v, gt, keys, values, topk=2, chunk_size=2)
    fwpkm_memory(q, v, gt, keys, values, topk=2, chunk_size=2, mask=torch.ones(2, 5))


def test_gather_bad_rows():
    table = torch.randn(5, 3, dtype=F64)
    w = torch.randn(4, 2, dtype=F64)
    rows = torch.randint(0, 5, (4, 2))
    fwpkm_ext.gather(table, rows, w)  # fine
    for bad in (5, -1, 100):
        r = rows.clone()
        r[2, 1] = bad
        with _raises(ValueError, "rows"):
            fwpkm_ext.gather(table, r, w)
    with _raises(TypeError, "rows"):
        fwpkm_ext.gather(table, rows.int(), w)
    with _raises(ValueError, "rows"):
        fwpkm_ext.gather(table, rows[:, :1], w)
    with _raises(TypeError, "w"):
        fwpkm_ext.gather(table, rows, w.float())


def test_product_key_topk_bad_inputs():
    q, _, _, keys, _ = make_inputs(53, B=2, T=3, H=1, dk=4, n=3, dv=2)
    with _raises(ValueError, "topk"):
        fwpkm_ext.product_key_topk(q, keys, 4)
    with _raises(ValueError, "topk"):
        fwpkm_ext.product_key_topk(q, keys, 0)
    with _raises(ValueError, "keys"):
        fwpkm_ext.product_key_topk(q, keys[..., :1], 2)
    with _raises(TypeError, "q"):
        fwpkm_ext.product_key_topk(q.float(), keys, 2)
    with _raises(ValueError, "score"):
        fwpkm_ext.product_key_topk(q, keys, 2, score="l2")


@pytest.mark.parametrize("S", [1, 2])
def test_topk_op_on_no_tokens(S):
    """The registered top-k op on zero tokens (the public wrapper returns early; a direct
    torch.ops call reaches the search): empty outputs, for one memory and one per sequence."""
    q, _, _, keys, _ = make_inputs(54, B=2, T=3, H=1, dk=4, n=3, dv=2)
    keys5 = keys.unsqueeze(0).expand(S, *keys.shape).contiguous()
    idx, score, hidx, hsc = fwpkm_ext.ops.topk(q[:, :0].contiguous(), keys5, 2, "idw", 1e-3)
    assert idx.shape == (2, 0, 1, 2) and hidx.shape == (2, 0, 1, 2, 2)
    assert score.numel() == 0 and hsc.numel() == 0


# ---------------------------------------------------------------------------- torch.compile


def test_torch_compile_matches_eager():
    """One small shape; aot_eager keeps it fast (no C++ codegen) and still traces the custom
    ops through dynamo + AOTAutograd (fake kernels, registered autograd, backward op)."""
    torch._dynamo.reset()
    inputs = make_inputs(61, B=1, T=6, H=1, dk=4, n=3, dv=2)

    def f(q, v, g, keys, values):
        vh, nk, nv = fwpkm_memory(q, v, g, keys, values, topk=2, chunk_size=3, backend="cpu")
        return (vh.sin()).sum() + nk.square().sum() + (nv * nv.detach()).sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    lc = [t.clone().requires_grad_() for t in inputs]
    le = [t.clone().requires_grad_() for t in inputs]
    out_c = cf(*lc)
    out_e = f(*le)
    gc = torch.autograd.grad(out_c, lc)
    ge = torch.autograd.grad(out_e, le)
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("score", ["idw", "dot"])
def test_backward_window_cache_equals_recompute(monkeypatch, score):
    """The backward rebuilds each window from the forward's cache (exact pair scores, addressing
    terms); recomputing them instead must give the same gradients, bit for bit (float64, a
    short last window, a mask)."""
    def grads():
        g = torch.Generator().manual_seed(3)
        B, T, H, dk, dv, n = 2, 45, 2, 8, 6, 6
        q = torch.randn(B, T, H, dk, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(B, T, dv, generator=g, dtype=torch.float64, requires_grad=True)
        gt = torch.rand(B, T, generator=g, dtype=torch.float64, requires_grad=True)
        mask = (torch.rand(B, T, generator=g) > 0.2).double()
        keys = ((torch.rand(H, 2, n, dk // 2, generator=g, dtype=torch.float64) * 2 - 1) / 3).requires_grad_()
        vals = (torch.randn(n * n, dv, generator=g, dtype=torch.float64) / 3).requires_grad_()
        out = fwpkm_memory(q, v, gt, keys, vals, topk=3, chunk_size=8, lr=0.5, addr_loss_weight=0.7,
                           mask=mask, score=score)
        # and a streaming call whose last window stays pending (read, not written)
        cfg = fwpkm_ext.MemoryConfig(n_subkeys=n, key_dim=dk, value_dim=dv, heads=H, topk=3,
                                     chunk_size=8, lookahead=1, lr=0.5, addr_loss_weight=0.7, score=score)
        st = fwpkm_ext.MemoryState(config=cfg, keys=keys.unsqueeze(0), values=vals.unsqueeze(0),
                                   per_sequence=False)
        y, _ = fwpkm_ext.memory_step(q, v, gt, st, flush=False)
        out = list(out) + [y]
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
        return torch.autograd.grad(loss, (q, v, gt, keys, vals))

    from fwpkm_ext import recurrence
    cached = grads()
    calls = []

    real_init = recurrence.Window.__init__

    def recompute(self, *args, cache=None, addr=False, kn=None, xn=None):
        calls.append(cache is not None)
        real_init(self, *args, kn=kn, xn=xn)

    monkeypatch.setattr(recurrence.Window, "__init__", recompute)
    fresh = grads()
    assert any(calls), "the backward did not use the window cache"
    for a, b in zip(cached, fresh):
        assert torch.equal(a, b)


def test_inplace_calls_count_reads_like_copying_calls():
    """The telemetry counters of in-place calls (added where they are) equal those of calls that
    copy the state; an in-place call under no_grad after one under inference_mode (counters made
    as an inference tensor) works."""
    g0 = torch.Generator().manual_seed(3)
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=8, key_dim=8, value_dim=6, heads=2, topk=3, chunk_size=4)
    q = torch.randn(2, 11, 2, 8, generator=g0)
    v = torch.randn(2, 11, 6, generator=g0)
    g = torch.rand(2, 11, generator=g0)

    def fresh():
        return fwpkm_ext.MemoryState(config=cfg, keys=torch.randn(2, 2, 2, 8, 4, generator=torch.Generator().manual_seed(1)),
                                     values=torch.randn(2, 64, 6, generator=torch.Generator().manual_seed(2)),
                                     per_sequence=True)

    with torch.no_grad():
        a, b = fresh(), fresh()
        for s0, s1 in ((0, 5), (5, 11)):
            _, a = fwpkm_ext.memory_step(q[:, s0:s1], v[:, s0:s1], g[:, s0:s1], a, flush=False)
        c = b
        with torch.inference_mode():
            _, b = fwpkm_ext.memory_step(q[:, :5], v[:, :5], g[:, :5], b, flush=False, inplace=True)
        _, b = fwpkm_ext.memory_step(q[:, 5:], v[:, 5:], g[:, 5:], b, flush=False, inplace=True)
    assert int(a.slot_reads.sum()) == 2 * 11 * 2 * 3
    assert torch.equal(a.slot_reads, b.slot_reads)
    assert a.tokens == b.tokens == 22 and a.gate_sum == pytest.approx(b.gate_sum)
    torch.testing.assert_close(b.values, a.values, rtol=0, atol=0)
    assert c.values.data_ptr() == b.values.data_ptr()  # in place: the same table


@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("per_seq", [False, True])
def test_inplace_fused_windows_match_the_reference_float64(window_step_calls, score, per_seq):
    """In-place streaming on CPU runs its writing windows as single window_step calls: in float64
    against fwpkm_ext.reference (the literal SPEC), the read, the final keys and the final values,
    from random tables and tokens (several heads, a lookahead, a mask with zeros, a flushed
    partial window); the fused path was taken."""
    from fwpkm_ext import recurrence
    from fwpkm_ext.reference import fwpkm_memory_reference
    calls = window_step_calls
    gen = torch.Generator().manual_seed(17)
    B, T, H, n, dk, dv, k, C, la = 2, 23, 2, 8, 8, 6, 3, 5, 1
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=n, key_dim=dk, value_dim=dv, heads=H, topk=k, chunk_size=C,
                                 lookahead=la, lr=0.7, score=score)
    S = B if per_seq else 1
    keys = torch.rand(S, H, 2, n, dk // 2, generator=gen, dtype=torch.float64) * 2 - 1
    values = torch.randn(S, n * n, dv, generator=gen, dtype=torch.float64)
    q = torch.randn(B, T, H, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, dv, generator=gen, dtype=torch.float64)
    g = torch.rand(B, T, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=gen) > 0.2).to(torch.float64)
    want, nk, nv = fwpkm_memory_reference(q, v, g, keys if per_seq else keys[0],
                                          values if per_seq else values[0], topk=k, chunk_size=C,
                                          lookahead=la, lr=0.7, mask=mask, score=score)
    st = fwpkm_ext.MemoryState(config=cfg, keys=keys.clone(), values=values.clone(), per_sequence=per_seq)
    with torch.no_grad():
        got, st = fwpkm_ext.memory_step(q, v, g, st, mask=mask, flush=True, inplace=True)
    assert calls["n"] > 0 and recurrence.FUSED_WINDOWS
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(st.keys, nk.reshape(st.keys.shape), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(st.values, nv.reshape(st.values.shape), rtol=1e-9, atol=1e-10)
