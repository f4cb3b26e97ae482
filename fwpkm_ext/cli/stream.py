"""`fwpkm stream`: read one long document (or synthetic tokens) segment by segment, the cache
carried, and print speed, memory, perplexity by position and memory telemetry."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any, Optional, Sequence

from ..input_checks import check_document, check_input_file
from ..stream import ByteTokenizer, SyntheticTokens, load_snapshot, open_document, peak_rss_mb
from .common import (add_command, add_model_args, add_reader_args, as_option, byte_fallback, check_model_args,
                     check_outputs, command_main, load_model_from_args, reader_from_args,
                     write_json)


def add_subcommand(subparsers) -> None:
    """Registers ``stream`` on an argparse subparsers object."""
    p = add_command(
        subparsers, "stream", stream_cmd,
        "read a long document segment by segment, fast weights carried",
        "Stream a document through the model with the cache (attention window and FwPKM states) "
        "carried across segments; prints tokens/s, peak memory, perplexity by position bucket "
        "and memory telemetry.")
    p.add_argument("path", nargs="?", default=None,
                   help="a .txt / .txt.gz document (or use --synthetic-tokens)")
    add_model_args(p)
    add_reader_args(p)
    g = p.add_argument_group("input and output")
    g.add_argument("--synthetic-tokens", type=int, default=None, metavar="N",
                   help="read N random token ids (seeded) instead of a document")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of --random-init weights and --synthetic-tokens (default 0)")
    g.add_argument("--max-tokens", type=int, default=None, help="read at most N tokens")
    g.add_argument("--stop-at", type=int, default=None,
                   help="pause after N tokens (rounded up to a segment boundary); with "
                        "--snapshot, save the paused read there")
    g.add_argument("--snapshot", default=None, metavar="FILE",
                   help="snapshot file written at --stop-at / every --snapshot-every tokens")
    g.add_argument("--snapshot-every", type=int, default=None, metavar="N")
    g.add_argument("--resume", default=None, metavar="FILE",
                   help="continue the read saved in this snapshot (same document and model)")
    g.add_argument("--no-warmup", action="store_true",
                   help="time from the first segment on (default: one untimed warm-up segment "
                        "first, so one-time costs of the process are not counted per token)")
    g.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")


def stream_cmd(args: argparse.Namespace) -> int:
    """`fwpkm stream`: read one document (or synthetic tokens) and print the report."""
    if (args.path is None) == (args.synthetic_tokens is None):
        raise ValueError("give a document PATH or --synthetic-tokens N (one of them)")
    if args.snapshot_every is not None and not args.snapshot:
        raise ValueError("--snapshot-every needs --snapshot FILE")
    # every path first: a wrong one must not wait for the model to load and warm up
    if args.path is not None:
        check_document(args.path, "path", args.force_binary)
    check_model_args(args)
    snap = None
    if args.resume:
        check_input_file(args.resume, "--resume")
        snap = as_option(load_snapshot, "--resume")(args.resume)
    check_outputs((("--snapshot", args.snapshot), ("--json", args.json)))
    model, tok = load_model_from_args(args, seed=args.seed)
    if args.synthetic_tokens is not None:
        if args.synthetic_tokens < 1:
            raise ValueError(f"--synthetic-tokens: must be positive, got {args.synthetic_tokens}")
        doc: Any = SyntheticTokens(args.synthetic_tokens, model.cfg.vocab_size, args.seed)
        source = f"{args.synthetic_tokens} synthetic tokens (seed {args.seed})"
    else:
        tok = byte_fallback(model, tok)
        # a Path: read as a file whatever its name ends with (a str is a file only if .txt/.txt.gz)
        doc = pathlib.Path(args.path)
        source = f"{args.path} ({'UTF-8 bytes' if isinstance(tok, ByteTokenizer) else 'sentencepiece'})"
    reader = reader_from_args(args, model, tok, snap)
    if args.max_tokens is not None:
        doc = open_document(doc, tok, args.encoding_errors).limit(args.max_tokens)
    if args.resume:
        as_option(reader.resume, "--resume")(args.resume)
    stop_at = args.stop_at
    if stop_at is not None:
        S = reader.segment_tokens
        stop_at = -(-stop_at // S) * S
    cfg = model.cfg
    print(f"model: {args.model or 'random-init ' + str(args.preset)} dim={cfg.dim} "
          f"layers={cfg.n_layers} window={cfg.window} fwpkm_layers={cfg.fwpkm_layers} | "
          f"input: {source}", flush=True)
    if not args.no_warmup:
        print(f"warm-up: one segment in {reader.warmup():.2f} s (not timed)", flush=True)
    rep = reader.read(doc, stop_at=stop_at,
                      snapshot_every=args.snapshot_every if args.snapshot else None,
                      snapshot_path=args.snapshot if args.snapshot_every else None)
    if not rep.complete and args.snapshot:
        reader.snapshot(args.snapshot)
    print(rep.table())
    for line in rep.telemetry_lines():
        print(line)
    print(f"attention cache {rep.kv_bytes / 2**20:.1f} MiB, memory states {rep.state_bytes / 2**20:.1f} MiB")
    if not rep.complete:
        print(f"paused at token {rep.tokens}" + (f"; snapshot written to {args.snapshot}"
                                                   if args.snapshot else ""))
    print(rep.summary(), flush=True)
    if args.json:
        d = rep.to_dict()
        d["input"] = source
        d["peak_rss_mb_process"] = peak_rss_mb()
        write_json(args.json, d)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fwpkm_ext.stream [stream] PATH ...`` (the word ``stream`` may be left out)."""
    return command_main(add_subcommand, "stream", argv)

