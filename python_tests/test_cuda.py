"""CUDA backend tests: the CUDA kernels against the CPU kernels, and fwpkm_memory with
backend="cuda" against backend="cpu" and backend="reference".

Every GPU test is skipped, with the reason, when there is no CUDA device or when this build of
fwpkm_ext has no CUDA kernels (FWPKM_CUDA=0). The first block of tests runs everywhere (CPU):
build_info, the backend checks, the `deterministic` switch of scatter_rows on CPU and a smoke
run of tools/gpu_bench.py on CPU.

On a GPU machine: `bash tools/gpu_check.sh` runs this file among other checks (docs/CUDA.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fwpkm_ext
from fwpkm_ext import _C, recurrence, _native
from fwpkm_ext.functional import fwpkm_memory

ROOT = Path(__file__).resolve().parents[1]

HAS_CUDA_BUILD = bool(fwpkm_ext.build_info().get("cuda", False))
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    _SKIP_REASON = "no CUDA device: torch.cuda.is_available() is False"
elif not HAS_CUDA_BUILD:
    _SKIP_REASON = ("this build of fwpkm_ext has no CUDA kernels (build_info()['cuda'] is False); "
                    "rebuild with FWPKM_CUDA=1")
else:
    _SKIP_REASON = ""
needs_gpu = pytest.mark.skipif(bool(_SKIP_REASON), reason=_SKIP_REASON or "n/a")

F32, F64 = torch.float32, torch.float64
FLOATS = [F32, F64]


# =============================================================================================
# CPU-runnable tests (never skipped)
# =============================================================================================


def test_build_info_keys():
    info = fwpkm_ext.build_info()
    for key in ("cuda", "cuda_archs", "openmp", "version"):
        assert key in info, f"build_info() lacks {key!r}: {info}"
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_archs"], str)
    assert info["version"] == fwpkm_ext.__version__
    if not info["cuda"]:
        assert info["cuda_archs"] == ""
    assert hasattr(_C, "scatter_rows_atomic")


def _tiny_inputs(device="cpu", dtype=F64, B=1, T=6, H=1, dk=4, dv=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    v = torch.randn(B, T, dv, generator=g, dtype=dtype)
    gate = torch.rand(B, T, generator=g, dtype=dtype)
    keys = (torch.rand(H, 2, n, dk // 2, generator=g, dtype=dtype) * 2 - 1) / dk ** 0.5
    values = torch.randn(n * n, dv, generator=g, dtype=dtype) / dv ** 0.5
    return [t.to(device) for t in (q, v, gate, keys, values)]


def test_backend_cuda_on_cpu_tensors_raises_value_error():
    q, v, g, keys, values = _tiny_inputs()
    with pytest.raises(ValueError, match="backend"):
        fwpkm_memory(q, v, g, keys, values, topk=2, chunk_size=4, backend="cuda")


def test_native_cuda_device_needs_cuda_build():
    if HAS_CUDA_BUILD:
        pytest.skip("this build has CUDA kernels (the refusal is for CPU-only builds)")
    args = ("cuda", 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0)
    for fn, extra in ((_C.scatter_rows, (0,)), (_C.scatter_rows_atomic, ())):
        with pytest.raises(ValueError, match="no CUDA kernels"):
            fn(*args, *extra)


def _scatter_case(device, dtype, R=40, D=7, M=30, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, R, (M * L,), generator=g)
    rows[: M * L // 2] = rows[0]  # one long segment
    table = torch.randn(R, D, generator=g, dtype=dtype)
    coef = torch.randn(M * L, generator=g, dtype=dtype)
    x = torch.randn(M, D, generator=g, dtype=dtype)
    urows, offsets, order, _ = recurrence.segments(rows)
    return [t.to(device) for t in (table, urows, offsets, order, coef, x)] + [L]


def test_scatter_rows_deterministic_flag_ignored_on_cpu():
    table, urows, offsets, order, coef, x, L = _scatter_case("cpu", F64)
    a, b = table.clone(), table.clone()
    _native.scatter_rows(a, urows, offsets, order, coef, x, L)
    _native.scatter_rows(b, urows, offsets, order, coef, x, L, deterministic=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, table)


def test_gpu_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    # the subprocess imports the same fwpkm_ext as this test process
    pkg_parent = str(Path(fwpkm_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_bench.py"), "--device", "cpu",
                           "--quick", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens/s" in proc.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "cpu"
    rows = data["rows"]
    assert {r["backend"] for r in rows} == {"native", "reference"}
    assert {r["mode"] for r in rows} == {"inference", "train"}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["gb_per_s"] > 0 and r["ms"] > 0


# =============================================================================================
# GPU: native kernels, CUDA vs CPU
# =============================================================================================


def _cuda(*ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in ts]


def _topk_inputs(M, H, n, G, dtype, kind, ties, seed):
    g = torch.Generator().manual_seed(seed)
    if ties:  # exact ties: the order must follow the smaller index
        if kind == "dot":  # small integers: every sum is exact
            dots = torch.randint(-3, 4, (M, H, 2, n), generator=g).to(dtype)
        else:  # two distances only (20 and 18), so no candidate sum is a near-tie that the
            # last-ulp differences of the host and device log could order differently
            dots = torch.randint(0, 2, (M, H, 2, n), generator=g).to(dtype)
        qn = torch.full((M, H, 2), 20.0, dtype=dtype)
        kn = torch.zeros(G, H, 2, n, dtype=dtype)
    else:
        dots = torch.randn(M, H, 2, n, generator=g, dtype=dtype)
        qn = torch.rand(M, H, 2, generator=g, dtype=dtype) * 4 + 4
        kn = torch.rand(G, H, 2, n, generator=g, dtype=dtype) * 4
    if kind == "dot":
        qn = kn = None
    return dots, qn, kn


def _run_topk(dots, qn, kn, k, tpg, kind, eps=1e-3):
    M, H = dots.shape[:2]
    dev = dots.device
    idx = torch.empty(M, H, k, dtype=torch.long, device=dev)
    score = torch.empty(M, H, k, dtype=dots.dtype, device=dev)
    half_idx = torch.empty(M, H, 2, k, dtype=torch.long, device=dev)
    half_score = torch.empty(M, H, 2, k, dtype=dots.dtype, device=dev)
    _native.topk_select(dots, qn, kn, k, tpg, kind, eps, idx, score, half_idx, half_score)
    return idx, score, half_idx, half_score


TOPK_SHAPES = [  # (M, H, n, k, groups)
    (37, 2, 50, 7, 1),
    (64, 1, 512, 8, 1),  # the paper's n and k
    (9, 3, 9, 9, 3),  # k = n, per-sequence key groups
    (5, 1, 100, 64, 1),  # the largest k the kernel promises for both types
    (33, 2, 4096, 16, 1),
    (1, 1, 1, 1, 1),
]


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["idw", "dot"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("shape", TOPK_SHAPES, ids=lambda s: "M{}H{}n{}k{}G{}".format(*s))
def test_topk_select_cuda_matches_cpu(dtype, kind, ties, shape):
    M, H, n, k, G = shape
    tpg = -(-M // G)
    dots, qn, kn = _topk_inputs(M, H, n, G, dtype, kind, ties, seed=n + k)
    cpu = _run_topk(dots, qn, kn, k, tpg, kind)
    gpu = _run_topk(*_cuda(dots, qn, kn), k, tpg, kind)
    gpu2 = _run_topk(*_cuda(dots, qn, kn), k, tpg, kind)
    for a, b in zip(gpu, gpu2):  # run to run: bitwise
        assert torch.equal(a, b)
    idx, score, half_idx, half_score = (t.cpu() for t in gpu)
    assert torch.equal(idx, cpu[0]), "slot indices differ from the CPU kernel"
    assert torch.equal(half_idx, cpu[2]), "per-half indices differ from the CPU kernel"
    if kind == "dot":  # README: bitwise
        assert torch.equal(score, cpu[1]) and torch.equal(half_score, cpu[3])
    else:  # README: bitwise up to the last-ulp differences of device/host log
        tol = dict(rtol=2e-6, atol=2e-6) if dtype == F32 else dict(rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(score, cpu[1], **tol)
        torch.testing.assert_close(half_score, cpu[3], **tol)


def _gather_inputs(R, D, M, L, dtype, seed, unaligned=False):
    g = torch.Generator().manual_seed(seed)
    if unaligned:  # 1-element offset: 16-byte vector loads are impossible
        buf = torch.randn(R * D + 1, generator=g, dtype=dtype)
        table = buf[1:].view(R, D)
    else:
        table = torch.randn(R, D, generator=g, dtype=dtype)
    rows = torch.randint(0, R, (M, L), generator=g)
    if M and L > 1:
        rows[:, 1] = rows[:, 0]  # duplicate rows inside a token
    w = torch.randn(M, L, generator=g, dtype=dtype)
    x = torch.randn(M, D, generator=g, dtype=dtype)
    return table, rows, w, x


GATHER_SHAPES = [  # (R, D, M, L)
    (300, 1, 50, 9),
    (300, 37, 50, 9),
    (300, 64, 50, 8),
    (1000, 512, 200, 8),  # the paper's dv and k
    (100, 1030, 20, 5),
    (10, 16, 0, 3),  # no token
    (10, 16, 7, 0),  # no pair
]


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "R{}D{}M{}L{}".format(*s))
def test_gather_rows_cuda_bitwise_cpu(dtype, unaligned, shape):
    R, D, M, L = shape
    table, rows, w, _ = _gather_inputs(R, D, M, L, dtype, seed=D + M, unaligned=unaligned)
    out = torch.empty(M, D, dtype=dtype)
    saved = torch.empty(M, L, D, dtype=dtype)
    _native.gather_rows(table, rows, w, out, saved)
    gt, grows, gw = _cuda(table, rows, w)
    gout = torch.full((M, D), float("nan"), dtype=dtype, device="cuda")
    gsaved = torch.empty(M, L, D, dtype=dtype, device="cuda")
    _native.gather_rows(gt, grows, gw, gout, gsaved)
    assert torch.equal(gout.cpu(), out), "gather_rows: CUDA differs from the CPU kernel (README: bitwise)"
    assert torch.equal(gsaved.cpu(), saved)
    gout2 = torch.empty_like(gout)
    _native.gather_rows(gt, grows, gw, gout2)  # saved=None path
    assert torch.equal(gout2, gout)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "R{}D{}M{}L{}".format(*s))
def test_gather_dot_cuda_matches_cpu(dtype, unaligned, shape):
    R, D, M, L = shape
    table, rows, _, x = _gather_inputs(R, D, M, L, dtype, seed=D + M + 1, unaligned=unaligned)
    gw = torch.empty(M, L, dtype=dtype)
    _native.gather_dot(table, rows, x, gw)
    gt, grows, gx = _cuda(table, rows, x)
    ggw = torch.full((M, L), float("nan"), dtype=dtype, device="cuda")
    _native.gather_dot(gt, grows, gx, ggw)
    ggw2 = torch.empty_like(ggw)
    _native.gather_dot(gt, grows, gx, ggw2)
    assert torch.equal(ggw, ggw2)
    scale = max(1.0, D ** 0.5)
    tol = dict(rtol=1e-5, atol=1e-5 * scale) if dtype == F32 else dict(rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(ggw.cpu(), gw, **tol)


def _scatter_inputs(R, D, M, L, dtype, seed, empty_segments=False, subset=False):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(R, D, generator=g, dtype=dtype)
    rows = torch.randint(0, R, (M * L,), generator=g)
    if M * L:
        rows[: (M * L) // 3] = rows[0]  # one long segment
    coef = torch.randn(M * L, generator=g, dtype=dtype)
    x = torch.randn(M, D, generator=g, dtype=dtype)
    pairs = None
    if subset and M * L:
        pairs = torch.nonzero(torch.rand(M * L, generator=g) > 0.4).squeeze(1)
    urows, offsets, order, _ = recurrence.segments(rows, pairs)
    if empty_segments and urows.numel():
        # extra rows with empty segments [offsets[u], offsets[u]) in the middle and at the end:
        # they must be left untouched
        used = set(urows.tolist())
        extra = torch.tensor([r for r in range(R) if r not in used][:6], dtype=torch.long)
        if extra.numel():
            mid, e1, e2 = urows.numel() // 2, extra[: extra.numel() // 2], extra[extra.numel() // 2:]
            urows = torch.cat([urows[:mid], e1, urows[mid:], e2])
            offsets = torch.cat([offsets[:mid], offsets[mid:mid + 1].repeat(e1.numel()), offsets[mid:],
                                 offsets[-1:].repeat(e2.numel())])
    return table, urows, offsets, order, coef, x


SCATTER_SHAPES = [  # (R, D, M, L)
    (50, 1, 40, 3),
    (50, 37, 40, 3),
    (300, 64, 100, 8),
    (2000, 512, 256, 8),  # the paper's dv and k
    (64, 1030, 30, 4),
    (10, 8, 0, 4),
]


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", ["plain", "empty_segments", "subset"])
@pytest.mark.parametrize("shape", SCATTER_SHAPES, ids=lambda s: "R{}D{}M{}L{}".format(*s))
def test_scatter_rows_cuda_bitwise_cpu_and_atomic_close(dtype, variant, shape):
    R, D, M, L = shape
    table, urows, offsets, order, coef, x = _scatter_inputs(
        R, D, M, L, dtype, seed=D + M + 2, empty_segments=variant == "empty_segments",
        subset=variant == "subset")
    cpu = table.clone()
    _native.scatter_rows(cpu, urows, offsets, order, coef, x, L)
    gargs = _cuda(urows, offsets, order, coef, x)
    det = table.to("cuda", copy=True)
    _native.scatter_rows(det, *gargs, L)
    assert torch.equal(det.cpu(), cpu), "scatter_rows: CUDA differs from the CPU kernel (README: bitwise)"
    det2 = table.to("cuda", copy=True)
    _native.scatter_rows(det2, *gargs, L, deterministic=True)
    assert torch.equal(det, det2), "deterministic scatter_rows is not bitwise reproducible"
    atom = table.to("cuda", copy=True)
    _native.scatter_rows(atom, *gargs, L, deterministic=False)
    seg = int(offsets[-1] - offsets[0]) if offsets.numel() else 0
    scale = max(1.0, float(seg) ** 0.5)
    tol = dict(rtol=1e-5, atol=1e-5 * scale) if dtype == F32 else dict(rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(atom.cpu(), cpu, **tol)
    untouched = torch.ones(R, dtype=torch.bool)
    untouched[urows] = False
    assert torch.equal(atom.cpu()[untouched], table[untouched])


@needs_gpu
def test_native_checks_reject_mixed_devices():
    table, rows, w, _ = _gather_inputs(20, 8, 4, 2, F32, seed=0)
    out = torch.empty(4, 8, device="cuda")
    with pytest.raises(ValueError, match="rows"):
        _native.gather_rows(table.cuda(), rows, w.cuda(), out)


@needs_gpu
def test_bad_launch_raises_error_naming_the_op():
    # k = n = 256 in float64 needs ~100 KiB of shared memory per warp: the CUDA launcher refuses
    # it (csrc/cuda/README.md) with an error that names the op.
    M, H, n, k = 2, 1, 256, 256
    dots, qn, kn = _topk_inputs(M, H, n, 1, F64, "idw", False, seed=0)
    with pytest.raises((ValueError, RuntimeError), match="topk_select"):
        _run_topk(*_cuda(dots, qn, kn), k, M, "idw")
    torch.cuda.synchronize()  # the context is still usable
    cpu = _run_topk(dots, qn, kn, k, M, "idw")  # the CPU kernel has no such limit
    assert cpu[0].shape == (M, H, k)


# =============================================================================================
# GPU: fwpkm_memory, backend="cuda" vs "cpu" vs "reference" (float64)
# =============================================================================================

CFG = dict(topk=3, chunk_size=8, lookahead=1, lr=0.5, addr_loss_weight=0.7)
TOL64 = dict(rtol=1e-9, atol=1e-10)


def _mem_inputs(B, T, H, dk, dv, n, per_seq, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    v = torch.randn(B, T, dv, generator=g, dtype=dtype)
    gate = torch.rand(B, T, generator=g, dtype=dtype)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(dtype)
    S = (B,) if per_seq else ()
    keys = (torch.rand(*S, H, 2, n, dk // 2, generator=g, dtype=dtype) * 2 - 1) / dk ** 0.5
    values = torch.randn(*S, n * n, dv, generator=g, dtype=dtype) / dv ** 0.5
    return q, v, gate, keys, values, mask


NAMES = ("vhat", "new_keys", "new_values")
GNAMES = ("grad_q", "grad_v", "grad_g", "grad_keys", "grad_values")


def _run_memory(inputs, device, backend, score, grad, loss_on_state=True, cfg=CFG, seed=5,
                wrt=GNAMES):
    """(outputs, gradients of a random projection of them w.r.t. the inputs named in wrt)."""
    q, v, g, keys, values, mask = (t.to(device) for t in inputs)
    ins = [t.clone().requires_grad_(grad and name in wrt) for t, name in zip((q, v, g, keys, values), GNAMES)]
    out = fwpkm_memory(*ins, mask=mask, backend=backend, score=score, **cfg)
    if not grad:
        return [o.detach().cpu() for o in out], []
    gen = torch.Generator().manual_seed(seed)
    terms = out if loss_on_state else out[:1]
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(device)).sum() for o in terms)
    grads = torch.autograd.grad(loss, [t for t, name in zip(ins, GNAMES) if name in wrt])
    return [o.detach().cpu() for o in out], [x.cpu() for x in grads]


def _assert_all_close(got, want, names, what, **tol):
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {name}: {m}", **tol)


@needs_gpu
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("per_seq", [False, True], ids=["shared", "per_seq"])
def test_memory_forward_cuda_vs_cpu_vs_reference(score, per_seq):
    inputs = _mem_inputs(2, 45, 2, 8, 6, 6, per_seq, seed=1)
    cuda, _ = _run_memory(inputs, "cuda", "cuda", score, grad=False)
    cpu, _ = _run_memory(inputs, "cpu", "cpu", score, grad=False)
    ref, _ = _run_memory(inputs, "cuda", "reference", score, grad=False)
    _assert_all_close(cuda, cpu, NAMES, "cuda vs cpu", **TOL64)
    _assert_all_close(cuda, ref, NAMES, "cuda vs reference", **TOL64)
    auto, _ = _run_memory(inputs, "cuda", "auto", score, grad=False)
    for a, b in zip(auto, cuda):
        assert torch.equal(a, b), "backend='auto' on CUDA tensors is not the CUDA backend"


@needs_gpu
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("per_seq", [False, True], ids=["shared", "per_seq"])
def test_memory_grad_first_order(score, per_seq):
    # one window (T = C) and a loss on vhat only: the gradient of the read, no update in between
    # (v and g only feed the update, so only q, keys and values get a gradient)
    inputs = _mem_inputs(2, 8, 1, 8, 6, 5, per_seq, seed=2)
    wrt = ("grad_q", "grad_keys", "grad_values")
    res = {be: _run_memory(inputs, dev, be, score, grad=True, loss_on_state=False, wrt=wrt)
           for be, dev in (("cuda", "cuda"), ("cpu", "cpu"), ("reference", "cuda"))}
    _assert_all_close(res["cuda"][1], res["cpu"][1], wrt, "cuda vs cpu", **TOL64)
    _assert_all_close(res["cuda"][1], res["reference"][1], wrt, "cuda vs reference", **TOL64)


@needs_gpu
@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("per_seq", [False, True], ids=["shared", "per_seq"])
def test_memory_grad_through_updates(score, per_seq):
    # 6 windows, a short last one, loss on vhat and on the final state: gradients flow through
    # every fast update (values and keys) into q, v, g and the initial state
    inputs = _mem_inputs(2, 45, 2, 8, 6, 6, per_seq, seed=3)
    res = {be: _run_memory(inputs, dev, be, score, grad=True)
           for be, dev in (("cuda", "cuda"), ("cpu", "cpu"), ("reference", "cuda"))}
    for be in ("cpu", "reference"):
        _assert_all_close(res["cuda"][0], res[be][0], NAMES, f"cuda vs {be}", **TOL64)
        _assert_all_close(res["cuda"][1], res[be][1], GNAMES, f"cuda vs {be}", **TOL64)


@needs_gpu
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_memory_accepts_reduced_precision_q_v(low):
    q, v, g, keys, values, mask = _mem_inputs(2, 40, 1, 16, 8, 8, False, seed=4, dtype=F32)
    q, v = q.to(low).cuda(), v.to(low).cuda()
    g, keys, values, mask = _cuda(g, keys, values, mask)
    qr, vr = q.clone().requires_grad_(), v.clone().requires_grad_()
    out = fwpkm_memory(qr, vr, g, keys, values, mask=mask, backend="cuda", **CFG)
    assert out[0].dtype == F32 and out[1].dtype == F32 and out[2].dtype == F32
    assert all(bool(torch.isfinite(o).all()) for o in out)
    # q and v are upcast exactly: the same call on the float32 copies gives the same bits
    ref = fwpkm_memory(q.float(), v.float(), g, keys, values, mask=mask, backend="cuda", **CFG)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    out[0].sum().backward()
    assert qr.grad is not None and qr.grad.dtype == low and bool(torch.isfinite(qr.grad.float()).all())
    assert vr.grad is not None and vr.grad.dtype == low


@needs_gpu
def test_memory_cuda_deterministic():
    # float32, a mid-size case with many colliding reads: two runs give the same bits
    inputs = _mem_inputs(3, 200, 2, 32, 64, 16, False, seed=6, dtype=F32)
    cfg = dict(topk=8, chunk_size=32, lookahead=1, lr=1.0, addr_loss_weight=1.0)
    a = _run_memory(inputs, "cuda", "cuda", "idw", grad=True, cfg=cfg)
    b = _run_memory(inputs, "cuda", "cuda", "idw", grad=True, cfg=cfg)
    for x, y, name in zip(a[0] + a[1], b[0] + b[1], NAMES + GNAMES):
        assert torch.equal(x, y), f"{name} differs between two identical CUDA runs"


@needs_gpu
def test_memory_runs_on_current_stream():
    inputs = _mem_inputs(2, 45, 2, 8, 6, 6, False, seed=7)
    base, _ = _run_memory(inputs, "cuda", "cuda", "idw", grad=False)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        other, _ = _run_memory(inputs, "cuda", "cuda", "idw", grad=False)
    torch.cuda.synchronize()
    for a, b in zip(base, other):
        assert torch.equal(a, b)


# =============================================================================================
# GPU: streaming equivalence of the layer (when fwpkm_ext.FwPKM exists)
# =============================================================================================


@needs_gpu
@pytest.mark.parametrize("batch_state", [None, 2], ids=["shared", "per_seq"])
def test_layer_streaming_equivalence_cuda(batch_state):
    if not hasattr(fwpkm_ext, "FwPKM"):
        pytest.skip("fwpkm_ext.FwPKM does not exist in this build of the package")
    torch.manual_seed(0)
    layer = fwpkm_ext.FwPKM(32, n_subkeys=8, mem_k_dim=16, mem_v_dim=16, heads=2, topk=3,
                            chunk_size=8, lookahead=1, lr=1.0, addr_loss_weight=1.0).cuda()
    if not hasattr(layer, "init_state"):
        pytest.skip("FwPKM has no init_state(); streaming API unknown")
    B, T = 2, 43
    h = torch.randn(B, T, 32).cuda()
    gen = torch.Generator().manual_seed(1)
    cuts, pos = [], 0
    while pos < T:  # one-token pieces first, then random sizes
        size = 1 if pos < 5 else int(torch.randint(1, 12, (1,), generator=gen))
        cuts.append((pos, min(T, pos + size)))
        pos += size
    with torch.no_grad():
        full, st_full = layer(h, state=layer.init_state(batch_state), flush=True)
        st, ys = layer.init_state(batch_state), []
        for i, (a, b) in enumerate(cuts):
            last = i == len(cuts) - 1 and not hasattr(layer, "flush")
            y, st = layer(h[:, a:b], state=st, flush=last)
            ys.append(y)
        if hasattr(layer, "flush"):
            st = layer.flush(st)
    assert st.keys.is_cuda and st.values.is_cuda
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.keys, st_full.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.values, st_full.values, rtol=1e-5, atol=1e-5)


# =============================================================================================
# GPU: the streaming state, skip mode, all-or-nothing, mixed precision, torch.compile, the LM
# =============================================================================================


def _state64(seed, B, n=6, H=2, dk=8, dv=6, topk=3, C=5, la=1, lr=0.5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    S = 1 if B is None else B
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=n, key_dim=dk, value_dim=dv, heads=H, topk=topk,
                                 chunk_size=C, lookahead=la, lr=lr)
    keys = (torch.rand(S, H, 2, n, dk // 2, generator=g, dtype=dtype) * 2 - 1) / dk ** 0.5
    values = torch.randn(S, n * n, dv, generator=g, dtype=dtype) / dv ** 0.5
    return fwpkm_ext.MemoryState(config=cfg, keys=keys, values=values, per_sequence=B is not None)


def _stream(q, v, g, st, cuts, inplace, nonfinite="raise"):
    outs = []
    with torch.no_grad():
        for i, (a, b) in enumerate(cuts):
            y, st = fwpkm_ext.memory_step(q[:, a:b], v[:, a:b], g[:, a:b], st, inplace=inplace,
                                          flush=i == len(cuts) - 1, nonfinite=nonfinite)
            outs.append(y)
    return torch.cat(outs, 1), st


@needs_gpu
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("B", [None, 2], ids=["shared", "per_seq"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_memory_step_streaming_cuda_vs_cpu(inplace, B, nonfinite):
    # any split on CUDA == one call on CUDA == the same splits on CPU (float64), with the
    # compact touched-rows table and the all-or-nothing commit running on the device
    Bq = 2
    gen = torch.Generator().manual_seed(21)
    T = 37
    q = torch.randn(Bq, T, 2, 8, generator=gen, dtype=F64)
    v = torch.randn(Bq, T, 6, generator=gen, dtype=F64)
    g = torch.rand(Bq, T, generator=gen, dtype=F64)
    if nonfinite == "skip":
        q[0, 7, 1, 3] = float("nan")
        v[1, 20, 2] = float("inf")
    cuts, pos = [], 0
    while pos < T:
        size = int(torch.randint(1, 9, (1,), generator=gen))
        cuts.append((pos, min(T, pos + size)))
        pos += size
    st = _state64(22, B)
    y_cpu, s_cpu = _stream(q, v, g, st, cuts, inplace=False, nonfinite=nonfinite)
    st_gpu = _state64(22, B).to("cuda")
    y_gpu, s_gpu = _stream(q.cuda(), v.cuda(), g.cuda(), st_gpu, cuts, inplace, nonfinite)
    y_one, s_one = _stream(q.cuda(), v.cuda(), g.cuda(), _state64(22, B).to("cuda"), [(0, T)],
                           inplace, nonfinite)
    assert s_gpu.keys.is_cuda and s_gpu.values.is_cuda
    assert torch.isfinite(y_cpu).all()  # a skipped token reads with its bad entries zeroed
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **TOL64)
    torch.testing.assert_close(y_one.cpu(), y_cpu, **TOL64)
    for s in (s_gpu, s_one):
        torch.testing.assert_close(s.keys.cpu(), s_cpu.keys, **TOL64)
        torch.testing.assert_close(s.values.cpu(), s_cpu.values, **TOL64)
    if nonfinite == "skip":
        assert s_gpu.extras["nonfinite_skipped"] == s_cpu.extras["nonfinite_skipped"] == 2.0


@needs_gpu
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_bad_input_and_overflow_leave_the_cuda_state(inplace):
    st = _state64(23, 2, dtype=F32, lr=1e30).to("cuda")
    before = (st.keys.clone(), st.values.clone())
    gen = torch.Generator().manual_seed(24)
    q = torch.randn(2, 12, 2, 8, generator=gen).cuda()
    v = torch.randn(2, 12, 6, generator=gen).cuda()
    g = torch.rand(2, 12, generator=gen).cuda()
    qb = q.clone()
    qb[1, 4, 0, 2] = float("nan")
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^q: .*batch 1, token 4"):
            fwpkm_ext.memory_step(qb, v, g, st, inplace=inplace)
        with pytest.raises(ValueError, match=r"^lr: .*overflowed"):
            fwpkm_ext.memory_step(q * 1e6, v * 1e6, g, st, inplace=inplace)
    assert torch.equal(st.keys, before[0]) and torch.equal(st.values, before[1])


def _small_layer(**kw):
    torch.manual_seed(0)
    opts = dict(n_subkeys=16, mem_k_dim=32, mem_v_dim=32, heads=2, topk=4, chunk_size=16,
                lookahead=1, lr=1.0, addr_loss_weight=1.0)
    opts.update(kw)
    return fwpkm_ext.FwPKM(64, **opts)


@needs_gpu
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_under_autocast_cuda(low):
    layer = _small_layer().cuda()
    x = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(25)).cuda()
    y32, st32 = layer(x)
    xa = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=low):
        y, st = layer(xa)
    assert st.keys.dtype == F32 and st.values.dtype == F32
    assert torch.isfinite(y.float()).all()
    err = (y.float() - y32).norm() / y32.norm()
    assert err < 5e-2, f"autocast {low} output differs from float32 by {err:.3g} (relative)"
    y.float().square().sum().backward()
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().max() > 0
    for name, p in layer.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@needs_gpu
def test_torch_compile_inductor_cuda():
    torch._dynamo.reset()
    layer = _small_layer().cuda()
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(26)).cuda()
    R = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(27)).cuda()

    def run(m):
        xx = x.clone().requires_grad_(True)
        y, _ = m(xx)
        grads = torch.autograd.grad((y * R).sum(), [xx] + [p for p in layer.parameters() if p.requires_grad])
        return y.detach(), grads

    y_e, g_e = run(layer)
    y_c, g_c = run(torch.compile(layer, backend="inductor", fullgraph=True))
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_gpu
def test_lm_train_step_and_stream_cuda_match_cpu():
    from fwpkm_ext.model import LM, LMConfig
    cfg = LMConfig(vocab_size=97, dim=64, n_layers=2, n_heads=2, window=16, fwpkm_layers=[1],
                   fwpkm_n_subkeys=16, fwpkm_k_dim=32, fwpkm_v_dim=32, fwpkm_topk=4,
                   fwpkm_chunk_size=16, fwpkm_short_conv=4)
    torch.manual_seed(0)
    cpu = LM(cfg).double()
    gpu = LM(cfg).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    tokens = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(28))
    losses, grads = [], []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        t = tokens.to(dev)
        logits, _ = m(t[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), t[:, 1:].reshape(-1))
        losses.append(loss.item())
        grads.append([p.grad for p in m.parameters()] if loss.backward() is None else None)
    # the LM keeps float32 islands in a float64 model (rotary angles, the logits), so the two
    # devices agree to float32 rounding, not float64
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    for a, b in zip(grads[0], grads[1]):
        if a is not None:
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)
    # streaming in pieces with an in-place per-sequence cache == one call
    with torch.no_grad():
        full, _ = gpu(tokens.cuda(), gpu.init_cache(2))
        cache, outs = gpu.init_cache(2), []
        for a in range(0, 70, 23):
            y, cache = gpu(tokens[:, a:a + 23].cuda(), cache, inplace_memory=True)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
