"""fwpkm_ext/_alloc.py: reused per-call buffers are never handed out while something holds them."""
import threading

import torch

import fwpkm_ext
from fwpkm_ext import _alloc


def _same_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_reusable_never_hands_out_a_held_buffer():
    a = _alloc.reusable((64, 33), torch.float32, "cpu")
    a.fill_(1.0)
    b = _alloc.reusable((64, 33), torch.float32, "cpu")  # a is held: another buffer
    assert not _same_memory(a, b)
    view = a[3:]  # a view keeps a's memory held after a itself is gone
    del a
    c = _alloc.reusable((64, 33), torch.float32, "cpu")
    assert not _same_memory(c, view) and not _same_memory(c, b)
    assert torch.equal(view, torch.ones(61, 33))  # untouched
    del view
    d = _alloc.reusable((10, 7), torch.float32, "cpu")  # nothing holds the first buffer now
    assert d.shape == (10, 7) and d.is_contiguous()
    e = _alloc.reusable((2, 3), torch.float64, "cpu")  # another dtype: never a float32 buffer
    assert e.dtype == torch.float64
    assert _alloc.reusable((0, 5), torch.float32, "cpu").shape == (0, 5)


def test_reusable_reuses_a_free_buffer_and_takes_the_smallest_fit():
    if _alloc._USE is None:  # no usable use count in this torch: every call allocates
        assert not _same_memory(_alloc.reusable((8,), torch.float32, "cpu"),
                                _alloc.reusable((8,), torch.float32, "cpu"))
        return
    _alloc._POOL.bufs = []  # this thread's pool, empty: the other tests' buffers out of the way
    big = _alloc.reusable((1000,), torch.float32, "cpu")
    small = _alloc.reusable((100,), torch.float32, "cpu")
    big_ptr, small_ptr = big.data_ptr(), small.data_ptr()
    del big, small
    again = _alloc.reusable((50,), torch.float32, "cpu")
    assert again.data_ptr() == small_ptr  # free, fits, smallest
    other = _alloc.reusable((900,), torch.float32, "cpu")
    assert other.data_ptr() == big_ptr


def test_reusable_exact_takes_only_a_buffer_of_the_same_size():
    """`exact` (an output the caller keeps): never a slice of a larger free buffer; a free buffer of
    the same size is reused. The streaming read is such an output."""
    if _alloc._USE is None:
        return
    _alloc._POOL.bufs = []
    big = _alloc.reusable((1000,), torch.float32, "cpu")
    big_ptr = big.data_ptr()
    del big
    out = _alloc.reusable((10, 10), torch.float32, "cpu", exact=True)
    assert out.data_ptr() != big_ptr and out.untyped_storage().nbytes() == 400
    ptr = out.data_ptr()
    del out
    again = _alloc.reusable((100,), torch.float32, "cpu", exact=True)
    assert again.data_ptr() == ptr
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=8, key_dim=8, value_dim=6, heads=1, topk=2, chunk_size=4)
    st = fwpkm_ext.MemoryState(config=cfg, keys=torch.randn(1, 1, 2, 8, 4), values=torch.randn(1, 64, 6),
                                 per_sequence=False)
    with torch.no_grad():
        vh, _ = fwpkm_ext.memory_step(torch.randn(1, 9, 1, 8), torch.randn(1, 9, 6), torch.rand(1, 9), st,
                                      inplace=True)
    assert vh.untyped_storage().nbytes() == vh.numel() * vh.element_size()


def test_reusable_buffers_are_per_thread():
    got = {}

    def take(name):
        got[name] = _alloc.reusable((128,), torch.float32, "cpu").data_ptr()

    take("main")  # the main thread's buffer is free again: only its own thread may reuse it
    t = threading.Thread(target=take, args=("other",))
    t.start()
    t.join()
    assert got["main"] != got["other"]


def test_buffers_made_under_inference_mode_serve_training_later():
    """Streaming under torch.inference_mode, then a training call on the same thread: the
    workspaces and buffers the first call left must be ordinary tensors (an inference tensor
    refuses the in-place writes and the saving of the second)."""
    torch.manual_seed(1)
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=6, key_dim=8, value_dim=5, heads=2, topk=3, chunk_size=4)
    st = fwpkm_ext.MemoryState(config=cfg, keys=torch.randn(1, 2, 2, 6, 4), values=torch.randn(1, 36, 5),
                               per_sequence=False)
    q, v, g = torch.randn(1, 11, 2, 8), torch.randn(1, 11, 5), torch.rand(1, 11)
    with torch.inference_mode():
        with_inf, _ = fwpkm_ext.memory_step(q, v, g, st)
        assert _alloc.reusable((7,), torch.float32, "cpu").is_inference() is False
    qq = q.clone().requires_grad_(True)
    y, _ = fwpkm_ext.memory_step(qq, v, g, st, return_state=False)
    y.square().sum().backward()
    assert torch.isfinite(qq.grad).all() and torch.equal(y.detach(), with_inf)
    pkm = fwpkm_ext.PKM(16, n_subkeys=8, k_dim=8, heads=2, topk=3)
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        pkm(x)
    pkm(x).sum().backward()
    assert pkm.values.grad is not None


def test_two_steps_in_one_graph_keep_their_saved_rows():
    """Two memory calls before one backward (gradient accumulation over a graph, two layers):
    the second call must not reuse the rows the first saved; the gradients equal those of two
    separate backward passes."""
    torch.manual_seed(0)
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=6, key_dim=8, value_dim=5, heads=2, topk=3, chunk_size=4)
    keys = torch.randn(1, 2, 2, 6, 4, dtype=torch.float64)
    vals = torch.randn(1, 36, 5, dtype=torch.float64)
    st = fwpkm_ext.MemoryState(config=cfg, keys=keys, values=vals, per_sequence=False)
    q = torch.randn(2, 2, 11, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 5, dtype=torch.float64)
    g = torch.rand(2, 2, 11, dtype=torch.float64)
    outs = [fwpkm_ext.memory_step(q[i], v[i], g[i], st, return_state=False)[0] for i in range(2)]
    (outs[0].square().sum() + outs[1].sum()).backward()
    together = q.grad.clone()
    q.grad = None
    fwpkm_ext.memory_step(q[0], v[0], g[0], st, return_state=False)[0].square().sum().backward()
    fwpkm_ext.memory_step(q[1], v[1], g[1], st, return_state=False)[0].sum().backward()
    assert torch.equal(together, q.grad)
