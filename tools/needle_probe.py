"""Why a model does or does not retrieve needles: how its FwPKM queries address them.

    python tools/needle_probe.py CKPT [--corpus DIR] [--needles 6] [--samples 8]

Builds training-like sequences (held-out text, `--needles` facts in the first quarter and their
queries in the second half, as `fwpkm train --needles-per-seq`), runs the model once, and for
each FwPKM layer compares the query vector q at the token before each answer ("... is ") with q
at the same token of every fact. Retrieval needs q(query) to match its own fact's q better than
the other facts' (they share the template and differ only in the ID). Prints the mean cosine to
the own fact, to the other facts, to random tokens, the share of queries whose nearest fact is
their own, and the mean memory gate g at the queries.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fwpkm_ext.data import insert_needles  # noqa: E402
from fwpkm_ext.evaluate import held_out_documents  # noqa: E402
from fwpkm_ext.pretrained import load_checkpoint  # noqa: E402


@torch.no_grad()
def probe(model, tok, text_ids: np.ndarray, needles: int, samples: int, seq_len: int = 4096):
    blocks = [(i, b) for i, b in enumerate(model.blocks) if b.fwpkm is not None]
    if not blocks:
        raise ValueError("the model has no FwPKM layer")
    stats = {i: {"own": [], "other": [], "random": [], "top1": [], "gate": []} for i, _ in blocks}
    gen = torch.Generator().manual_seed(0)
    for s in range(samples):
        off = (s * 7919 * 13) % max(1, len(text_ids) - seq_len - 1)
        base = text_ids[off: off + seq_len + 1].copy()
        answers: list = []
        seq = insert_needles(base, tok, random.Random(s), 1.0, count=needles, answers=answers)
        answers = sorted(answers)
        runs = [p for j, p in enumerate(answers) if j == 0 or answers[j - 1] != p - 1]
        qpos = [p - 1 for p in runs]
        facts = []
        for p in qpos:  # the same 9 tokens ending at the answer's previous token, earlier
            pat = seq[p - 8: p + 1]
            hit = [t for t in range(8, p - 64) if np.array_equal(seq[t - 8: t + 1], pat)]
            facts.append(hit[0] if hit else None)
        keep = [(q, f) for q, f in zip(qpos, facts) if f is not None]
        if len(keep) < 2:
            continue
        cap = {}
        hooks = [b.fwpkm.register_forward_hook(
            lambda m, inp, out, i=i: cap.__setitem__(i, inp[0])) for i, b in blocks]
        model(torch.from_numpy(seq[:-1])[None], use_cache=False)
        for h in hooks:
            h.remove()
        for i, b in blocks:
            q, _, g = b.fwpkm.project(cap[i])
            qn = torch.nn.functional.normalize(q[0].reshape(q.shape[1], -1), dim=-1)
            Q = qn[[q_ for q_, _ in keep]]
            F = qn[[f for _, f in keep]]
            cos = Q @ F.T
            n = len(keep)
            eye = torch.eye(n, dtype=torch.bool)
            st = stats[i]
            st["own"].append(float(cos[eye].mean()))
            st["other"].append(float(cos[~eye].mean()))
            rnd = torch.randint(0, qn.shape[0], (256,), generator=gen)
            st["random"].append(float((Q @ qn[rnd].T).mean()))
            st["top1"].append(float((cos.argmax(1) == torch.arange(n)).float().mean()))
            st["gate"].append(float(g[0, [q_ for q_, _ in keep]].float().mean()))
    return {i: {k: float(np.mean(v)) if v else float("nan") for k, v in st.items()}
            for i, st in stats.items()}


@torch.no_grad()
def collapse(model, text_ids: np.ndarray, n_tokens: int):
    """Query spread and slot usage of each FwPKM layer over one read of ``n_tokens`` tokens."""
    import dataclasses

    x_ids = torch.from_numpy(np.asarray(text_ids[:n_tokens], dtype=np.int64))[None]
    blocks = [(i, b) for i, b in enumerate(model.blocks) if b.fwpkm is not None]
    cap = {}
    hooks = [b.fwpkm.register_forward_hook(
        lambda m, inp, out, i=i: cap.__setitem__(i, inp[0])) for i, b in blocks]
    model(x_ids, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for i, b in blocks:
        q, _, _ = b.fwpkm.project(cap[i])
        qq = q[0].reshape(q.shape[1], -1).double()
        qc = qq - qq.mean(0)
        ev = torch.linalg.eigvalsh(qc.T @ qc / qc.shape[0])
        r = {"q_norm": float(qq.norm(dim=-1).mean()), "mean_q_norm": float(qq.mean(0).norm()),
             "participation": float(ev.sum() ** 2 / (ev ** 2).sum()), "dims": qq.shape[1]}
        base = b.fwpkm.config
        try:
            for name, over in (("normal", {}), ("keys frozen", {"addr_loss_weight": 0.0}),
                               ("no updates", {"lr": 0.0})):
                b.fwpkm.config = dataclasses.replace(base, **over)
                _, st = b.fwpkm(cap[i], state=b.fwpkm.init_state(1), flush=True)
                t = st.telemetry()
                r[name] = (t["coverage"], t["collision_rate"])
        finally:
            b.fwpkm.config = base
        out[i] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--needles", type=int, default=6)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--collapse-tokens", type=int, default=8192)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_checkpoint(a.ckpt)
    _, docs, _ = held_out_documents(a.corpus, a.ckpt)
    ids = np.concatenate([np.asarray(tok.encode(t), dtype=np.int64) for _, t in docs])
    res = probe(model, tok, ids, a.needles, a.samples)
    print(f"{'layer':>5} {'cos own fact':>12} {'cos other facts':>15} {'cos random':>10} "
          f"{'own fact nearest':>16} {'gate at query':>13}")
    for i, r in res.items():
        print(f"{i:>5} {r['own']:>12.3f} {r['other']:>15.3f} {r['random']:>10.3f} "
              f"{r['top1']:>16.1%} {r['gate']:>13.3f}")
    first = np.asarray(tok.encode(docs[0][1]), dtype=np.int64)
    print(f"\nquery spread and slot usage over {min(a.collapse_tokens, len(first))} tokens of "
          f"{os.path.basename(docs[0][0])}:")
    for i, r in collapse(model, first, a.collapse_tokens).items():
        print(f"layer {i}: |q| {r['q_norm']:.1f}, |mean q| {r['mean_q_norm']:.1f}, "
              f"participation ratio {r['participation']:.1f} of {r['dims']} dims")
        for name in ("normal", "keys frozen", "no updates"):
            cov, col = r[name]
            print(f"  {name:>12}: coverage {cov:.4%}, collision rate {col:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
