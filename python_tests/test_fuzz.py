"""Property-based fuzz of the public API (hypothesis): shapes, dtypes, strides, non-contiguous
views, value ranges (NaN, Inf, 1e30, denormals) and invalid arguments.

Every call must either succeed, with finite outputs (and a finite state) when its inputs are
finite, or raise TypeError/ValueError whose message starts with the name of an argument. A crash,
a hang or any other exception type fails. The runs are derandomized (the same cases on every CI
run); the total number of cases is printed by `test_case_count` at the end of the module.
"""
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fwpkm_ext
from fwpkm_ext import FwPKM, PKM, MemoryConfig, MemoryState

pytestmark = pytest.mark.usefixtures("one_thread")

NAMED = re.compile(r"^[A-Za-z_][A-Za-z_0-9\[\]\.]*: ")
CASES = {"n": 0, "ok": 0, "refused": 0}
import collections
WHY = collections.Counter()
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1e-40, 0.0]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _named_error(exc: BaseException) -> None:
    """The only acceptable failure: TypeError/ValueError naming an argument."""
    CASES["refused"] += 1
    WHY[str(exc)[:50]] += 1
    if not isinstance(exc, (TypeError, ValueError)):
        raise AssertionError(f"unexpected {type(exc).__name__}: {exc}") from exc
    if not NAMED.match(str(exc)):
        raise AssertionError(f"{type(exc).__name__} does not name an argument: {exc!r}") from exc


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t.float() if t.is_floating_point() else t).all()) for t in ts
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def _in_range(*ts) -> bool:
    """Finite and within the limit the memory accepts (|x| <= 1e15)."""
    return all(_finite(t) and (t.numel() == 0 or float(t.abs().max()) <= 1e15) for t in ts
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@st.composite
def tensors(draw, shape, dtype_choices=FLOATS, allow_special=True, scale=1.0):
    """A tensor of `shape` (maybe a non-contiguous view), maybe holding special values."""
    dtype = draw(st.sampled_from(dtype_choices))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    if layout == "strided" and len(shape) >= 1:
        big = list(shape)
        big[-1] = big[-1] * 2
        t = (torch.randn(big, generator=g, dtype=torch.float64) * scale)[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:
        t = (torch.randn(list(shape[:-2]) + [shape[-1], shape[-2]], generator=g,
                         dtype=torch.float64) * scale).transpose(-1, -2)
    else:
        t = torch.randn(list(shape), generator=g, dtype=torch.float64) * scale
    if dtype.is_floating_point:
        t = t.to(dtype)
    else:
        t = (t * 3).to(dtype)
    if allow_special and t.numel() and t.is_floating_point() and draw(st.integers(0, 4)) == 0:
        n_bad = draw(st.integers(1, 3))
        flat_pos = [draw(st.integers(0, t.numel() - 1)) for _ in range(n_bad)]
        t = t.clone()
        view = t.view(-1) if t.is_contiguous() else None
        for p in flat_pos:
            val = draw(st.sampled_from(SPECIALS))
            idx = []
            rem = p
            for s in reversed(t.shape):
                idx.append(rem % s)
                rem //= s
            if view is not None:
                view[p] = val
            else:
                t[tuple(reversed(idx))] = val
    return t


@st.composite
def memory_case(draw, per_seq=None):
    B = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
    T = draw(st.sampled_from([0] + list(range(1, 10)) * 2))
    H = draw(st.integers(1, 2))
    dk = draw(st.sampled_from([2, 4, 6]))
    n = draw(st.integers(1, 4))
    dv = draw(st.integers(1, 5))
    if per_seq is None:
        per_seq = draw(st.booleans())
    fast = draw(st.sampled_from([torch.float32, torch.float64, torch.float32, torch.float16]))
    q = draw(tensors((B, T, H, dk), FLOATS * 3 + [torch.int64]))
    v = draw(tensors((B, T, dv)))
    g = draw(tensors((B, T)))
    S = B if per_seq else 1
    keys = draw(tensors((S, H, 2, n, dk // 2), [fast], allow_special=draw(st.integers(0, 9)) == 0))
    values = draw(tensors((S, n * n, dv), [fast], allow_special=draw(st.integers(0, 9)) == 0))
    if not per_seq:
        keys, values = keys[0], values[0]
    mask = None
    if draw(st.booleans()):
        mask = draw(tensors((B, T), [torch.float32, torch.float64, torch.bool, torch.int64]))
    # mostly valid configurations; sometimes exactly one argument is invalid
    bad = draw(st.sampled_from([None] * 10 + ["topk", "chunk_size", "lookahead", "lr", "score",
                                              "addr_loss_weight", "wreck", "wreck"]))
    cfg = dict(topk=draw(st.integers(1, n)), chunk_size=draw(st.integers(1, 6)),
               lookahead=draw(st.integers(0, 3)),
               lr=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0, 1e3])),
               addr_loss_weight=draw(st.sampled_from([0.0, 1.0, 5.0])),
               score=draw(st.sampled_from(["idw", "dot"])))
    if bad in ("topk", "chunk_size", "lookahead"):
        cfg[bad] = draw(st.sampled_from([-1, 0, n + 1, 2.0, True, None] if bad == "topk" else [-1, 0, 1.5, None]))
        if bad == "lookahead" and cfg[bad] == 0:
            cfg[bad] = -2
    elif bad in ("lr", "addr_loss_weight"):
        cfg[bad] = draw(st.sampled_from([float("nan"), float("inf"), "1", None]))
    elif bad == "score":
        cfg[bad] = draw(st.sampled_from(["cos", "", None, 1]))
    args = dict(q=q, v=v, g=g, keys=keys, values=values, mask=mask)
    if bad == "wreck":  # a wrong shape or type for one tensor argument
        name = draw(st.sampled_from(["q", "v", "g", "keys", "values", "mask"]))
        kind = draw(st.sampled_from(["shape", "type", "dims"]))
        t = args[name]
        if kind == "type" or not isinstance(t, torch.Tensor):
            args[name] = draw(st.sampled_from([3, "x", [1.0]] + ([None] if name != "mask" else [])))
        elif kind == "dims":
            args[name] = t.unsqueeze(0)
        else:
            args[name] = t[..., :0] if t.dim() and t.shape[-1] else torch.zeros(list(t.shape[:-1]) + [2])
    return args, cfg


def _step_ok(args, cfg):
    """The inputs the call should accept and the config it would refuse."""
    return _in_range(args["q"], args["v"], args["g"]) and (
        args["mask"] is None or _finite(args["mask"]))


@settings(max_examples=700, **SETTINGS)
@given(memory_case())
def test_fuzz_fwpkm_memory(case):
    CASES["n"] += 1
    args, cfg = case
    keys, values = args["keys"], args["values"]
    k0 = keys.clone() if isinstance(keys, torch.Tensor) else None
    v0 = values.clone() if isinstance(values, torch.Tensor) else None
    try:
        out = fwpkm_ext.fwpkm_memory(args["q"], args["v"], args["g"], keys, values, mask=args["mask"], **cfg)
    except Exception as exc:  # noqa: BLE001 - the property is about the exception type
        _named_error(exc)
        out = None
    # inputs are never modified
    if k0 is not None:
        assert torch.equal(keys, k0) or (torch.isnan(k0).any() and torch.equal(keys.isnan(), k0.isnan()))
    if v0 is not None:
        assert torch.equal(values, v0) or (torch.isnan(v0).any() and torch.equal(values.isnan(), v0.isnan()))
    if out is not None:
        CASES["ok"] += 1
        vhat, nk, nv = out
        if _in_range(args["q"], args["v"], args["g"], keys, values):
            assert _finite(vhat, nk, nv), "finite inputs gave non-finite outputs"


@st.composite
def stream_case(draw):
    args, cfg = draw(memory_case(per_seq=draw(st.booleans())))
    pieces = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    inplace = draw(st.booleans())
    nonfinite = draw(st.sampled_from(["raise", "skip"] * 4 + ["drop"]))
    flush = draw(st.sampled_from([True, False, None]))
    return args, cfg, pieces, inplace, nonfinite, flush


def _state_for(keys, values, cfg, H, dk, dv):
    per_seq = keys.dim() == 5
    n = keys.shape[-2]
    mc = MemoryConfig(n_subkeys=n, key_dim=dk, value_dim=dv, heads=H, topk=cfg["topk"],
                      chunk_size=cfg["chunk_size"], lookahead=cfg["lookahead"], lr=cfg["lr"],
                      addr_loss_weight=cfg["addr_loss_weight"], score=cfg["score"])
    k5 = keys if per_seq else keys.unsqueeze(0)
    v3 = values if per_seq else values.unsqueeze(0)
    return MemoryState(config=mc, keys=k5.contiguous(), values=v3.contiguous(), per_sequence=per_seq)


@settings(max_examples=700, **SETTINGS)
@given(stream_case())
def test_fuzz_memory_step(case):
    CASES["n"] += 1
    args, cfg, pieces, inplace, nonfinite, flush = case
    q, v, g, keys, values, mask = (args[k] for k in ("q", "v", "g", "keys", "values", "mask"))
    if not all(isinstance(t, torch.Tensor) for t in (q, keys, values)) or q.dim() != 4 \
            or keys.dim() not in (4, 5) or keys.dtype not in (torch.float32, torch.float64):
        return  # a state cannot be built from these; the functional fuzz covers them
    if not (_finite(keys, values)):
        return  # states with non-finite tables are refused on load; users cannot build them here
    try:
        state = _state_for(keys, values, cfg, q.shape[2], q.shape[3], values.shape[-1])
    except Exception as exc:  # noqa: BLE001
        _named_error(exc)
        return
    pos = 0
    T = q.shape[1]
    cuts = []
    for p in pieces:
        cuts.append((pos, min(T, pos + p)))
        pos = min(T, pos + p)
    cuts.append((pos, T))
    with torch.no_grad():
        for i, (a, b) in enumerate(cuts):
            last = i == len(cuts) - 1
            before = (state.keys.clone(), state.values.clone())
            sl = lambda t: t[:, a:b] if isinstance(t, torch.Tensor) and t.dim() >= 2 else t  # noqa: E731
            try:
                vh, new = fwpkm_ext.memory_step(sl(q), sl(v), sl(g), state, mask=sl(mask),
                                                flush=bool(flush) if last and flush is not None else False,
                                                inplace=inplace, nonfinite=nonfinite)
            except Exception as exc:  # noqa: BLE001
                _named_error(exc)
                # all or nothing: the state is as it was
                assert torch.equal(state.keys, before[0]) and torch.equal(state.values, before[1])
                continue
            assert torch.isfinite(new.keys).all() and torch.isfinite(new.values).all()
            CASES["ok"] += 1
            state = new
            if _in_range(sl(q), sl(v), sl(g)):
                assert _finite(vh)
        try:
            state = fwpkm_ext.flush_state(state, inplace=inplace)
        except Exception as exc:  # noqa: BLE001
            _named_error(exc)
        assert torch.isfinite(state.keys).all() and torch.isfinite(state.values).all()
        rq = q[:, :3]
        try:
            out = fwpkm_ext.memory_read(rq, state)
            if _in_range(rq):
                assert _finite(out)
        except Exception as exc:  # noqa: BLE001
            _named_error(exc)


@settings(max_examples=400, **SETTINGS)
@given(memory_case(), st.integers(0, 4), st.integers(-1, 1), st.booleans())
def test_fuzz_product_key_topk_and_gather(case, L, off, transposed):
    CASES["n"] += 1
    args, cfg = case
    q, keys, values = args["q"], args["keys"], args["values"]
    try:
        idx, sc, hidx, hsc = fwpkm_ext.product_key_topk(q, keys, cfg["topk"], score=cfg["score"])
        n = keys.shape[-2]
        assert idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n * n)
        if _in_range(q, keys):
            assert _finite(sc, hsc)
    except Exception as exc:  # noqa: BLE001
        _named_error(exc)
    # gather: rows partly out of range (off), weights maybe a non-contiguous view
    if isinstance(values, torch.Tensor) and values.dim() == 2 and isinstance(q, torch.Tensor) and q.dim() == 4:
        M = q.shape[0] * q.shape[1]
        g = torch.Generator().manual_seed(M * 31 + L)
        R = values.shape[0]
        rows = torch.randint(min(0, off), R + max(0, off), (M, L), generator=g)
        w = torch.randn(L, M, generator=g, dtype=values.dtype).t() if transposed else \
            torch.randn(M, L, generator=g, dtype=values.dtype)
        try:
            out = fwpkm_ext.gather(values, rows, w)
            if _in_range(values):
                assert _finite(out)
        except Exception as exc:  # noqa: BLE001
            _named_error(exc)


@st.composite
def layer_case(draw):
    dim = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["fwpkm", "fwpkm", "pkm"]))
    B = draw(st.integers(0, 2))
    T = draw(st.integers(0, 7))
    x = draw(tensors((B, T, draw(st.sampled_from([dim, dim, dim + 1]))),
                     [torch.float32, torch.float64, torch.bfloat16, torch.int64]))
    opts = dict(n_subkeys=draw(st.integers(0, 4)), heads=draw(st.integers(1, 2)),
                topk=draw(st.integers(0, 3)))
    extra = dict(chunk_size=draw(st.integers(0, 4)), nonfinite=draw(st.sampled_from(["raise", "skip"])),
                 query_norm=draw(st.sampled_from(["none", "batch", "zscore", "l2"])))
    stateful = draw(st.booleans())
    return kind, dim, x, opts, extra, stateful, draw(st.booleans())


