"""`fwpkm eval ppl` (perplexity by position on held-out documents, a table and a PNG plot) and
`fwpkm eval memory` (how the fast-weight memory is used after reading a document)."""
from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, List, Optional, Sequence

from ..evaluate import held_out_documents, memory_report
from ..input_checks import check_corpus, check_document
from ..plots import plot_ppl
from ..stream import SyntheticTokens, open_document
from .common import (add_command, add_model_args, add_reader_args, add_split_args, byte_fallback,
                     check_model_args, check_outputs, command_main, load_model_from_args,
                     reader_from_args, write_json)


def add_subcommand(subparsers) -> None:
    """Registers ``eval`` (with ``ppl`` and ``memory``) on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="evaluate a model: perplexity by position, memory use",
                              description="Evaluation of the paper (small-scale versions).")
    sub = p.add_subparsers(dest="eval_cmd", metavar="{ppl,memory}")
    sub.required = True

    pp = add_command(sub, "ppl", eval_ppl_cmd, "perplexity by position on held-out documents",
                     "Held-out documents read in order, fast weights carried across segments; "
                     "perplexity by position bucket.")
    _add_reading_args(pp)
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

    pm = add_command(sub, "memory", eval_memory_cmd,
                     "memory usage statistics after reading a document",
                     "Coverage, collision rate, KL to uniform and gate statistics per FwPKM layer "
                     "after reading a document.")
    pm.add_argument("path", nargs="?", default=None,
                    help="a .txt/.txt.gz document (default: the first held-out document)")
    _add_reading_args(pm)
    g = pm.add_argument_group("input and output")
    g.add_argument("--synthetic-tokens", type=int, default=None, metavar="N",
                   help="read N random token ids instead of a document")
    g.add_argument("--seed", type=int, default=0, help="seed of --random-init and synthetic tokens")
    g.add_argument("--max-tokens", type=int, default=None, help="read at most N tokens")
    g.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")


def _add_reading_args(p: argparse.ArgumentParser) -> None:
    """The model, the held-out split and how documents are read (both eval commands)."""
    add_model_args(p)
    add_split_args(p)
    add_reader_args(p)


def eval_ppl_cmd(args: argparse.Namespace) -> int:
    """`fwpkm eval ppl`: held-out documents, perplexity by position bucket, table and plot."""
    # every path first: a wrong one must not wait for the model to load
    for f in args.files or ():
        check_document(f, "--files", args.force_binary)
    if args.corpus and not args.files:
        check_corpus(args.corpus, "--corpus", args.force_binary)
    check_model_args(args)
    check_outputs((("--json", args.json), ("--plot", None if args.no_plot else args.plot)))
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
    reader = reader_from_args(args, model, tok, batch_size=args.batch_size)
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


def eval_memory_cmd(args: argparse.Namespace) -> int:
    """`fwpkm eval memory`: memory usage statistics per FwPKM layer after reading a document."""
    # every path first: a wrong one must not wait for the model to load
    if args.path is not None:
        check_document(args.path, "path", args.force_binary)
    elif args.corpus and args.synthetic_tokens is None:
        check_corpus(args.corpus, "--corpus", args.force_binary)
    check_model_args(args)
    check_outputs((("--json", args.json),))
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
    reader = reader_from_args(args, model, tok)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fwpkm_ext.evaluate [eval] {ppl,memory} ...``"""
    return command_main(add_subcommand, "eval", argv)

