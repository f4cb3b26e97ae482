"""Inputs that must never reach the tables (SPEC), all-or-nothing calls and empty inputs:
non-finite q/v/g either raise before anything is written or are skipped like mask = 0 (checked
against the reference in float64, gradients included), a call that fails midway leaves an
in-place state as it was, an update that overflows is refused, and T = 0 / B = 0 / k = n / one
slot work everywhere in the public API.
"""
import dataclasses
import math

import pytest
import torch

import fwpkm_ext
from fwpkm_ext import FwPKM, PKM, MemoryState, _native, flush_state, fwpkm_memory, memory_read, memory_step, recurrence
from fwpkm_ext.reference import fwpkm_memory_reference

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(n_subkeys=8, mem_k_dim=8, mem_v_dim=8, topk=2, chunk_size=4)
    opts.update(kw)
    return FwPKM(16, **opts).eval()


def _tables(state):
    return state.keys.clone(), state.values.clone()


def _same_tables(state, tables):
    return torch.equal(state.keys, tables[0]) and torch.equal(state.values, tables[1])


def _tokens(seed, B, T, H=1, dk=8, dv=8, dtype=F64):
    g = _gen(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    v = torch.randn(B, T, dv, generator=g, dtype=dtype)
    gt = torch.sigmoid(torch.randn(B, T, generator=g, dtype=dtype))
    return q, v, gt


def _state(seed, B=None, n=8, H=1, dk=8, dv=8, topk=2, C=4, la=1, dtype=F64, lr=0.5):
    g = _gen(seed)
    S = 1 if B is None else B
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=n, key_dim=dk, value_dim=dv, heads=H, topk=topk,
                                 chunk_size=C, lookahead=la, lr=lr)
    keys = (torch.rand(S, H, 2, n, dk // 2, generator=g, dtype=dtype) * 2 - 1)
    values = torch.randn(S, n * n, dv, generator=g, dtype=dtype) / math.sqrt(dv)
    return MemoryState(config=cfg, keys=keys, values=values, per_sequence=B is not None)


# ------------------------------------------------------------------------------------------------
# the reproduction: one NaN in x


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_bad_feature_raises_and_leaves_the_state(inplace, bad):
    layer = _layer()
    state = layer.init_state(batch_size=2)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        _, state = layer(x, state, flush=False, inplace=inplace)
        before = _tables(state)
        pending = state.pending_q.clone()
        xb = torch.randn(2, 7, 16)
        xb[1, 3, 5] = bad
        with pytest.raises(ValueError, match=r"^(q|v|g): .*batch 1, token 3"):
            layer(xb, state, flush=False, inplace=inplace)
        assert _same_tables(state, before) and torch.equal(state.pending_q, pending)
        # the memory goes on as if the bad call never happened
        y, state = layer(torch.randn(2, 5, 16), state, flush=True, inplace=inplace)
    assert torch.isfinite(y).all() and torch.isfinite(state.keys).all() and torch.isfinite(state.values).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_skip_keeps_the_memory_finite_and_counts(inplace):
    layer = _layer(nonfinite="skip")
    state = layer.init_state(batch_size=2)
    x = torch.randn(2, 13, 16)
    x[0, 5, 2] = float("nan")
    x[1, 9, 0] = float("-inf")
    with torch.no_grad():
        y, state = layer(x, state, flush=False, inplace=inplace)
        y2, state = layer(torch.randn(2, 9, 16), state, flush=True, inplace=inplace)
    assert torch.isfinite(state.keys).all() and torch.isfinite(state.values).all()
    assert torch.isfinite(y2).all()
    bad = ~torch.isfinite(y).all(-1)
    assert bad[0, 5] and bad[1, 9] and int(bad.sum()) == 2  # only the bad tokens' own outputs
    assert state.extras["nonfinite_skipped"] == 2.0


def test_nonfinite_argument_is_checked():
    layer = _layer()
    with pytest.raises(ValueError, match="^nonfinite"):
        layer(torch.randn(1, 4, 16), layer.init_state(), nonfinite="ignore")
    with pytest.raises(ValueError, match="^nonfinite"):
        FwPKM(16, n_subkeys=4, mem_k_dim=4, mem_v_dim=4, topk=2, nonfinite="zero")


@pytest.mark.parametrize("name", ["q", "v", "g"])
def test_functional_raises_naming_the_argument(name):
    q, v, g = _tokens(0, 2, 9)
    st = _state(1)
    bad = {"q": q, "v": v, "g": g}[name].clone()
    bad.view(2, 9, -1)[1, 4, 0] = float("nan")
    args = dict(q=q, v=v, g=g)
    args[name] = bad
    with pytest.raises(ValueError, match=rf"^{name}: .*batch 1, token 4"):
        fwpkm_memory(args["q"], args["v"], args["g"], st.keys[0], st.values[0], topk=2, chunk_size=4)
    for backend in ("reference",):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            fwpkm_memory(args["q"], args["v"], args["g"], st.keys[0], st.values[0], topk=2,
                         chunk_size=4, backend=backend)


def test_too_large_values_are_refused_like_non_finite():
    q, v, g = _tokens(0, 1, 8)
    q[0, 2, 0, 1] = 1e30
    st = _state(1)
    with pytest.raises(ValueError, match=r"^q: a value beyond"):
        memory_step(q, v, g, st)


def test_nan_mask_is_refused():
    q, v, g = _tokens(0, 1, 8)
    mask = torch.ones(1, 8, dtype=F64)
    mask[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^mask: "):
        memory_step(q, v, g, _state(1), mask=mask)


# ------------------------------------------------------------------------------------------------
# skip == the reference with those tokens masked out of the write and the addressing loss


def _skip_reference(q, v, g, keys, values, bad_q, bad_v, bad_g, la, **cfg):
    """What nonfinite='skip' must compute, written with the reference: bad entries zeroed,
    bad tokens mask 0 and out of the addressing marginal, writers of bad targets mask 0."""
    B, T = g.shape
    bad = bad_q | bad_v | bad_g
    zq = torch.where(bad_q.view(B, T, 1, 1), torch.zeros_like(q), q)
    zv = torch.where(bad_v.view(B, T, 1), torch.zeros_like(v), v)
    zg = torch.where(bad_g, torch.zeros_like(g), g)
    mask = (~bad).to(q.dtype)
    if la < T:
        mask[:, : T - la] = mask[:, : T - la] * (~bad_v[:, la:]).to(q.dtype)
    return fwpkm_memory_reference(zq, zv, zg, keys, values, mask=mask, addr_mask=(~bad).to(q.dtype),
                                  lookahead=la, **cfg)


@pytest.mark.parametrize("per_seq", [False, True])
@pytest.mark.parametrize("la", [0, 1, 2])
def test_skip_matches_the_reference(per_seq, la):
    B, T, C = 2, 11, 4
    q, v, g = _tokens(3, B, T, H=2)
    st = _state(4, B if per_seq else None, H=2, C=C, la=la)
    bad_q = torch.zeros(B, T, dtype=torch.bool)
    bad_v = torch.zeros(B, T, dtype=torch.bool)
    bad_g = torch.zeros(B, T, dtype=torch.bool)
    bad_q[0, 2] = True
    bad_v[1, 5] = True
    bad_v[0, 8] = True
    bad_g[1, 9] = True
    qb, vb, gb = q.clone(), v.clone(), g.clone()
    qb[0, 2, 1, 3] = float("nan")
    vb[1, 5, 0] = float("inf")
    vb[0, 8, 7] = float("nan")
    gb[1, 9] = float("nan")
    vh, new = memory_step(qb, vb, gb, st, nonfinite="skip")
    keys = st.keys if per_seq else st.keys[0]
    values = st.values if per_seq else st.values[0]
    rv, rk, rvals = _skip_reference(q, v, g, keys, values, bad_q, bad_v, bad_g, la, topk=2,
                                    chunk_size=C, lr=0.5)
    assert new.extras["nonfinite_skipped"] == 4.0
    torch.testing.assert_close(vh, rv, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(new.keys.reshape(rk.shape), rk, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(new.values.reshape(rvals.shape), rvals, rtol=1e-8, atol=1e-10)


def test_skip_gradients_match_the_reference():
    B, T, C, la = 2, 9, 4, 1
    q, v, g = _tokens(5, B, T, H=1)
    st = _state(6, None, C=C, la=la)
    bad_q = torch.zeros(B, T, dtype=torch.bool)
    bad_v = torch.zeros(B, T, dtype=torch.bool)
    bad_q[1, 3] = True
    bad_v[0, 6] = True
    none = torch.zeros(B, T, dtype=torch.bool)
    cot = torch.randn(B, T, 8, generator=_gen(7), dtype=F64)

    def native(q, v, g, keys, values):
        qb, vb = q.clone(), v.clone()
        qb = torch.where(bad_q.view(B, T, 1, 1), torch.full_like(qb, float("nan")), qb)
        vb = torch.where(bad_v.view(B, T, 1), torch.full_like(vb, float("nan")), vb)
        s = MemoryState(config=st.config, keys=keys.unsqueeze(0), values=values.unsqueeze(0),
                        per_sequence=False)
        vh, new = memory_step(qb, vb, g, s, nonfinite="skip")
        return (vh * cot).sum() + new.keys.sum() * 0.3 + (new.values ** 2).sum() * 0.1

    def ref(q, v, g, keys, values):
        vh, nk, nv = _skip_reference(q, v, g, keys, values, bad_q, bad_v, none, la, topk=2,
                                     chunk_size=C, lr=0.5)
        return (vh * cot).sum() + nk.sum() * 0.3 + (nv ** 2).sum() * 0.1

    grads = []
    for fn in (native, ref):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, v, g, st.keys[0], st.values[0])]
        grads.append(torch.autograd.grad(fn(*leaves), leaves))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_skip_streams_in_any_split():
    B, T = 2, 14
    q, v, g = _tokens(8, B, T)
    q[0, 4, 0, 0] = float("nan")
    v[1, 6, 2] = float("inf")  # its writer (token 5) is in another piece below
    st = _state(9, B, C=4)
    one_vh, one = memory_step(q, v, g, st, nonfinite="skip")
    cur, outs = st, []
    for a, b in ((0, 3), (3, 6), (6, 7), (7, 14)):
        vh, cur = memory_step(q[:, a:b], v[:, a:b], g[:, a:b], cur, flush=False, nonfinite="skip")
        outs.append(vh)
    cur = flush_state(cur)
    torch.testing.assert_close(torch.cat(outs, 1), one_vh, rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(cur.keys, one.keys, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cur.values, one.values, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# all or nothing


@pytest.mark.parametrize("n,T", [(8, 96), (64, 40)])
@pytest.mark.parametrize("inplace", [False, True])
def test_calls_leave_the_row_map_unset(monkeypatch, n, T, inplace):
    """TouchedRows.release resets the per-thread row map after every call, also after a failure:
    by one fill when the call touched many of the table's rows (n = 8: most of 64), by the touched
    entries otherwise (n = 64: a few hundred of 4096). A map entry left set would make the next
    call on the thread read a row from a stale compact id."""
    g = torch.Generator().manual_seed(n + T)
    H, k, dk, dv = 1, 4, 8, 6
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=n, key_dim=dk, value_dim=dv, heads=H, topk=k, chunk_size=16)
    keys = torch.rand(1, H, 2, n, dk // 2, generator=g) - 0.5
    values = torch.randn(1, n * n, dv, generator=g)
    st = MemoryState(config=cfg, keys=keys, values=values, per_sequence=True)
    q, v, gate = torch.randn(1, T, H, dk, generator=g), torch.randn(1, T, dv, generator=g), torch.rand(1, T, generator=g)
    seen = []
    real = recurrence.TouchedRows.release

    def release(self):
        seen.append(self.U * 16 >= self.slot.numel())
        real(self)
        assert bool((self.slot == -1).all()), "map entries left set"
    monkeypatch.setattr(recurrence.TouchedRows, "release", release)
    with torch.no_grad():
        memory_step(q, v, gate, MemoryState(config=cfg, keys=keys.clone(), values=values.clone(),
                                            per_sequence=True), inplace=inplace)
        bad = q.clone()
        bad[0, T - 3] = float("nan")
        with pytest.raises(ValueError):  # the checks raise before the map is used, or after it
            memory_step(bad, v, gate, st, inplace=inplace)
        monkeypatch.setattr(recurrence, "_commit_check", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("late")))
        with pytest.raises(RuntimeError, match="late"):
            memory_step(q, v, gate, st, inplace=inplace)
    assert len(seen) == 2 and all(s == (n == 8) for s in seen), seen  # both paths of release


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("where", ["value write", "value write returned", "key update", "fused window"])
def test_failure_inside_a_call_leaves_the_state(monkeypatch, inplace, where):
    """A failure in the third window (its value write, or its key update after its values were
    written), two windows in: the state is as before the call, in place or not, and a call on it
    afterwards gives what the same call gives on an untouched copy. The in-place CPU value write
    is scatter_rows_logged (the undo log) on the op-by-op path; "value write returned": it fails
    after the native write returned, before its new row count was assigned (where a
    KeyboardInterrupt can land); "fused window": an in-place window run as one window_step call
    fails after it returned (its rows written and logged)."""
    if where == "fused window" and not inplace:
        pytest.skip("window_step runs in-place calls only")
    q, v, g = _tokens(10, 2, 13)
    st = _state(11, 2, C=4)
    twin = _state(11, 2, C=4)
    before = _tables(st)
    after = False
    if where == "key update":
        owner, name = recurrence.Window, "updated_keys"
    elif where.startswith("value write"):
        owner, name = _native, ("scatter_rows_logged" if inplace else "scatter_rows")
        after = where == "value write returned"
    else:
        owner, name, after = _native, "window_step", True
    if where != "fused window":
        monkeypatch.setattr(recurrence, "FUSED_WINDOWS", False)
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            if after:
                real(*a, **k)
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(owner, name, failing)
    with torch.no_grad(), pytest.raises(RuntimeError, match="injected"):
        memory_step(q, v, g, st, inplace=inplace)
    assert calls["n"] == 3
    assert _same_tables(st, before)
    monkeypatch.setattr(owner, name, real)
    with torch.no_grad():
        vh, new = memory_step(q, v, g, st, inplace=inplace)
        vh_twin, new_twin = memory_step(q, v, g, twin, inplace=inplace)
    assert not _same_tables(new, before)
    assert torch.equal(vh, vh_twin) and _same_tables(new, _tables(new_twin))


@pytest.mark.parametrize("inplace", [False, True])
def test_overflowing_update_is_refused(inplace):
    q, v, g = _tokens(12, 1, 16, dtype=torch.float32)
    st = _state(13, None, C=4, dtype=torch.float32, lr=1e30)
    before = _tables(st)
    with torch.no_grad(), pytest.raises(ValueError, match=r"^lr: .*overflowed"):
        memory_step(q * 1e6, v * 1e6, g, st, inplace=inplace)
    assert _same_tables(st, before)


@pytest.mark.parametrize("inplace", [False, True])
def test_value_overflow_alone_is_refused(window_step_calls, inplace):
    """Values that overflow while the keys stay finite (no addressing loss: the key step adds
    zeros) are refused too, the table left as it was. 4,096 slots and 8 pairs a window: nearly
    every row written is read by one pair alone, so this is the count the in-place windows take
    while the row is in cache (window_step's read_write_rows), not the shared rows' scatter."""
    q, v, g = _tokens(18, 1, 16, dtype=torch.float32)
    st = _state(19, None, n=64, C=4, dtype=torch.float32, lr=1e35)
    st = st.with_(config=dataclasses.replace(st.config, addr_loss_weight=0.0))
    before = _tables(st)
    with torch.no_grad(), pytest.raises(ValueError, match=r"^lr: .*overflowed"):
        memory_step(q, v * 1e6, g, st, inplace=inplace)
    assert _same_tables(st, before)
    assert (window_step_calls["n"] > 0) == inplace


# ------------------------------------------------------------------------------------------------
# empty and degenerate inputs


def test_empty_inputs_everywhere():
    q, v, g = _tokens(14, 2, 0)
    st = _state(15, 2)
    before = _tables(st)
    vh, new = memory_step(q, v, g, st)
    assert vh.shape == (2, 0, 8) and new is st and _same_tables(st, before)
    with torch.no_grad():
        vh, new = memory_step(q, v, g, st, inplace=True)
    assert vh.shape == (2, 0, 8) and _same_tables(st, before)
    vh, nk, nv = fwpkm_memory(q, v, g, st.keys[0], st.values[0], topk=2, chunk_size=4)
    assert vh.shape == (2, 0, 8) and torch.equal(nk, st.keys[0]) and torch.equal(nv, st.values[0])
    assert memory_read(q, st).shape == (2, 0, 8)
    idx, sc, hidx, hsc = fwpkm_ext.product_key_topk(q, st.keys[0], 2)
    assert idx.shape == (2, 0, 1, 2) and hsc.shape == (2, 0, 1, 2, 2)
    out = fwpkm_ext.gather(st.values[0], torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=F64))
    assert out.shape == (0, 8)
    # B = 0 with a shared memory
    q0, v0, g0 = _tokens(14, 0, 5)
    vh, nk, nv = fwpkm_memory(q0, v0, g0, st.keys[0], st.values[0], topk=2, chunk_size=4)
    assert vh.shape == (0, 5, 8) and torch.equal(nv, st.values[0])
    # the layers
    layer = _layer()
    y, s = layer(torch.randn(1, 0, 16), layer.init_state(batch_size=1))
    assert y.shape == (1, 0, 16)
    pkm = PKM(16, n_subkeys=4, k_dim=8, heads=2, topk=2)
    assert pkm(torch.randn(3, 0, 16)).shape == (3, 0, 16)


def test_empty_input_with_gradients():
    q, v, g = (t.requires_grad_(True) for t in _tokens(16, 2, 0))
    st = _state(17)
    keys = st.keys[0].clone().requires_grad_(True)
    vh, nk, nv = fwpkm_memory(q, v, g, keys, st.values[0], topk=2, chunk_size=4)
    (vh.sum() + nk.sum()).backward()
    assert keys.grad is not None and torch.equal(keys.grad, torch.ones_like(keys))


@pytest.mark.parametrize("n,topk", [(1, 1), (3, 3), (5, 5)])
def test_one_slot_and_k_equal_n(n, topk):
    q, v, g = _tokens(18, 2, 7)
    st = _state(19, 2, n=n, topk=topk, C=3)
    vh, new = memory_step(q, v, g, st)
    keys, values = st.keys, st.values
    rv, rk, rvals = fwpkm_memory_reference(q, v, g, keys, values, topk=topk, chunk_size=3, lr=0.5)
    torch.testing.assert_close(vh, rv, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(new.values, rvals, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(new.keys, rk, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="^topk"):
        fwpkm_memory(q, v, g, keys, values, topk=n + 1, chunk_size=3)


def test_product_key_topk_refuses_nan_queries():
    q, _, _ = _tokens(20, 1, 4)
    q[0, 1, 0, 0] = float("nan")
    st = _state(21)
    with pytest.raises(ValueError, match=r"^q: .*token 1"):
        fwpkm_ext.product_key_topk(q, st.keys[0], 2)


@pytest.mark.parametrize("kind", ["idw", "dot"])
def test_cpu_topk_ranks_nan_last_by_index(kind):
    """The kernel's order is total with NaN (below every number, among themselves by index),
    the same rule as the CUDA kernel's ranks_before."""
    n, k = 6, 6
    dots = torch.tensor([0.5, float("nan"), 2.0, float("nan"), -1.0, 0.1], dtype=F64).view(1, 1, 1, n)
    dots = dots.expand(1, 1, 2, n).contiguous()
    qn = torch.zeros(1, 1, 2, dtype=F64) + 5.0
    kn = torch.zeros(1, 1, 2, n, dtype=F64) + 5.0
    idx = torch.empty(1, 1, k, dtype=torch.long)
    score = torch.empty(1, 1, k, dtype=F64)
    hidx = torch.empty(1, 1, 2, k, dtype=torch.long)
    hsc = torch.empty(1, 1, 2, k, dtype=F64)
    _native.topk_select(dots, qn if kind == "idw" else None, kn if kind == "idw" else None, k, 1,
                        kind, 1e-3, idx, score, hidx, hsc)
    assert hidx[0, 0, 0].tolist() == [2, 0, 5, 4, 1, 3]
    assert torch.isnan(hsc[0, 0, 0, 4:]).all() and torch.isfinite(hsc[0, 0, 0, :4]).all()


def test_return_state_false_builds_no_table():
    layer = _layer()
    x = torch.randn(2, 9, 16, requires_grad=True)
    y1, st = layer(x)
    y2, none = layer(x, return_state=False)
    assert none is None and st is not None
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    g1, = torch.autograd.grad(y1.sum(), x)
    g2, = torch.autograd.grad(y2.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
