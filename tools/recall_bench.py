"""Associative-recall benchmark for memory layers (MQAR style, fwpkm_ext.recall).

Trains one small LM per configuration on the same batches (same seed) and reports, for each:
recall of the value tokens at fact-to-query distances far beyond the attention window, the
participation ratio of the memory's queries, slot coverage and collision rate of one read, and
wall time. Each configuration is a few minutes on 2 threads; run them one at a time.

    python tools/recall_bench.py                       # every configuration, table on stdout
    python tools/recall_bench.py --only fwpkm,batch    # some of them
    python tools/recall_bench.py --json out.json       # also write the numbers
    python tools/recall_bench.py --list                # the configurations
    python tools/recall_bench.py --setting easy        # the exploratory, easier setting

The model: 2 layers, dim 128, sliding-window attention of 32 tokens. Keys are 2 tokens, values 1
token, 16 facts per sequence; training sequences are 512 tokens with every query at least 64
tokens after its fact. A memory that works recalls the value (chance: 1/64); attention cannot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fwpkm_ext.model import LM, LMConfig  # noqa: E402
from fwpkm_ext.recall import IGNORE, RecallTask, train_recall  # noqa: E402

TASK = RecallTask(n_filler=128, n_keys=32, n_values=64, key_len=2, n_pairs=16)
BASE = dict(vocab_size=TASK.vocab_size, dim=128, n_layers=2, n_heads=2, window=32)
# FwPKM sublayer before the attention of layer 1 (after one attention + MLP block, as the bundled
# model), 64^2 = 4,096 slots, written every 64 tokens, reading through a width-2 short conv so
# the query at a key's last token sees the whole key
FW = dict(fwpkm_layers=[1], fwpkm_n_subkeys=64, fwpkm_k_dim=64, fwpkm_v_dim=128, fwpkm_topk=8,
          fwpkm_chunk_size=64, fwpkm_short_conv=2)
BEST = dict(fwpkm_query_norm="batch", fwpkm_init_values="zero")

CONFIGS: Dict[str, Dict] = {
    "swa": {},                                                   # attention only
    "pkm": dict(pkm_layers=[1], pkm_n_subkeys=64, pkm_k_dim=64),  # static PKM replacing layer 1's MLP
    "fwpkm": FW,                                                 # the paper's layer (+ short conv)
    "fwpkm-noconv": {**FW, "fwpkm_short_conv": 0},
    "batch": {**FW, "fwpkm_query_norm": "batch"},
    "zscore": {**FW, "fwpkm_query_norm": "zscore"},
    "l2": {**FW, "fwpkm_query_norm": "l2"},
    "zero-values": {**FW, "fwpkm_init_values": "zero"},
    "learned-keys": {**FW, "fwpkm_learn_init_keys": True},
    "carried-keys": {**FW, "fwpkm_carry_keys": True},
    "gate-bias+2": {**FW, "fwpkm_gate_bias": 2.0},
    "addr-w5": {**FW, "fwpkm_addr_loss_weight": 5.0},
    "layer0": {**FW, "fwpkm_layers": [0]},
    "layers01": {**FW, "fwpkm_layers": [0, 1]},
    "batch+zero": {**FW, **BEST},
    "batch+zero+learned-keys": {**FW, **BEST, "fwpkm_learn_init_keys": True},
    "batch+zero+carried-keys": {**FW, **BEST, "fwpkm_carry_keys": True},
    "batch+zero+layers01": {**FW, **BEST, "fwpkm_layers": [0, 1]},
    # the bundled model's recipe: memory at layer 0 (reading the embeddings through the conv)
    "layer0+batch+zero": {**FW, **BEST, "fwpkm_layers": [0]},
}

DISTANCES = (1024, 4096, 16384, 32768)

# `--setting easy`: the exploratory setting that came first (8 facts per 256-token training
# sequence, queries >= 32 tokens after their facts, memory written every 32 tokens, 200 steps)
SETTINGS = {
    "standard": dict(task=TASK, seq_len=512, min_gap=64, steps=300, distances=DISTANCES, model={}),
    "easy": dict(task=RecallTask(n_filler=128, n_keys=32, n_values=64, key_len=2, n_pairs=8),
                 seq_len=256, min_gap=32, steps=200, distances=(1024, 4096),
                 model=dict(fwpkm_chunk_size=32)),
}


def build(name: str, seed: int = 0, setting: str = "standard") -> LM:
    torch.manual_seed(seed)
    st = SETTINGS[setting]
    extra = {k: v for k, v in st["model"].items() if CONFIGS[name].get("fwpkm_layers")}
    return LM(LMConfig(**{**BASE, "vocab_size": st["task"].vocab_size, **CONFIGS[name], **extra}))


def participation_ratio(q: torch.Tensor) -> float:
    """Effective number of dimensions of a cloud of vectors (rows): (sum l)^2 / sum l^2 of the
    covariance eigenvalues."""
    q = q.double()
    q = q - q.mean(0)
    ev = torch.linalg.eigvalsh(q.T @ q / max(1, q.shape[0] - 1)).clamp_min(0)
    return float(ev.sum() ** 2 / (ev.pow(2).sum() + 1e-30))


@torch.no_grad()
def evaluate(model: LM, distances=DISTANCES, batch: int = 4, seed: int = 123, task: RecallTask = TASK) -> Dict:
    """Recall by distance (one streamed read per sequence, one memory per sequence), and the
    query spread / slot use of the first FwPKM layer over the longest read."""
    model.eval()
    gen = np.random.default_rng(seed)
    out: Dict = {"recall": {}}
    fw_idx = model.cfg.fwpkm_layers[0] if model.cfg.fwpkm_layers else None
    for d in distances:
        x, y = task.at_distance(gen, batch, d)
        captured: List[torch.Tensor] = []
        hook = None
        if fw_idx is not None:
            fw = model.blocks[fw_idx].fwpkm
            hook = fw.register_forward_hook(
                lambda mod, inp, res: captured.append(mod.project(inp[0])[0].reshape(-1, mod.config.key_dim)))
        try:
            logits, cache = model(x, cache=model.init_cache(batch_size=batch))
        finally:
            if hook is not None:
                hook.remove()
        sel = y != IGNORE
        c = int((logits[sel].argmax(-1) == y[sel]).sum())
        n = int(sel.sum())
        out["recall"][str(d)] = {"correct": c, "total": n, "acc": c / n}
        if fw_idx is not None and d == max(distances):
            tel = cache.mem[fw_idx].telemetry()
            q = torch.cat(captured)[:8192]
            out.update(query_pr=participation_ratio(q), coverage=tel["coverage"],
                       collision_rate=tel["collision_rate"], mean_gate=tel["mean_gate"])
    return out


def run(name: str, steps: int, seed: int, log=None, setting: str = "standard") -> Dict:
    st = SETTINGS[setting]
    model = build(name, seed, setting)
    t0 = time.time()
    last = train_recall(model, st["task"], steps=steps, batch_size=8, seq_len=st["seq_len"],
                        min_gap=st["min_gap"], lr=3e-3, seed=seed, log=log,
                        log_every=max(1, steps // 6))
    train_s = time.time() - t0
    t1 = time.time()
    ev = evaluate(model, st["distances"], task=st["task"])
    return {"name": name, "config": CONFIGS[name], "setting": setting, "steps": steps,
            "train_acc": last.get("train_acc"), "train_seconds": train_s,
            "eval_seconds": time.time() - t1, **ev}


def table(rows: List[Dict]) -> str:
    dists = [int(d) for d in rows[0]["recall"]] if rows else list(DISTANCES)
    head = ["config", "train acc"] + [f"recall @{d // 1024}K" for d in dists] + \
        ["query PR", "coverage", "collisions", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rec = [f"{r['recall'][str(d)]['acc']:.1%} ({r['recall'][str(d)]['correct']}/{r['recall'][str(d)]['total']})"
               for d in dists]
        extra = [f"{r['query_pr']:.1f}", f"{r['coverage']:.1%}", f"{r['collision_rate']:.2f}"] \
            if "query_pr" in r else ["-", "-", "-"]
        lines.append("| " + " | ".join([r["name"], f"{r['train_acc']:.1%}"] + rec + extra
                                      + [f"{r['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--setting", default="standard", choices=sorted(SETTINGS),
                   help="task and schedule (default standard; easy: the exploratory one)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per configuration (standard 300, easy 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write every row to this file (rewritten after each)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    a = p.parse_args(argv)
    if a.list:
        for k, v in CONFIGS.items():
            print(f"{k:28s} {json.dumps(v)}")
        return 0
    names = list(CONFIGS) if not a.only else [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--only: unknown configurations {unknown}; see --list")
    steps = a.steps if a.steps is not None else SETTINGS[a.setting]["steps"]
    if steps < 1:
        p.error("--steps must be positive")
    torch.set_num_threads(a.threads)
    rows = []
    for name in names:
        print(f"== {name} {json.dumps(CONFIGS[name])}", flush=True)
        r = run(name, steps, a.seed, log=lambda rec: print(f"   {rec}", flush=True), setting=a.setting)
        rows.append(r)
        print(f"   recall: " + ", ".join(f"{d}: {v['acc']:.1%}" for d, v in r["recall"].items())
              + f" | train {r['train_seconds']:.0f}s eval {r['eval_seconds']:.0f}s", flush=True)
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                st = SETTINGS[a.setting]
                json.dump({"setting": a.setting, "task": st["task"].__dict__, "base": BASE,
                           "seq_len": st["seq_len"], "min_gap": st["min_gap"],
                           "threads": a.threads, "rows": rows}, f, indent=1)
            os.replace(a.json + ".tmp", a.json)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
