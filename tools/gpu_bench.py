#!/usr/bin/env python3
"""Throughput of fwpkm_memory at the paper's configuration, native kernels against the reference.

Configuration (SPEC.md, "Shapes and defaults"): n_subkeys 512 (N = 262,144 slots), dk = dv = 512,
H = 1, k = 8, C = 512, lookahead 1, lr 1, w_addr 1, IDW scores, float32 fast weights, one memory
shared by the batch; q, v, g are float32.

Rows (each timed with CUDA events after torch.cuda.synchronize(); on CPU with perf_counter):
  inference  fwpkm_memory forward under torch.no_grad()          B in {1, 8}, T in {4096, 32768}
  train      forward + backward of sum(vhat * gout), q/v/g         B in {1, 8}, T = 4096
             requiring grad (the fast weights' initial state does not, as in training)
  reference  backend="reference", inference and train, B = 1, T = 4096 only, ONE repetition and
             no warm-up of its own (it is slow; the native rows before it have warmed up torch)
Native rows: 1 warm-up, then 3 repetitions; the table shows the median (and the minimum in JSON).

Bytes model (what "GB/s" means; a model of the sparse value-table traffic, not a measurement):
  R = B * T * H * k * dv * 4 bytes: the rows every read gathers (float32).
  inference = 3R: the gather (R) and the write-back of the touched rows (read + write, 2R).
  train     = 9R: forward 3R + the saved rows written for the backward (R); backward: saved rows
              read (R), adjoint rows gathered twice (gather_rows + gather_dot, 2R), adjoint
              scatter read + write (2R).
  Ignored: the product-key search (q.K GEMM, ~2 * T * H * n * dk flops, and its (T, H, 2, n)
  scores), the key update, q/v/g/vhat themselves. GB/s = model bytes / time (1 GB = 1e9 B).
  Reference rows use the same model (so their GB/s is just tokens/s scaled), although the
  reference really moves far more (it rebuilds dense N x dv tables every window).

Usage:
  python tools/gpu_bench.py                       # CUDA, paper configuration
  python tools/gpu_bench.py --json bench.json     # also write the rows as JSON
  python tools/gpu_bench.py --device cpu --quick  # tiny smoke run (CPU or GPU), seconds
Exit status: 0 when every row ran, 1 when a row failed (its error is printed in the table).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

try:
    import fwpkm_ext
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fwpkm_ext
from fwpkm_ext.functional import fwpkm_memory
from fwpkm_ext.layers import zscore

PAPER = dict(n_subkeys=512, dk=512, dv=512, heads=1, topk=8, chunk_size=512)
QUICK = dict(n_subkeys=16, dk=32, dv=32, heads=1, topk=4, chunk_size=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (n 16, dk=dv=32, k 4, C 16, T 32/64, B 1/2) for smoke tests")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; quick: 1 2)")
    p.add_argument("--seqs", type=int, nargs="+",
                   help="inference sequence lengths (default 4096 32768; quick: 32 64)")
    p.add_argument("--train-seq", type=int, help="training sequence length (default 4096; quick: 32)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-reference", action="store_true", help="skip the reference rows")
    p.add_argument("--no-train", action="store_true", help="skip the training rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's; --device cpu --quick: 1, since "
                        "OpenMP spin-waiting dominates tiny shapes on a busy machine)")
    p.add_argument("--json", metavar="OUT", help="write the configuration and the rows to OUT")
    a = p.parse_args(argv)
    a.cfg = dict(QUICK if a.quick else PAPER)
    a.batches = a.batches or ([1, 2] if a.quick else [1, 8])
    a.seqs = a.seqs or ([32, 64] if a.quick else [4096, 32768])
    a.train_seq = a.train_seq or (32 if a.quick else 4096)
    if a.warmup < 0 or a.repeat < 1:
        p.error("need --warmup >= 0 and --repeat >= 1")
    return a


def make_inputs(cfg, B, T, device, seed, grad):
    """q (B,T,H,dk), z-scored v (B,T,dv), gate g (B,T) in (0,1); SPEC init of keys and values."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, dk, dv, H = cfg["n_subkeys"], cfg["dk"], cfg["dv"], cfg["heads"]
    q = torch.randn(B, T, H, dk, generator=gen)
    v = zscore(torch.randn(B, T, dv, generator=gen))  # the layer's (and tools/bench.py's) z-score
    g = torch.sigmoid(torch.randn(B, T, generator=gen))
    keys = (torch.rand(H, 2, n, dk // 2, generator=gen) * 2 - 1) / math.sqrt(dk)
    values = torch.randn(n * n, dv, generator=gen) * dv ** -0.5
    q, v, g, keys, values = (t.to(device) for t in (q, v, g, keys, values))
    if grad:
        for t in (q, v, g):
            t.requires_grad_(True)
    return q, v, g, keys, values


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, repeat):
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def bytes_model(cfg, B, T, mode):
    R = B * T * cfg["heads"] * cfg["topk"] * cfg["dv"] * 4
    return (3 if mode == "inference" else 9) * R


def run_row(args, backend, mode, B, T):
    cfg, dev = args.cfg, args.device
    row = dict(backend=backend, mode=mode, B=B, T=T)
    be = "reference" if backend == "reference" else "auto"
    warmup, repeat = (0, 1) if backend == "reference" else (args.warmup, args.repeat)
    kw = dict(topk=cfg["topk"], chunk_size=cfg["chunk_size"], lookahead=1, lr=1.0,
              addr_loss_weight=1.0, backend=be)
    try:
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        q, v, g, keys, values = make_inputs(cfg, B, T, dev, args.seed, grad=mode == "train")
        if mode == "inference":
            def step():
                with torch.no_grad():
                    fwpkm_memory(q, v, g, keys, values, **kw)
        else:
            gout = torch.randn(B, T, cfg["dv"], generator=torch.Generator().manual_seed(1)).to(dev)

            def step():
                vhat, _, _ = fwpkm_memory(q, v, g, keys, values, **kw)
                torch.autograd.grad((vhat * gout).sum(), (q, v, g))
        times = time_ms(step, dev, warmup, repeat)
        ms = statistics.median(times)
        row.update(ms=ms, ms_min=min(times), repeats=repeat, warmup=warmup,
                   tokens_per_s=B * T / (ms / 1e3), bytes_model=bytes_model(cfg, B, T, mode))
        row["gb_per_s"] = row["bytes_model"] / (ms / 1e3) / 1e9
        if dev == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except Exception as exc:  # keep going: one failed row must not hide the others
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        traceback.print_exc()
    finally:
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows):
    ref = {(r["mode"], r["B"], r["T"]): r for r in rows if r["backend"] == "reference" and "ms" in r}
    head = f"{'backend':<10}{'mode':<10}{'B':>3}{'T':>7}{'ms':>11}{'tokens/s':>13}{'GB/s':>9}" \
           f"{'x ref':>8}{'peak GiB':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<10}{r['mode']:<10}{r['B']:>3}{r['T']:>7}  FAILED: {r['error']}")
            continue
        base = ref.get((r["mode"], r["B"], r["T"]))
        ratio = f"{base['ms'] / r['ms']:.1f}x" if base is not None and r["backend"] != "reference" else "-"
        peak = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        gbs = f"{r['gb_per_s']:.1f}" if r["gb_per_s"] >= 1 else f"{r['gb_per_s']:.3f}"
        print(f"{r['backend']:<10}{r['mode']:<10}{r['B']:>3}{r['T']:>7}{r['ms']:>11.2f}"
              f"{r['tokens_per_s']:>13,.0f}{gbs:>9}{ratio:>8}{peak:>10}")
    print("x ref: reference time / native time at the same (mode, B, T). GB/s: bytes model in the "
          "docstring (inference 3R, train 9R, R = B*T*H*k*dv*4).")


