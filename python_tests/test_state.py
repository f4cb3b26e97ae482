"""Tests of fwpkm_ext.state.MemoryState: save/load round trip (pending tokens included), rejection
of bad files with a ValueError, detach() and to(device)."""
import math

import pytest
import torch

from fwpkm_ext import FwPKM, MemoryState
from fwpkm_ext.state import STATE_VERSION
from state_asserts import assert_same_state

DT = torch.float64


def _layer(seed=0, n=4, topk=2, C=4, heads=1, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return FwPKM(8, n_subkeys=n, mem_k_dim=6, mem_v_dim=5, heads=heads, topk=topk, chunk_size=C,
                 **kw).to(dtype)


def _x(B, T, seed=1, dtype=torch.float32):
    return torch.randn(B, T, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mid_window_state(layer, batch=None, B=2, T=6, seed=1):
    """A state after T tokens (one window written, T % C tokens pending)."""
    with torch.no_grad():
        _, st = layer(_x(B, T, seed=seed, dtype=layer.to_q.weight.dtype), layer.init_state(batch),
                      flush=False)
    assert st.pending == T % layer.config.chunk_size
    return st




# ------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_save_load_roundtrip_continues_stream(tmp_path, batch, dtype):
    layer = _layer(heads=2, dtype=dtype)
    B = 2
    st = _mid_window_state(layer, batch, B=B, T=7)  # 3 tokens pending
    assert st.pending == 3
    path = tmp_path / "state.pt"
    st.save(path)
    loaded = layer.load_state(path)
    assert_same_state(loaded, st)
    assert loaded.telemetry() == st.telemetry()
    # continuing from the loaded state == continuing from the in-memory one, bit for bit
    x2 = _x(B, 9, seed=2, dtype=dtype)
    with torch.no_grad():
        y_mem, s_mem = layer(x2[:, :4], st, flush=False)
        y_mem2, s_mem = layer(x2[:, 4:], s_mem, flush=True)
        y_ld, s_ld = layer(x2[:, :4], loaded, flush=False)
        y_ld2, s_ld2 = layer(x2[:, 4:], s_ld, flush=True)
    assert torch.equal(y_mem, y_ld) and torch.equal(y_mem2, y_ld2)
    assert torch.equal(s_mem.keys, s_ld2.keys) and torch.equal(s_mem.values, s_ld2.values)
    # and the round trip is a real stream continuation: equals one uninterrupted call
    with torch.no_grad():
        x_all = torch.cat([_x(B, 7, seed=1, dtype=dtype), x2], 1)
        y_one, s_one = layer(x_all, layer.init_state(batch), flush=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([y_ld, y_ld2], 1), y_one[:, 7:], **tol)
    torch.testing.assert_close(s_ld2.values, s_one.values, **tol)


def test_save_load_without_pending_and_fresh(tmp_path):
    layer = _layer()
    for st in (layer.init_state(None), layer.init_state(3), _mid_window_state(layer, None, T=8)):
        assert st.pending == 0
        st.save(tmp_path / "s.pt")
        assert_same_state(MemoryState.load(tmp_path / "s.pt", layer.config), st)
        assert_same_state(MemoryState.load(tmp_path / "s.pt"), st)  # no config given


def test_save_of_graph_carrying_state(tmp_path):
    """A state holding an autograd graph (training) is saved detached and loads fine."""
    layer = _layer()
    _, st = layer(_x(2, 6), layer.init_state(None), flush=False)
    assert st.values.requires_grad and st.pending_q.requires_grad
    st.save(tmp_path / "s.pt")
    ld = layer.load_state(tmp_path / "s.pt")
    assert not ld.values.requires_grad and not ld.pending_q.requires_grad
    assert torch.equal(ld.values, st.values.detach())
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------------
# rejection


@pytest.fixture
def saved(tmp_path):
    layer = _layer(heads=2)
    st = _mid_window_state(layer, None, T=6)  # 2 pending
    path = tmp_path / "good.pt"
    st.save(path)
    return layer, st, path


def _edit(path, out, fn):
    payload = torch.load(path, map_location="cpu", weights_only=True)
    fn(payload)
    torch.save(payload, out)
    return out


def _rejects(layer, path, match):
    with pytest.raises(ValueError, match=match):
        layer.load_state(path)
    with pytest.raises(ValueError, match=match):
        MemoryState.load(path)  # checks that do not need the expected config run without it


def test_chunk_size_is_a_state_level_override(saved, tmp_path):
    """A state may carry its own update window (init_state(chunk_size=...)): a layer loads it,
    while MemoryState.load with an exact expected config still rejects it."""
    layer, _, path = saved
    other = _layer(heads=2, C=5)
    st = other.load_state(path)
    assert st.config.chunk_size != other.config.chunk_size
    with pytest.raises(ValueError, match="'chunk_size'"):
        MemoryState.load(path, other.config)
    long = layer.init_state(None, chunk_size=1000)
    assert long.config.chunk_size == 1000 and layer.config.chunk_size != 1000
    with pytest.raises(ValueError, match="chunk_size"):
        layer.init_state(None, chunk_size=0)


@pytest.mark.parametrize("kw,field", [(dict(n=5), "n_subkeys"), (dict(topk=3), "topk"),
                                      (dict(heads=1), "heads"),
                                      (dict(lookahead=2), "lookahead"), (dict(lr=0.5), "lr"),
                                      (dict(score="dot"), "score")])
def test_rejects_other_config(saved, tmp_path, kw, field):
    layer, _, path = saved
    base = dict(heads=2)
    base.update(kw)
    other = _layer(**base)
    with pytest.raises(ValueError, match=f"'{field}'"):
        other.load_state(path)
    with pytest.raises(ValueError, match="configuration"):
        MemoryState.load(path, other.config)
    # and the other way round: a file of the other layer into this one
    _mid_window_state(other, None, T=6).save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"'{field}'"):
        layer.load_state(tmp_path / "other.pt")


@pytest.mark.parametrize("version", [STATE_VERSION + 1, 0, None, "1"])
def test_rejects_other_version(saved, tmp_path, version):
    layer, _, path = saved
    bad = _edit(path, tmp_path / "v.pt", lambda p: p.__setitem__("version", version))
    _rejects(layer, bad, "version")


def test_rejects_missing_version(saved, tmp_path):
    layer, _, path = saved
    bad = _edit(path, tmp_path / "v.pt", lambda p: p.pop("version"))
    _rejects(layer, bad, "version")


def test_rejects_non_state_files(saved, tmp_path):
    layer, _, path = saved
    gen = torch.Generator().manual_seed(0)
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist()))
    _rejects(layer, rnd, "state file")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _rejects(layer, empty, "state file")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _rejects(layer, trunc, "state file")
    for i, obj in enumerate(({"a": torch.ones(3)}, {"format": "something.else", "version": 1},
                             torch.ones(4), [1, 2, 3], {"keys": torch.ones(1)})):
        p = tmp_path / f"other{i}.pt"
        torch.save(obj, p)
        _rejects(layer, p, "not a fwpkm_ext state file")


