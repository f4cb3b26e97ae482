#!/usr/bin/env python3
"""Where a CUDA call of the memory spends its time: launch-bound or device-bound?

For the streaming call (memory_step, in place, B = 1, one segment of T tokens) and the training
step (fwpkm_memory forward + backward w.r.t. q, v, g) at the paper configuration, prints:
  wall ms per call (CUDA events), device busy ms (sum of the kernels' device times from the torch
  profiler), the number of kernels launched, and the top kernels and host-side ops.
A device busy time far under the wall time means the call waits on the host (Python and launch
overhead): fusing launches (CUDA graphs, fewer bigger kernels) is then what speeds it up.

  python tools/gpu_profile.py [--T 4096] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

try:
    import fwpkm_ext
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fwpkm_ext
from fwpkm_ext.functional import fwpkm_memory, memory_step

PAPER = dict(n_subkeys=512, dk=512, dv=512, heads=1, topk=8, chunk_size=512)


def _inputs(T, dev, seed=0):
    c = PAPER
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, c["heads"], c["dk"], generator=gen).to(dev)
    v = torch.randn(1, T, c["dv"], generator=gen).to(dev)
    g = torch.sigmoid(torch.randn(1, T, generator=gen)).to(dev)
    keys = ((torch.rand(c["heads"], 2, c["n_subkeys"], c["dk"] // 2, generator=gen) * 2 - 1)
            / math.sqrt(c["dk"])).to(dev)
    values = (torch.randn(c["n_subkeys"] ** 2, c["dv"], generator=gen) * c["dv"] ** -0.5).to(dev)
    return q, v, g, keys, values


def _calls(T, dev):
    c = PAPER
    q, v, g, keys, values = _inputs(T, dev)
    cfg = fwpkm_ext.MemoryConfig(n_subkeys=c["n_subkeys"], key_dim=c["dk"], value_dim=c["dv"],
                                 heads=c["heads"], topk=c["topk"], chunk_size=c["chunk_size"],
                                 lookahead=1, lr=1.0)
    state = fwpkm_ext.MemoryState(config=cfg, keys=keys[None].clone(), values=values[None].clone(),
                                  per_sequence=False)
    holder = {"st": state}

    def stream():
        with torch.no_grad():
            _, holder["st"] = memory_step(q, v, g, holder["st"], inplace=True, flush=False)

    qg, vg, gg = (t.clone().requires_grad_(True) for t in (q, v, g))
    gout = torch.randn_like(v)
    kw = dict(topk=c["topk"], chunk_size=c["chunk_size"], lookahead=1, lr=1.0, addr_loss_weight=1.0)

    def train():
        vhat, _, _ = fwpkm_memory(qg, vg, gg, keys, values, **kw)
        torch.autograd.grad((vhat * gout).sum(), (qg, vg, gg))

    return {"stream": stream, "train": train}


def _wall_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


def profile(fn, reps=3):
    from torch.profiler import ProfilerActivity, profile as tprof
    fn()
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    dev_kernels, host_ops = {}, {}
    n_kernels = 0
    for e in p.events():
        dt = getattr(e, "device_type", None)
        if dt is not None and dt.name == "CUDA" and e.device_time_total > 0 and not e.cpu_children:
            # a device-side kernel (or memcpy/memset) record
            d = dev_kernels.setdefault(e.name, [0.0, 0])
            d[0] += e.device_time_total / 1e3
            d[1] += 1
            n_kernels += 1
    for e in p.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("fwpkm_ext::"):
            host_ops[e.key] = (e.self_cpu_time_total / 1e3 / reps, e.count // reps)
    busy = sum(v[0] for v in dev_kernels.values()) / reps
    top_k = sorted(dev_kernels.items(), key=lambda kv: -kv[1][0])[:10]
    top_h = sorted(host_ops.items(), key=lambda kv: -kv[1][0])[:10]
    return dict(device_busy_ms=round(busy, 3), kernels_per_call=n_kernels // reps,
                top_kernels=[dict(name=k[:90], ms=round(v[0] / reps, 3), count=v[1] // reps) for k, v in top_k],
                top_host_ops=[dict(name=k, self_ms=round(v[0], 3), count=v[1]) for k, v in top_h])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA device", file=sys.stderr)
        return 2
    out = {}
    for name, fn in _calls(a.T, "cuda").items():
        wall = _wall_ms(fn)
        try:
            prof = profile(fn)
        except Exception as exc:  # the profiler is optional: keep the wall time
            prof = dict(error=f"{type(exc).__name__}: {exc}")
        out[name] = dict(wall_ms=round(wall, 3), tokens_per_s=round(a.T / wall * 1e3), **prof)
        print(f"\n{name}: B=1 T={a.T}: wall {wall:.2f} ms ({a.T / wall * 1e3:,.0f} tokens/s)")
        if "error" in prof:
            print("  profiler failed:", prof["error"])
            continue
        print(f"  device busy {prof['device_busy_ms']:.2f} ms ({100 * prof['device_busy_ms'] / wall:.0f}% of wall), "
              f"{prof['kernels_per_call']} kernels per call")
        for r in prof["top_kernels"]:
            print(f"    dev {r['ms']:8.3f} ms {r['count']:5d}x  {r['name']}")
        for r in prof["top_host_ops"]:
            print(f"    host {r['self_ms']:8.3f} ms {r['count']:5d}x  {r['name']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