def main(argv=None):
    args = parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: --device cuda but torch.cuda.is_available() is False "
              "(use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    info = fwpkm_ext.build_info()
    if dev == "cuda" and not info.get("cuda"):
        print("gpu_bench: this build of fwpkm_ext has no CUDA kernels (build with FWPKM_CUDA=1)",
              file=sys.stderr)
        return 2
    threads = args.threads or (1 if dev == "cpu" and args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or "cpu")
    print(f"fwpkm_ext {fwpkm_ext.__version__} from {Path(fwpkm_ext.__file__).parent}")
    print(f"build_info: {info}")
    print(f"torch {torch.__version__}, device {dev} ({dev_name})")
    print(f"config: {args.cfg}, float32 fast weights, shared memory, IDW; warmup {args.warmup}, "
          f"repeat {args.repeat} (reference: 1 repetition, no warm-up)")
    rows = []
    for B in args.batches:
        for T in args.seqs:
            rows.append(run_row(args, "native", "inference", B, T))
    if not args.no_train:
        for B in args.batches:
            rows.append(run_row(args, "native", "train", B, args.train_seq))
    if not args.no_reference:
        rows.append(run_row(args, "reference", "inference", 1, args.train_seq))
        if not args.no_train:
            rows.append(run_row(args, "reference", "train", 1, args.train_seq))
    print()
    print_table(rows)
    if args.json:
        payload = dict(device=dev, device_name=dev_name, torch=torch.__version__, build_info=info,
                       config=args.cfg, warmup=args.warmup, repeat=args.repeat,
                       bytes_model="inference 3R, train 9R, R = B*T*H*k*dv*4 (float32 rows gathered)",
                       rows=rows)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
