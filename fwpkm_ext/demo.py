"""`fwpkm demo`: the memory learning at test time, with no trained weights.

A FwPKM layer with fixed random projections reads a stream of random token embeddings. The first
window holds `pairs` associations "key token, value token" (the layer writes the value token's
z-scored projection at the slots the key token reads: its target is the next token). Then
`distractors` random tokens follow, each writing its own association and overwriting slots.
At checkpoints along the stream every key token is read again (a pure read: nothing is written)
and counted correct when the read-out vector is closer (cosine) to its own value token's
projection than to any other of the `pairs` value tokens (chance: 1 / pairs).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from . import functional
from .layers import FwPKM


def _checkpoints(total: int) -> List[int]:
    pts, d = [0], 512
    while d < total:
        pts.append(d)
        d *= 2
    pts.append(total)
    return pts


def run_demo(*, dim: int = 512, n_subkeys: int = 512, key_dim: int = 512, value_dim: int = 512,
             topk: int = 8, chunk_size: int = 512, pairs: int = 256, distractors: int = 131072,
             segment: int = 4096, seed: int = 0, threads: Optional[int] = None,
             progress: bool = True, out=print) -> Dict:
    """Run the demo; returns {"recall": {distance: accuracy}, "tokens_per_s": float, ...}."""
    if threads:
        torch.set_num_threads(threads)
    if 2 * pairs > chunk_size:
        raise ValueError(f"pairs: 2 * pairs must fit in one window ({chunk_size} tokens), got {pairs}")
    if distractors < 0:
        raise ValueError(f"distractors: must be >= 0, got {distractors}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = FwPKM(dim, n_subkeys=n_subkeys, mem_k_dim=key_dim, mem_v_dim=value_dim, topk=topk,
                  chunk_size=chunk_size).eval()
    keys_tok = torch.randn(pairs, dim, generator=gen)
    vals_tok = torch.randn(pairs, dim, generator=gen)
    # first window: key_i value_i interleaved, padded with distractors to a full window
    first = torch.randn(chunk_size, dim, generator=gen)
    first[0:2 * pairs:2] = keys_tok
    first[1:2 * pairs:2] = vals_tok
    with torch.no_grad():
        q_keys, _, _ = layer.project(keys_tok.unsqueeze(0))
        _, v_vals, _ = layer.project(vals_tok.unsqueeze(0))
        v_vals = torch.nn.functional.normalize(v_vals[0], dim=-1)
    state = layer.init_state(batch_size=1)

    def recall() -> float:
        vhat = functional.memory_read(q_keys, state)[0]
        sim = torch.nn.functional.normalize(vhat, dim=-1) @ v_vals.T
        return float((sim.argmax(-1) == torch.arange(pairs)).float().mean())

    out(f"fwpkm demo: FwPKM(dim={dim}, n_subkeys={n_subkeys} -> {n_subkeys ** 2} slots, "
        f"dk={key_dim}, dv={value_dim}, topk={topk}, chunk={chunk_size}), random projections, "
        f"{pairs} associations, {distractors} distractor tokens, {torch.get_num_threads()} threads")
    with torch.no_grad():
        before = recall()
        _, state = layer(first.unsqueeze(0), state, flush=False, inplace=True)
        points = _checkpoints(distractors)
        results = {0: recall()}
        done, elapsed = 0, 0.0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=distractors, unit="tok", desc="distractors", dynamic_ncols=True)
        for target in points[1:]:
            while done < target:
                m = min(segment, target - done)
                x = torch.randn(1, m, dim, generator=gen)
                t0 = time.perf_counter()
                _, state = layer(x, state, flush=False, inplace=True)
                elapsed += time.perf_counter() - t0
                done += m
                if bar is not None:
                    bar.update(m)
                    bar.set_postfix(tok_s=f"{done / max(elapsed, 1e-9):,.0f}")
            results[target] = recall()
        if bar is not None:
            bar.close()
    tps = done / elapsed if elapsed else float("nan")
    tel = state.telemetry()
    out(f"recall before writing (chance {1 / pairs:.4f}): {before:.4f}")
    out(f"{'distractor tokens since written':>32} | recall")
    for d, acc in results.items():
        out(f"{d:>32,} | {acc:.4f}")
    out(f"memory: coverage {tel['coverage']:.3f}, collision rate {tel['collision_rate']:.3f}, "
        f"KL to uniform {tel['kl_uniform']:.3f} nats, mean gate {tel['mean_gate']:.3f}")
    out(f"throughput: {tps:,.0f} tokens/s over {done:,} streamed tokens "
        f"(layer forward incl. projections, in-place state, {torch.get_num_threads()} threads)")
    return {"recall": results, "recall_before": before, "tokens_per_s": tps, "telemetry": tel}


def add_demo_subcommand(sub) -> None:
    p = sub.add_parser("demo", help="show the memory learning at test time (no trained weights)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--distractors", type=int, default=131072, help="distractor tokens (default 131072)")
    p.add_argument("--pairs", type=int, default=256, help="associations written first (default 256)")
    p.add_argument("--n-subkeys", type=int, default=512)
    p.add_argument("--key-dim", type=int, default=512)
    p.add_argument("--value-dim", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--segment", type=int, default=4096, help="tokens per streaming call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: run_demo(
        dim=a.dim, n_subkeys=a.n_subkeys, key_dim=a.key_dim, value_dim=a.value_dim, topk=a.topk,
        chunk_size=a.chunk_size, pairs=a.pairs, distractors=a.distractors, segment=a.segment,
        seed=a.seed, threads=a.threads, progress=not a.no_progress) and None)