@pytest.mark.parametrize("name", ["values", "keys", "pending_q", "pending_v", "pending_g",
                                  "pending_mask"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite(saved, tmp_path, name, bad):
    layer, _, path = saved

    def poison(p):
        t = p["tensors"][name].clone()
        t.view(-1)[1] = bad
        p["tensors"][name] = t

    _rejects(layer, _edit(path, tmp_path / "nf.pt", poison), f"{name}.*non-finite")


def test_rejects_non_finite_counters(saved, tmp_path):
    layer, _, path = saved
    _rejects(layer, _edit(path, tmp_path / "g.pt", lambda p: p.__setitem__("gate_sum", math.nan)),
             "gate_sum")
    _rejects(layer, _edit(path, tmp_path / "t.pt", lambda p: p.__setitem__("tokens", -1)), "tokens")


def _shrink_last(name):
    def f(p):
        p["tensors"][name] = p["tensors"][name][..., :-1].contiguous()
    return f


def _shrink_first(name):
    def f(p):
        p["tensors"][name] = p["tensors"][name][:-1].contiguous()
    return f


def _put(name, fn):
    def f(p):
        p["tensors"][name] = fn(p["tensors"][name])
    return f


@pytest.mark.parametrize("edit,name", [
    (_shrink_last("values"), "values"),
    (_put("values", lambda t: t[:, :-1].contiguous()), "values"),
    (_shrink_last("keys"), "keys"),
    (_put("keys", lambda t: t[:, :, :, :-1].contiguous()), "keys"),
    (_put("keys", lambda t: t[0]), "keys"),
    (_put("values", lambda t: t.repeat(2, 1, 1)), "values"),
    (_shrink_last("pending_q"), "pending_q"),
    (_shrink_last("pending_v"), "pending_v"),
    (_put("pending_g", lambda t: t[:, :, None]), "pending_g"),
    (_shrink_first("pending_mask"), "pending_mask"),
    (_shrink_last("pending_idx"), "pending_idx"),
    (_put("pending_half_idx", lambda t: t[:, :, :, :1]), "pending_half_idx"),
    (_put("slot_reads", lambda t: t[:, :-1].contiguous()), "slot_reads"),
    (_put("values", lambda t: t.half()), "float32"),
    (_put("pending_idx", lambda t: t.int()), "pending_idx"),
])
def test_rejects_wrong_shapes(saved, tmp_path, edit, name):
    layer, _, path = saved
    _rejects(layer, _edit(path, tmp_path / "shape.pt", edit), name)


@pytest.mark.parametrize("name,value", [("pending_idx", 16), ("pending_idx", -1),
                                        ("pending_half_idx", 4), ("pending_half_idx", -3)])
def test_rejects_out_of_range_pending_indices(saved, tmp_path, name, value):
    layer, _, path = saved

    def f(p):
        t = p["tensors"][name].clone()
        t.view(-1)[-1] = value
        p["tensors"][name] = t

    _rejects(layer, _edit(path, tmp_path / "idx.pt", f), name)


def test_rejects_too_many_pending(tmp_path):
    layer = _layer(C=4)
    st = _mid_window_state(layer, None, T=3)
    st.save(tmp_path / "s.pt")
    small = _layer(C=3)

    def edit(p):
        p["config"]["chunk_size"] = 3

    path = _edit(tmp_path / "s.pt", tmp_path / "p.pt", edit)
    with pytest.raises(ValueError, match="pending"):
        small.load_state(path)


def test_rejects_shared_state_with_several_memories(saved, tmp_path):
    layer, _, path = saved

    def f(p):
        p["tensors"]["keys"] = p["tensors"]["keys"].repeat(2, 1, 1, 1, 1)
        p["tensors"]["values"] = p["tensors"]["values"].repeat(2, 1, 1)
        p["tensors"]["slot_reads"] = p["tensors"]["slot_reads"].repeat(2, 1)

    _rejects(layer, _edit(path, tmp_path / "s.pt", f), "shared")


def test_rejects_invalid_config_dict(saved, tmp_path):
    layer, _, path = saved
    _rejects(layer, _edit(path, tmp_path / "c.pt", lambda p: p["config"].__setitem__("bogus", 1)),
             "config")
    _rejects(layer, _edit(path, tmp_path / "c2.pt", lambda p: p["config"].pop("topk")), "config")


@pytest.mark.parametrize("what", ["no_tensors", "no_per_sequence", "no_keys", "extra_tensor",
                                  "tensor_not_a_tensor"])
def test_rejects_malformed_payload(saved, tmp_path, what):
    """A file with the right format tag but missing/unknown fields: ValueError, not a KeyError or
    TypeError from inside the loader."""
    layer, _, path = saved
    edits = {
        "no_tensors": lambda p: p.pop("tensors"),
        "no_per_sequence": lambda p: p.pop("per_sequence"),
        "no_keys": lambda p: p["tensors"].pop("keys"),
        "extra_tensor": lambda p: p["tensors"].__setitem__("surprise", torch.ones(2)),
        "tensor_not_a_tensor": lambda p: p["tensors"].__setitem__("pending_q", [1.0, 2.0]),
    }
    bad = _edit(path, tmp_path / "m.pt", edits[what])
    with pytest.raises(ValueError):
        layer.load_state(bad)


def test_rejects_partial_pending_window(saved, tmp_path):
    """Pending tokens whose q was dropped (other pending tensors kept) must not load as a state
    that silently forgets its pending tokens."""
    layer, st, path = saved
    assert st.pending == 2
    bad = _edit(path, tmp_path / "p.pt", lambda p: p["tensors"].pop("pending_q"))
    with pytest.raises(ValueError, match="pending"):
        layer.load_state(bad)


def test_rejects_per_sequence_pending_batch_mismatch(tmp_path):
    """A per-sequence state with S memories must hold pending tokens of exactly S sequences."""
    layer = _layer()
    st = _mid_window_state(layer, 2, B=2, T=6)
    st.save(tmp_path / "s.pt")

    def f(p):
        for k in ("pending_q", "pending_v", "pending_g", "pending_mask", "pending_idx",
                  "pending_half_idx"):
            p["tensors"][k] = p["tensors"][k][:1].contiguous()

    bad = _edit(tmp_path / "s.pt", tmp_path / "b.pt", f)
    with pytest.raises(ValueError, match="pending"):
        layer.load_state(bad)


def test_failed_load_leaves_good_state_usable(saved, tmp_path):
    layer, st, path = saved
    bad = _edit(path, tmp_path / "nan.pt",
                lambda p: p["tensors"].__setitem__("values", p["tensors"]["values"] * math.nan))
    with pytest.raises(ValueError):
        layer.load_state(bad)
    good = layer.load_state(path)
    assert_same_state(good, st)
    with torch.no_grad():
        y, s2 = layer(_x(2, 3, seed=5), good, flush=True)
    assert torch.isfinite(y).all() and s2.pending == 0
    # saving over an existing file replaces it as a whole
    s2.save(path)
    assert_same_state(layer.load_state(path), s2)


# ------------------------------------------------------------------------------------------------
# detach / to


def test_detach_cuts_graph():
    layer = _layer()
    x = _x(2, 6).requires_grad_(True)
    _, st = layer(x, layer.init_state(None), flush=False)
    assert st.values.grad_fn is not None and st.pending_q.grad_fn is not None
    d = st.detach()
    for name in ("keys", "values", "pending_q", "pending_v", "pending_g"):
        t = getattr(d, name)
        assert not t.requires_grad and t.grad_fn is None, name
        assert torch.equal(t, getattr(st, name).detach()), name
    assert d.pending == st.pending and d.tokens == st.tokens and d.config == st.config
    # the original still carries the graph
    (g,) = torch.autograd.grad(st.values.sum() + st.pending_v.sum(), [x])
    assert g.abs().max() > 0
    # continuing from the detached state: gradients reach only the new tokens
    x2 = _x(2, 5, seed=3).requires_grad_(True)
    x1 = _x(2, 6).requires_grad_(True)
    _, s1 = layer(x1, layer.init_state(None), flush=False)
    y, s3 = layer(x2, s1.detach(), flush=True)
    (y.sum() + s3.values.sum()).backward()
    assert x1.grad is None and x2.grad.abs().max() > 0
    # same values either way
    with torch.no_grad():
        y_ref, _ = layer(x2, s1, flush=True)
    assert torch.equal(y.detach(), y_ref)


def test_to_device_keeps_values():
    layer = _layer()
    st = _mid_window_state(layer, 2, T=6)
    for dev in ("cpu", torch.device("cpu")):
        moved = st.to(dev)
        assert moved.device == torch.device("cpu")
        assert_same_state(moved, st)
    meta = st.to("meta")
    assert meta.device.type == "meta" and meta.values.shape == st.values.shape
    assert meta.pending == st.pending


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_and_back(tmp_path):
    layer = _layer()
    st = _mid_window_state(layer, 2, T=6)
    c = st.to("cuda")
    assert c.values.is_cuda and c.pending_idx.is_cuda
    assert_same_state(c.to("cpu"), st)
    st.save(tmp_path / "s.pt")
    ld = layer.load_state(tmp_path / "s.pt", device="cuda")
    assert ld.values.is_cuda
    assert_same_state(ld.to("cpu"), st)
