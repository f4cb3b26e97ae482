"""`fwpkm niah`: needle-in-a-haystack accuracy by context length, n-iter and needle depth (the
protocol: ``fwpkm_ext.niah``), as a table, JSON and a heatmap."""
from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional, Sequence

from ..data import check_wording, read_document
from ..evaluate import held_out_documents
from ..input_checks import check_corpus, check_document
from ..niah import NEEDLES, format_table, haystack_tokens, run_niah
from ..plots import plot_heatmap
from ..stream import format_tokens
from .common import (add_command, add_encoding_args, add_model_args, add_split_args, byte_fallback,
                     check_model_args, check_outputs, command_main, load_model_from_args,
                     parse_update_chunk, write_json)


def add_subcommand(subparsers) -> None:
    """Registers ``niah`` on an argparse subparsers object."""
    p = add_command(
        subparsers, "niah", niah_cmd, "needle-in-a-haystack accuracy by length, n-iter and depth",
        "SPEC needle protocol: 5 needles 'The secret number for ID-xxxx is dddddd.' in held-out "
        "book text, greedy decoding, exact match; n-iter reads the haystack n-1 extra times "
        "first (memory kept).")
    add_model_args(p)
    add_split_args(p)
    g = p.add_argument_group("protocol")
    g.add_argument("--lengths", default="4096,16384,32768,131072",
                   help="context lengths in tokens, comma-separated (k suffix allowed)")
    g.add_argument("--iters", default="1,2", help="n-iter values, comma-separated (default 1,2)")
    g.add_argument("--samples", type=int, default=10, help="samples per length (5 needles each)")
    g.add_argument("--seed", type=int, default=0, help="seed of the samples (and --random-init)")
    g.add_argument("--update-chunk", default="full",
                   help="FwPKM update window: 'full' (default: the whole input, SPEC), 'model' "
                        "or a number of tokens")
    g.add_argument("--wording", default=None, metavar="FORMAT",
                   help="needle wording with one {key} and one {number}; the query is the text "
                        "before {number} (default SPEC's: 'The secret number for ID-{key} is "
                        "{number}.')")
    g.add_argument("--segment-tokens", type=int, default=2048, help="tokens per forward call")
    g.add_argument("--batch-size", type=int, default=1, help="samples read side by side")
    g.add_argument("--depth-buckets", type=int, default=5, help="needle-depth buckets (default 5)")
    g.add_argument("--max-new-tokens", type=int, default=8, help="greedy decoding budget")
    g.add_argument("--haystack", nargs="+", default=None, metavar="PATH",
                   help="haystack documents instead of the held-out split")
    add_encoding_args(g)
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, metavar="OUT", help="results JSON")
    g.add_argument("--plot", default=None,
                   help="heatmap PNG (default: OUT.png next to --json, else niah.png)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-progress", action="store_true")


def int_list(s: str, name: str) -> List[int]:
    """Comma-separated positive integers, a k suffix meaning x1024 ("4k,16384")."""
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            mult, part = 1024, part[:-1]
        try:
            v = int(part) * mult
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated integers, got {s!r}") from None
        if v < 1:
            raise ValueError(f"{name}: values must be positive, got {v}")
        out.append(v)
    if not out:
        raise ValueError(f"{name}: empty list")
    return out


def niah_cmd(args: argparse.Namespace) -> int:
    """`fwpkm niah`: needle-in-a-haystack accuracy by length, n-iter and depth."""
    if args.wording is not None:
        check_wording(args.wording)
    lengths = int_list(args.lengths, "--lengths")
    iters = sorted(set(int_list(args.iters, "--iters")))
    # every path first: a wrong one must not wait for the model to load
    for p in args.haystack or ():
        check_document(p, "--haystack", args.force_binary)
    if args.corpus and not args.haystack:
        check_corpus(args.corpus, "--corpus", args.force_binary)
    check_model_args(args)
    plot = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else "niah.png")
    check_outputs((("--json", args.json), ("--plot", None if args.no_plot else plot)))
    model, tok = load_model_from_args(args, seed=args.seed)
    tok = byte_fallback(model, tok)
    if args.haystack:
        docs = [(p, read_document(p, args.encoding_errors)) for p in args.haystack]
        corpus, split = None, {"files": list(args.haystack)}
    else:
        try:
            corpus, docs, split = held_out_documents(args.corpus, args.model, args.val_fraction,
                                                     args.split_seed, args.encoding_errors)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}; or hide the needles in your own text with "
                                    f"--haystack PATH [PATH ...]") from None
        if not docs:
            raise ValueError(f"no held-out documents in {corpus}")
    hay = haystack_tokens(docs, tok)
    chunk = parse_update_chunk(args.update_chunk)
    if chunk == "model":
        chunk = model.cfg.fwpkm_chunk_size
    print(f"niah: lengths {[format_tokens(L) for L in lengths]}, iters {iters}, {args.samples} "
          f"sample(s) x {NEEDLES} needles, seed {args.seed}, haystack {len(hay)} tokens from "
          f"{len(docs)} document(s), update chunk {'whole input' if chunk is None else chunk}",
          flush=True)
    t0 = time.perf_counter()
    out = run_niah(model, tok, hay, lengths, iters, args.samples, seed=args.seed,
                   segment_tokens=args.segment_tokens, update_chunk=chunk,
                   batch_size=args.batch_size, depth_buckets=args.depth_buckets,
                   max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                   wording=args.wording)
    print(format_table(out["results"]))
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    payload = {
        "model": args.model or f"random-init {args.preset}",
        "lengths": lengths, "iters": iters, "samples": args.samples, "needles": NEEDLES,
        "seed": args.seed, "update_chunk": chunk, "wording": args.wording, "segment_tokens": args.segment_tokens,
        "depth_buckets": args.depth_buckets, "corpus": corpus, "split": split,
        "documents": [p for p, _ in docs], "haystack_tokens": int(len(hay)),
        "accuracy": {str(r["length"]): {} for r in out["results"]},
        **out,
    }
    for r in out["results"]:
        payload["accuracy"][str(r["length"])][str(r["iters"])] = r["accuracy"]
    if args.json:
        write_json(args.json, payload)
        print(f"results written to {args.json}")
    if not args.no_plot:
        if plot_heatmap(out["results"], plot, title=str(payload["model"])):
            print(f"heatmap written to {plot}")
        else:
            print("heatmap skipped: it needs matplotlib (pip install matplotlib); the table and "
                  "JSON have the same numbers")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fwpkm_ext.niah [niah] ...`` (the word ``niah`` may be left out)."""
    return command_main(add_subcommand, "niah", argv)

