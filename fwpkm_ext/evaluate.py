"""Evaluation commands: ``fwpkm eval ppl`` and ``fwpkm eval memory`` (also
``python -m fwpkm_ext.evaluate ppl|memory ...``).

- ``eval ppl``: held-out documents (the training run's validation split) read in order, each from
  a fresh memory, fast weights and the attention window carried across segments; perplexity by
  position bucket (does the model get better further into a book?), a table and a PNG plot.
- ``eval memory``: how the fast-weight memory is used after reading a document: coverage (share
  of slots read), collision rate, KL of slot use to uniform, and write-gate statistics, per
  FwPKM layer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .stream import (
    StreamReport, StreamingReader, SyntheticTokens, _add_reader_args, add_model_args, byte_fallback,
    check_corpus, check_document, check_model_args, check_output_path, cli_errors,
    load_model_from_args, open_document, parse_update_chunk, write_json)

__all__ = ["add_eval_subcommands", "held_out_documents", "training_args", "eval_ppl_cmd",
           "eval_memory_cmd", "plot_ppl", "memory_report", "GateStats", "have_matplotlib", "main"]


# --------------------------------------------------------------------------------------------
# Held-out documents (the training run's validation split)
# --------------------------------------------------------------------------------------------
def training_args(ckpt: Optional[str]) -> Dict[str, Any]:
    """``train_args.json`` of a checkpoint directory ({} when absent or unreadable)."""
    if not ckpt:
        return {}
    path = os.path.join(ckpt, "train_args.json")
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def held_out_documents(corpus: Optional[str], ckpt: Optional[str] = None,
                       val_fraction: Optional[float] = None, seed: Optional[int] = None,
                       encoding_errors: Optional[str] = None,
                       ) -> Tuple[str, List[Tuple[str, str]], Dict[str, Any]]:
    """The validation documents ``(path, text)`` of a corpus, split exactly like ``fwpkm train``
    (``fwpkm_ext.data.split_documents`` over the non-empty documents). Unset arguments come from
    the checkpoint's ``train_args.json``, then the training defaults (0.1, seed 0, latin1).
    Returns (corpus, documents, the split settings used)."""
    from .data import read_corpus, resolve_corpus, split_documents

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


def _add_split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("held-out split (defaults: the checkpoint's train_args.json)")
    g.add_argument("--corpus", default=None,
                   help="directory of .txt/.txt.gz files (default: the training corpus, else "
                        "../shared/data/gutenberg)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="validation share used in training (default: from the checkpoint, 0.1)")
    g.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/validation split (default: from the checkpoint, 0)")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _figure(w: float, h: float):
    """A matplotlib Figure with an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_ppl(report: StreamReport, path: str, title: str = "") -> bool:
    """Perplexity by position bucket as a PNG; False (nothing written) without matplotlib."""
    if not have_matplotlib():
        return False
    bs = [b for b in report.buckets if b.tokens]
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(bs)))  # buckets double in width: evenly spaced = log scale
    ax.plot(xs, [b.ppl for b in bs], marker="o")
    ax.set_xticks(xs)
    ax.set_xticklabels([b.label for b in bs], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "perplexity by position", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------------------------
# eval ppl
# --------------------------------------------------------------------------------------------
def eval_ppl_cmd(args: argparse.Namespace) -> int:
    """`fwpkm eval ppl`: held-out documents, perplexity by position bucket, table and plot."""
    # every path first: a wrong one must not wait for the model to load
    for f in args.files or ():
        check_document(f, "--files", args.force_binary)
    if args.corpus and not args.files:
        check_corpus(args.corpus, "--corpus", args.force_binary)
    check_model_args(args)
    for name, out in (("--json", args.json), ("--plot", None if args.no_plot else args.plot)):
        if out:
            check_output_path(out, name)
    model, tok = load_model_from_args(args, seed=0)
    tok = byte_fallback(model, tok)
    if args.files:
        # Paths: read as files whatever their names end with
        docs: List[Any] = [pathlib.Path(f) for f in args.files]
        split = {"files": list(args.files)}
        corpus = None
    else:
        corpus, held, split = held_out_documents(args.corpus, args.model, args.val_fraction,
                                                 args.split_seed, args.encoding_errors)
        if not held:
            raise ValueError(f"no held-out documents in {corpus}")
        docs = [p for p, _ in held]
    if args.max_docs is not None:
        docs = docs[: args.max_docs]
    sources = []
    for d in docs:
        src = open_document(d, tok, args.encoding_errors)
        if args.max_tokens is not None:
            src.limit(args.max_tokens)
        sources.append(src)
    reader = StreamingReader(model, segment_tokens=args.segment_tokens or 2048,
                             update_chunk=parse_update_chunk(args.update_chunk),
                             batch_size=args.batch_size, bucket_tokens=args.bucket_tokens or 1024,
                             progress=not args.no_progress, tokenizer=tok)
    print(f"eval ppl: {len(sources)} document(s)"
          + (f" held out from {corpus} (val_fraction={split['val_fraction']}, "
             f"seed={split['seed']})" if corpus else ""), flush=True)
    rep = reader.read_many(sources)
    for d in rep.documents:
        print(f"  {os.path.basename(d['name'])}: {d['tokens']} tokens, nll {d['nll']:.4f}, "
              f"ppl {d['ppl']:.2f}")
    print(rep.table())
    for line in rep.telemetry_lines():
        print(line)
    print(rep.summary(), flush=True)
    if not args.no_plot:
        if plot_ppl(rep, args.plot, title=f"{args.model or 'random-init'}: perplexity by position"):
            print(f"plot written to {args.plot}")
        else:
            print("plot skipped: it needs matplotlib (pip install matplotlib); the table above "
                  "has the same numbers")
    if args.json:
        d = rep.to_dict()
        d.update(model=args.model, corpus=corpus, split=split)
        write_json(args.json, d)
    return 0


# --------------------------------------------------------------------------------------------
# eval memory
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


def _slot_stats(state) -> Dict[str, float]:
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
        d.update(_slot_stats(st))
        d.update(stats[i].summary())
        out[i] = d
    return rep, out


def eval_memory_cmd(args: argparse.Namespace) -> int:
    """`fwpkm eval memory`: memory usage statistics per FwPKM layer after reading a document."""
    # every path first: a wrong one must not wait for the model to load
    if args.path is not None:
        check_document(args.path, "path", args.force_binary)
    elif args.corpus and args.synthetic_tokens is None:
        check_corpus(args.corpus, "--corpus", args.force_binary)
    check_model_args(args)
    if args.json:
        check_output_path(args.json, "--json")
    model, tok = load_model_from_args(args, seed=args.seed)
    if not model.cfg.fwpkm_layers:
        raise ValueError("the model has no FwPKM layer (fwpkm_layers is empty)")
    if args.path is not None and args.synthetic_tokens is not None:
        raise ValueError("give a document PATH or --synthetic-tokens N, not both")
    if args.synthetic_tokens is not None:
        doc: Any = SyntheticTokens(args.synthetic_tokens, model.cfg.vocab_size, args.seed)
        name = f"{args.synthetic_tokens} synthetic tokens"
    elif args.path is not None:
        tok = byte_fallback(model, tok)
        doc, name = pathlib.Path(args.path), args.path
    else:
        tok = byte_fallback(model, tok)
        corpus, held, _ = held_out_documents(args.corpus, args.model, args.val_fraction,
                                             args.split_seed, args.encoding_errors)
        if not held:
            raise ValueError(f"no held-out documents in {corpus}")
        doc = name = held[0][0]
    src = open_document(doc, tok, args.encoding_errors)
    if args.max_tokens is not None:
        src.limit(args.max_tokens)
    reader = StreamingReader(model, segment_tokens=args.segment_tokens or 2048,
                             update_chunk=parse_update_chunk(args.update_chunk),
                             bucket_tokens=args.bucket_tokens or 1024,
                             progress=not args.no_progress, tokenizer=tok)
    rep, stats = memory_report(reader, src)
    print(f"eval memory: {name}: {rep.tokens} tokens, ppl {rep.ppl:.2f}, "
          f"update chunk {'full read' if rep.update_chunk is None else rep.update_chunk}")
    keys = ["coverage", "collision_rate", "kl_uniform", "slots_used", "effective_slots",
            "max_slot_share", "gate_mean", "gate_std", "gate_min", "gate_p10", "gate_p50",
            "gate_p90", "gate_max", "gate_above_half"]
    layers = sorted(stats)
    print(f"{'statistic':<18}" + "".join(f"{'layer ' + str(i):>14}" for i in layers))
    for k in keys:
        vals = [stats[i].get(k, float("nan")) for i in layers]
        print(f"{k:<18}" + "".join(f"{v:>14.6g}" for v in vals))
    print(rep.summary(), flush=True)
    if args.json:
        write_json(args.json, {"document": name, "tokens": rep.tokens, "ppl": rep.ppl,
                               "update_chunk": rep.update_chunk,
                               "layers": {str(i): stats[i] for i in layers}})
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_eval_subcommands(subparsers) -> None:
    """Registers ``eval`` (with ``ppl`` and ``memory``) on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="evaluate a model: perplexity by position, memory use",
                              description="Evaluation of the paper (small-scale versions).")
    sub = p.add_subparsers(dest="eval_cmd", metavar="{ppl,memory}")
    sub.required = True

    pp = sub.add_parser("ppl", help="perplexity by position on held-out documents",
                        description="Held-out documents read in order, fast weights carried "
                                    "across segments; perplexity by position bucket.")
    add_model_args(pp)
    _add_split_args(pp)
    _add_reader_args(pp, segment_default=None)
    g = pp.add_argument_group("documents and output")
    g.add_argument("--files", nargs="+", default=None, metavar="PATH",
                   help="these documents instead of the held-out split")
    g.add_argument("--max-docs", type=int, default=None, help="read at most N documents")
    g.add_argument("--max-tokens", type=int, default=None, help="read at most N tokens per document")
    g.add_argument("--batch-size", type=int, default=1,
                   help="documents read side by side (one memory each; default 1)")
    g.add_argument("--plot", default="ppl_by_position.png", help="PNG plot path (needs matplotlib)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    pp.set_defaults(func=cli_errors(eval_ppl_cmd))

    pm = sub.add_parser("memory", help="memory usage statistics after reading a document",
                        description="Coverage, collision rate, KL to uniform and gate statistics "
                                    "per FwPKM layer after reading a document.")
    pm.add_argument("path", nargs="?", default=None,
                    help="a .txt/.txt.gz document (default: the first held-out document)")
    add_model_args(pm)
    _add_split_args(pm)
    _add_reader_args(pm, segment_default=None)
    g = pm.add_argument_group("input and output")
    g.add_argument("--synthetic-tokens", type=int, default=None, metavar="N",
                   help="read N random token ids instead of a document")
    g.add_argument("--seed", type=int, default=0, help="seed of --random-init and synthetic tokens")
    g.add_argument("--max-tokens", type=int, default=None, help="read at most N tokens")
    g.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    pm.set_defaults(func=cli_errors(eval_memory_cmd))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fwpkm_ext.evaluate",
                                     description="FwPKM evaluation commands")
    sub = parser.add_subparsers(dest="command", metavar="{eval}")
    sub.required = True
    add_eval_subcommands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fwpkm_ext.evaluate [eval] {ppl,memory} ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "eval":
        argv = ["eval"] + argv
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
