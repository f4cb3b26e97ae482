"""What `fwpkm demo` (the main job) runs; its options: ``fwpkm_ext.cli.demo``.

Default: the bundled FwPKM language model (``fwpkm_ext.pretrained``) reads a long text with five
needle facts at random depths and answers a question on each, after one read (1-iter) and after
a first read written into its fast weights (2-iter); see :func:`run_lm_demo`.

``--synthetic``: the memory learning at test time, with no trained weights.

A FwPKM layer with fixed random projections reads a stream of random token embeddings. The first
window holds `pairs` associations "key token, value token" (the layer writes the value token's
z-scored projection at the slots the key token reads: its target is the next token). Then
`distractors` random tokens follow, each writing its own association and overwriting slots.
At checkpoints along the stream every key token is read again (a pure read: nothing is written)
and counted correct when the read-out vector is closer (cosine) to its own value token's
projection than to any other of the `pairs` value tokens (chance: 1 / pairs).
"""
from __future__ import annotations

import random
import time
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from . import functional
from .layers import FwPKM
from .niah import build_sample, evaluate_samples, haystack_tokens
from .pretrained import default_haystack, load_default_model


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


def run_lm_demo(model=None, tok=None, *, length: int = 16384, haystack=None, seed: int = 0,
                segment: int = 2048, threads: Optional[int] = None, out=print) -> Dict:
    """Needles in a haystack with a trained LM (default: the bundled model): 5 needle facts at
    random depths of a ``length``-token text, then each question, answered after reading the
    text once (1-iter: the memory has written nothing yet) and after a first read that wrote
    the whole text into the fast weights (2-iter). ``haystack``: ``(path, text)`` pairs
    (default: the bundled haystack text). Returns the records and throughput."""
    if threads:
        torch.set_num_threads(threads)
    if model is None:
        model, tok = load_default_model()
    if tok is None:
        raise ValueError("tok: the LM demo needs the model's tokenizer")
    if haystack is None:
        haystack = [default_haystack()]
    hay = haystack_tokens(haystack, tok)
    sample = build_sample(hay, tok, length, random.Random(seed))
    n_mem = len(model.cfg.fwpkm_layers)
    out(f"fwpkm demo: {model.cfg.n_layers}-layer LM, dim {model.cfg.dim}, attention window "
        f"{model.cfg.window}, FwPKM at layers {model.cfg.fwpkm_layers} "
        f"({model.cfg.fwpkm_n_subkeys ** 2:,} slots each); {length:,}-token text with 5 needles "
        f"\"The secret number for ID-xxxx is dddddd.\", {torch.get_num_threads()} threads")
    if not n_mem:
        out("note: this model has no FwPKM layer; only its attention window can answer")
    t0 = time.perf_counter()
    recs = evaluate_samples(model, tok, [sample], [1, 2], segment_tokens=segment)
    wall = time.perf_counter() - t0
    read = 3 * len(sample.context)  # 1-iter pass, then 2-iter's writing pass and final pass
    out(f"{'needle':>24} {'depth':>6} | {'1-iter answer':>14} | {'2-iter answer':>14}")
    by = {(r["iters"], r["needle"]): r for r in recs}
    for j, nd in enumerate(sample.needles):
        cells = []
        for n in (1, 2):
            r = by[(n, j)]
            ans = r["answer"].strip().split("\n")[0][:10]
            cells.append(f"{ans!r:>12} {'ok' if r['correct'] else '--'}")
        out(f"ID-{nd.key} is {nd.number} {nd.depth:>6.2f} | {cells[0]:>14} | {cells[1]:>14}")
    acc = {n: sum(r["correct"] for r in recs if r["iters"] == n) / len(sample.needles)
           for n in (1, 2)}
    out(f"exact answers: 1-iter {acc[1]:.0%}, 2-iter {acc[2]:.0%} "
        f"(the 2-iter read is the memory at work: attention sees only the last "
        f"{model.cfg.window} tokens)")
    out(f"read {read:,} tokens in {wall:.1f} s ({read / wall:,.0f} tokens/s incl. answers)")
    out("the memory layer alone, with random projections: fwpkm demo --synthetic; how the bundled "
        "model was trained and evaluated: docs/RESULTS.md")
    return {"records": recs, "accuracy": acc, "tokens_per_s": read / wall, "wall_s": wall}