@settings(max_examples=500, **SETTINGS)
@given(layer_case())
def test_fuzz_layers(case):
    CASES["n"] += 1
    kind, dim, x, opts, extra, stateful, train = case
    torch.manual_seed(0)
    try:
        if kind == "pkm":
            layer = PKM(dim, k_dim=4, v_dim=3, **opts)
        else:
            layer = FwPKM(dim, mem_k_dim=4, mem_v_dim=3, **opts, **extra)
    except Exception as exc:  # noqa: BLE001
        _named_error(exc)
        return
    layer.train(train)
    try:
        if kind == "pkm":
            y = layer(x)
        elif stateful:
            state = layer.init_state(batch_size=max(1, x.shape[0]) if x.dim() == 3 else 1)
            before = (state.keys.clone(), state.values.clone())
            try:
                with torch.no_grad():
                    y, new = layer(x, state, flush=False, inplace=True)
            except Exception:
                assert torch.equal(state.keys, before[0]) and torch.equal(state.values, before[1])
                raise
            assert torch.isfinite(new.keys).all() and torch.isfinite(new.values).all()
        else:
            y, _ = layer(x)
            if x.numel():
                y.float().sum().backward()
    except Exception as exc:  # noqa: BLE001
        _named_error(exc)
        return
    if _in_range(x) and x.is_floating_point():
        assert _finite(y)


def test_case_count():
    """Runs last in this module: the number of drawn cases (>= 2,000 required per CI run)."""
    print(f"\nfuzz cases drawn: {CASES['n']} (calls that succeeded: {CASES['ok']}, refused with a named error: {CASES['refused']})")
    print(WHY.most_common(15))
    assert CASES["n"] >= 2000 or CASES["n"] == 0
