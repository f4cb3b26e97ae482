"""What the evaluations measure (the commands: ``fwpkm eval ppl|memory``, ``fwpkm_ext.cli.eval``).

- held-out documents: the training run's validation split, read in order, each from a fresh
  memory, fast weights and the attention window carried across segments (``StreamingReader``);
  perplexity by position bucket tells whether the model gets better further into a book;
- memory report: how the fast-weight memory is used after reading a document: coverage (share of
  slots read), collision rate, KL of slot use to uniform, and write-gate statistics, per FwPKM
  layer.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .data import read_corpus, resolve_corpus, split_documents
from .run_args import training_args
from .stream import StreamReport, StreamingReader

__all__ = ["held_out_documents", "memory_report", "GateStats", "slot_stats"]


# --------------------------------------------------------------------------------------------
# Held-out documents (the training run's validation split)
# --------------------------------------------------------------------------------------------
def held_out_documents(corpus: Optional[str], ckpt: Optional[str] = None,
                       val_fraction: Optional[float] = None, seed: Optional[int] = None,
                       encoding_errors: Optional[str] = None,
                       ) -> Tuple[str, List[Tuple[str, str]], Dict[str, Any]]:
    """The validation documents ``(path, text)`` of a corpus, split exactly like ``fwpkm train``
    (``fwpkm_ext.data.split_documents`` over the non-empty documents). Unset arguments come from
    the checkpoint's ``train_args.json``, then the training defaults (0.1, seed 0, latin1).
    Returns (corpus, documents, the split settings used)."""
    targs = training_args(ckpt)
    if corpus is None:
        c = targs.get("corpus")
        corpus = c if isinstance(c, str) and os.path.isdir(c) else None
    corpus = resolve_corpus(corpus)
    vf = val_fraction if val_fraction is not None else float(targs.get("val_fraction", 0.1))
    sd = seed if seed is not None else int(targs.get("seed", 0))
    ee = encoding_errors or targs.get("encoding_errors") or "latin1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = read_corpus(corpus, ee)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if vf == 0.0:
        raise ValueError("--val-fraction 0 leaves no held-out documents")
    _, val = split_documents([p for p, _ in docs], vf, sd)
    by_path = dict(docs)
    return corpus, [(p, by_path[p]) for p in val], {"val_fraction": vf, "seed": sd,
                                                    "encoding_errors": ee}


# --------------------------------------------------------------------------------------------
# Memory report
# --------------------------------------------------------------------------------------------
class GateStats:
    """Write-gate g = sigmoid(to_g(...)) of one FwPKM layer, accumulated over a read through a
    forward hook on its ``to_g`` projection (mean, std, min, max, quantiles from a 1000-bin
    histogram, share of tokens with g > 0.5)."""

    BINS = 1000

    def __init__(self) -> None:
        self.n = 0
        self.s = 0.0
        self.s2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.hist = np.zeros(self.BINS, dtype=np.int64)

    def hook(self, _module, _inputs, out) -> None:
        g = torch.sigmoid(out.detach().double()).reshape(-1)
        if g.numel() == 0:
            return
        self.n += g.numel()
        self.s += float(g.sum())
        self.s2 += float((g * g).sum())
        self.lo = min(self.lo, float(g.min()))
        self.hi = max(self.hi, float(g.max()))
        idx = (g * self.BINS).long().clamp_(0, self.BINS - 1)
        self.hist += torch.bincount(idx, minlength=self.BINS).cpu().numpy()

    def quantile(self, q: float) -> float:
        if self.n == 0:
            return float("nan")
        c = np.cumsum(self.hist)
        i = int(np.searchsorted(c, q * self.n, side="left"))
        return (min(i, self.BINS - 1) + 0.5) / self.BINS

    def summary(self) -> Dict[str, float]:
        if self.n == 0:
            return {"gate_mean": float("nan")}
        mean = self.s / self.n
        var = max(0.0, self.s2 / self.n - mean * mean)
        above = float(self.hist[self.BINS // 2:].sum()) / self.n
        return {"gate_mean": mean, "gate_std": math.sqrt(var), "gate_min": self.lo,
                "gate_p10": self.quantile(0.1), "gate_p50": self.quantile(0.5),
                "gate_p90": self.quantile(0.9), "gate_max": self.hi, "gate_above_half": above}


def slot_stats(state) -> Dict[str, float]:
    """Slot use of a memory state: slots, slots read at least once, the largest share of reads
    one slot took, and the effective number of slots (exp of the entropy of the reads)."""
    reads = state.slot_reads
    N = state.values.shape[1]
    out = {"slots": float(N)}
    if reads is None:
        return out
    r = reads.double()
    tot = r.sum(1, keepdim=True).clamp_min(1)
    p = r / tot
    ent = torch.where(p > 0, -p * torch.log(p), torch.zeros_like(p)).sum(1)
    out.update(slots_used=float((reads > 0).sum(1).double().mean()),
               max_slot_share=float(p.max(1).values.mean()),
               effective_slots=float(torch.exp(ent).mean()))
    return out


def memory_report(reader: StreamingReader, doc) -> Tuple[StreamReport, Dict[int, Dict[str, float]]]:
    """Read ``doc`` and return (report, per-layer memory statistics: telemetry, slot and gate
    statistics)."""
    model = reader.model
    stats = {}
    handles = []
    for i, b in enumerate(model.blocks):
        if b.fwpkm is not None:
            stats[i] = GateStats()
            handles.append(b.fwpkm.to_g.register_forward_hook(stats[i].hook))
    try:
        rep = reader.read(doc)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, st in reader.cache.mem.items():
        d = dict(st.telemetry())
        d.update(slot_stats(st))
        d.update(stats[i].summary())
        out[i] = d
    return rep, out


if __name__ == "__main__":  # `python -m fwpkm_ext.evaluate ppl|memory ...`: the `fwpkm eval` command
    from fwpkm_ext.cli.eval import main

    sys.exit(main())
