"""Needle in a haystack (SPEC "Evaluation the paper reports"): ``fwpkm niah``
(also ``python -m fwpkm_ext.niah``).

Protocol, per context length L and sample:

- haystack: held-out book text (the training run's validation documents, joined by newlines,
  read cyclically from a random offset);
- 5 needles "The secret number for ID-xxxx is dddddd." (4 hex chars, 6 digits, distinct IDs),
  each on a line of its own, at random depths (snapped to the start of the next line when one is
  near), so that haystack + needles = L - R tokens (R >= 32 tokens are reserved for the query);
- for each needle, the query "The secret number for ID-xxxx is " (on a new line) follows the
  context, the model decodes greedily, and the answer is correct when the digits it starts with
  are exactly the 6 digits (a 5- or 7-digit answer, or one wrong digit, is wrong);
- n-iter: the context is read n-1 extra times first (fresh attention each pass, FwPKM memory
  kept; each pass is one update window, written when the pass ends), then once more followed by
  the query. With the default update chunk (the whole input) the final pass writes nothing before
  the answer, so 1-iter answers from the initial memory plus the attention window.

Accuracy is reported per length, n-iter and needle-depth bucket (JSON, table, heatmap PNG).
Everything derives from ``--seed``: the same command gives the same numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import make_needles
from .model import LM, LMCache
from .stream import (
    FORCE_BINARY_HELP, FULL_READ_CHUNK, add_model_args, byte_fallback, check_corpus, check_document,
    check_model_args, check_output_path, cli_errors, format_tokens, load_model_from_args,
    parse_update_chunk, write_json)

__all__ = ["Needle", "NiahSample", "make_needles", "build_sample", "haystack_tokens",
           "extract_answer", "score_answer", "run_niah", "format_table", "plot_heatmap",
           "add_niah_subcommands", "niah_cmd", "main", "QUERY_RESERVE", "NEEDLES", "query_reserve",
           "evaluate_samples", "summarize"]

NEEDLES = 5
QUERY_RESERVE = 32  # tokens kept free at the end of each length for the query
SNAP_TOKENS = 64  # a needle moves to the start of the next line when one is this close


@dataclass
class Needle:
    key: str
    number: str
    start: int  # token position of the sentence in the context
    tokens: int  # tokens of the sentence (without the surrounding newlines)
    depth: float  # start / len(context)


@dataclass
class NiahSample:
    length: int
    context: np.ndarray  # int64 token ids: haystack with the needles inserted
    needles: List[Needle]
    queries: List[np.ndarray]  # per needle: the query tokens (newline + "The secret ... is ")


# --------------------------------------------------------------------------------------------
# Needles and samples
# --------------------------------------------------------------------------------------------
def _nl(tok) -> List[int]:
    nl = getattr(tok, "newline_id", None)
    return [int(nl)] if nl is not None and nl >= 0 else []


def query_reserve(tok, wording: Optional[str] = None) -> int:
    """Tokens kept free at the end of each length for the query: at least ``QUERY_RESERVE``, and
    the probe query's length plus 16 (the 4-character key may tokenize differently)."""
    from .data import needle_query

    return max(QUERY_RESERVE, len(_nl(tok)) + len(tok.encode(needle_query("0000", wording))) + 16)


def build_sample(haystack: np.ndarray, tok, length: int, rng: random.Random,
                 n_needles: int = NEEDLES, wording: Optional[str] = None) -> NiahSample:
    """One sample of ``length`` tokens in all: haystack text from a random offset (cyclic) with
    ``n_needles`` needle lines at random depths; the context is ``length - query_reserve(tok)``
    tokens (the same for every sample of a length, so samples can be read side by side).
    ``wording``: the needle's format string (default SPEC's, see ``data.check_wording``)."""
    from .data import check_wording, needle_query, needle_sentence

    if wording is not None:
        check_wording(wording)
    haystack = np.asarray(haystack, dtype=np.int64)
    if len(haystack) == 0:
        raise ValueError("haystack: no tokens")
    nl = _nl(tok)
    needles = make_needles(rng, n_needles)
    sent = [np.asarray(tok.encode(needle_sentence(k, v, wording)), dtype=np.int64) for k, v in needles]
    queries = [np.asarray(nl + tok.encode(needle_query(k, wording)), dtype=np.int64) for k, _ in needles]
    reserve = query_reserve(tok, wording)
    if max(len(q) for q in queries) > reserve:
        raise ValueError(f"a query takes {max(len(q) for q in queries)} tokens, more than the "
                         f"{reserve} reserved")
    ctx_len = length - reserve
    pieces = [np.concatenate([np.asarray(nl, dtype=np.int64), s, np.asarray(nl, dtype=np.int64)])
              for s in sent]
    filler_len = ctx_len - sum(len(p) for p in pieces)
    if filler_len < sum(len(p) for p in pieces):  # needles must not be most of the context
        raise ValueError(f"length {length} is too short for {n_needles} needles (each about "
                         f"{len(pieces[0])} tokens)")
    off = rng.randrange(len(haystack))
    filler = np.take(haystack, np.arange(off, off + filler_len), mode="wrap")
    depths = [rng.random() for _ in needles]
    cuts = []
    nl_id = nl[0] if nl else None
    for d in depths:
        c = int(d * filler_len)
        if nl_id is not None:
            hits = np.nonzero(filler[c: c + SNAP_TOKENS] == nl_id)[0]
            if len(hits):
                c = c + int(hits[0]) + 1
        cuts.append(min(c, filler_len))
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    parts, placed, pos, prev = [], [None] * len(needles), 0, 0
    for i in order:
        parts.append(filler[prev: cuts[i]])
        pos += cuts[i] - prev
        prev = cuts[i]
        start = pos + len(nl)
        placed[i] = Needle(needles[i][0], needles[i][1], start, len(sent[i]), start / ctx_len)
        parts.append(pieces[i])
        pos += len(pieces[i])
    parts.append(filler[prev:])
    context = np.concatenate(parts).astype(np.int64)
    assert len(context) == ctx_len
    return NiahSample(length=length, context=context, needles=placed, queries=queries)


def haystack_tokens(docs: Sequence[Tuple[str, str]], tok) -> np.ndarray:
    """Token ids of the documents' texts joined by a blank line."""
    nl = _nl(tok)
    parts = []
    for _, text in docs:
        parts.append(np.asarray(tok.encode(text), dtype=np.int64))
        if nl:
            parts.append(np.asarray(nl + nl, dtype=np.int64))
    if not parts:
        raise ValueError("haystack: no documents")
    return np.concatenate(parts)


_LEADING_DIGITS = re.compile(r"\s*(\d*)")


def extract_answer(text: str) -> str:
    """The digits a generated answer starts with (after optional whitespace)."""
    return _LEADING_DIGITS.match(text).group(1)


def score_answer(text: str, number: str) -> bool:
    """Exact match: the answer's leading digits are exactly ``number`` (no more, no fewer)."""
    return extract_answer(text) == number


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------
def _with_chunk(state, chunk: int):
    if state.pending:
        raise RuntimeError("internal: changing the update window of a state with pending tokens")
    return state.with_(config=dataclasses.replace(state.config, chunk_size=chunk))


def _drop_pending(state):
    return state.with_(pending_q=None, pending_v=None, pending_g=None, pending_mask=None,
                       pending_idx=None, pending_half_idx=None)


@torch.no_grad()
def _feed(model: LM, x: torch.Tensor, cache: LMCache, segment: int, read_only: bool = False):
    """Feed (B, T) tokens segment by segment. ``read_only``: the update window is longer than
    anything still to come before the answer, so pending tokens can never be written: drop them
    as we go (same outputs, constant memory)."""
    logits = None
    for a in range(0, x.shape[1], segment):
        logits, cache = model(x[:, a: a + segment], cache)
        if read_only:
            cache.mem = {i: _drop_pending(st) for i, st in cache.mem.items()}
    return logits, cache


def _slice_cache(cache: LMCache, b: int) -> LMCache:
    kv = [None if p is None else (p[0][b: b + 1], p[1][b: b + 1]) for p in cache.kv]
    mem = {}
    for i, st in cache.mem.items():
        d = {}
        for f in ("keys", "values", "slot_reads", "pending_q", "pending_v", "pending_g",
                  "pending_mask", "pending_idx", "pending_half_idx"):
            t = getattr(st, f)
            if t is not None and (f not in ("keys", "values", "slot_reads") or st.per_sequence):
                t = t[b: b + 1]
            d[f] = t
        mem[i] = st.with_(**d)
    conv = {i: t[b: b + 1] for i, t in cache.conv.items()}
    return LMCache(pos=cache.pos, kv=kv, mem=mem, conv=conv)


def _fresh_cache(model: LM, mem: Dict[int, Any]) -> LMCache:
    return LMCache(pos=0, kv=[None] * model.cfg.n_layers, mem=dict(mem))


@torch.no_grad()
def evaluate_samples(model: LM, tok, samples: List[NiahSample], iters: Sequence[int], *,
                     segment_tokens: int = 2048, update_chunk: Optional[int] = None,
                     max_new_tokens: int = 8, sample_ids: Optional[Sequence[int]] = None,
                     ) -> List[Dict[str, Any]]:
    """Records (one per sample, n-iter and needle) for samples of one length, read side by side
    (one memory per sample). ``update_chunk=None``: the whole input (SPEC)."""
    model.eval()
    dev = next(model.parameters()).device
    B = len(samples)
    ctx = torch.from_numpy(np.stack([s.context for s in samples])).to(dev)
    L = ctx.shape[1]
    pass_chunk = L if update_chunk is None else update_chunk
    mem = {i: b.fwpkm.init_state(B, chunk_size=pass_chunk)
           for i, b in enumerate(model.blocks) if b.fwpkm is not None}
    records = []
    done = 0  # extra passes applied to `mem`
    for n in sorted(set(iters)):
        while done < n - 1:
            _, cache = _feed(model, ctx, _fresh_cache(model, mem), segment_tokens)
            mem = {i: model.blocks[i].fwpkm.flush(st) for i, st in cache.mem.items()}
            done += 1
        if update_chunk is None:
            final_mem = {i: _with_chunk(st, FULL_READ_CHUNK) for i, st in mem.items()}
        else:
            final_mem = dict(mem)
        _, cache = _feed(model, ctx, _fresh_cache(model, final_mem), segment_tokens,
                         read_only=update_chunk is None)
        for b, s in enumerate(samples):
            cb = _slice_cache(cache, b) if B > 1 else cache
            for j, (nd, q) in enumerate(zip(s.needles, s.queries)):
                qt = torch.from_numpy(q).to(dev)[None]
                gen, _ = model.generate(qt, max_new_tokens, cache=cb)
                text = tok.decode(gen[0].tolist())
                records.append({"length": s.length, "iters": n,
                                "sample": b if sample_ids is None else int(sample_ids[b]),
                                "needle": j, "key": nd.key,
                                "number": nd.number, "depth": nd.depth, "position": nd.start,
                                "answer": text, "correct": score_answer(text, nd.number)})
    return records


def _depth_bucket(depth: float, n: int) -> int:
    return min(n - 1, max(0, int(depth * n)))


def summarize(records: List[Dict[str, Any]], lengths: Sequence[int], iters: Sequence[int],
              depth_buckets: int = 5) -> List[Dict[str, Any]]:
    out = []
    for L in lengths:
        for n in iters:
            rs = [r for r in records if r["length"] == L and r["iters"] == n]
            by = []
            for k in range(depth_buckets):
                rk = [r for r in rs if _depth_bucket(r["depth"], depth_buckets) == k]
                c = sum(r["correct"] for r in rk)
                by.append({"lo": k / depth_buckets, "hi": (k + 1) / depth_buckets, "correct": c,
                           "total": len(rk), "accuracy": c / len(rk) if rk else None})
            c = sum(r["correct"] for r in rs)
            out.append({"length": L, "iters": n, "correct": c, "total": len(rs),
                        "accuracy": c / len(rs) if rs else None, "by_depth": by})
    return out


def run_niah(model: LM, tok, haystack: np.ndarray, lengths: Sequence[int], iters: Sequence[int],
             samples: int, *, seed: int = 0, segment_tokens: int = 2048,
             update_chunk: Optional[int] = None, batch_size: int = 1, depth_buckets: int = 5,
             max_new_tokens: int = 8, progress: bool = True, log=print,
             wording: Optional[str] = None) -> Dict[str, Any]:
    """The whole evaluation; returns {"results": [...], "records": [...]} (see the module doc)."""
    if samples < 1 or batch_size < 1 or depth_buckets < 1:
        raise ValueError("samples, batch_size and depth_buckets must be positive")
    if not iters or min(iters) < 1:
        raise ValueError(f"iters: expected positive counts, got {list(iters)}")
    records: List[Dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths) * samples, unit="sample", leave=False, file=sys.stderr,
                   desc="niah")
    try:
        for L in lengths:
            t0 = time.perf_counter()
            built = []
            for s in range(samples):
                rng = random.Random(f"fwpkm-niah-{seed}-{L}-{s}")
                built.append(build_sample(haystack, tok, L, rng, wording=wording))
            for g in range(0, samples, batch_size):
                group = built[g: g + batch_size]
                recs = evaluate_samples(model, tok, group, iters, segment_tokens=segment_tokens,
                                        update_chunk=update_chunk, max_new_tokens=max_new_tokens,
                                        sample_ids=list(range(g, g + len(group))))
                records.extend(recs)
                if bar is not None:
                    bar.update(len(group))
            msg = f"length {format_tokens(L)}: " + ", ".join(
                f"{n}-iter {sum(r['correct'] for r in records if r['length'] == L and r['iters'] == n)}"
                f"/{samples * NEEDLES}" for n in iters) + f" ({time.perf_counter() - t0:.1f} s)"
            if bar is not None:
                bar.write(msg)
            elif log is not None:
                log(msg)
    finally:
        if bar is not None:
            bar.close()
    records.sort(key=lambda r: (lengths.index(r["length"]), r["iters"], r["sample"], r["needle"]))
    return {"results": summarize(records, lengths, iters, depth_buckets), "records": records}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def format_table(results: List[Dict[str, Any]]) -> str:
    if not results:
        return ""
    nb = len(results[0]["by_depth"])
    heads = [f"d{b['lo']:.1f}-{b['hi']:.1f}" for b in results[0]["by_depth"]]
    rows = [f"{'length':>8} {'iters':>5} {'accuracy':>9} " + " ".join(f"{h:>9}" for h in heads)]
    for r in results:
        cells = []
        for b in r["by_depth"]:
            cells.append(f"{'-':>9}" if b["accuracy"] is None else f"{b['accuracy']:>9.2f}")
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        rows.append(f"{format_tokens(r['length']):>8} {r['iters']:>5} {acc:>9} " + " ".join(cells))
    assert nb == len(heads)
    return "\n".join(rows)


def plot_heatmap(results: List[Dict[str, Any]], path: str, title: str = "") -> bool:
    """Accuracy heatmap (depth bucket x length), one panel per n-iter; False without matplotlib."""
    from .evaluate import _figure, have_matplotlib

    if not have_matplotlib():
        return False
    lengths = sorted({r["length"] for r in results})
    iters = sorted({r["iters"] for r in results})
    nb = len(results[0]["by_depth"])
    fig = _figure(2.2 + 1.1 * len(lengths) * len(iters), 3.6)
    for k, n in enumerate(iters):
        ax = fig.add_subplot(1, len(iters), k + 1)
        grid = np.full((nb, len(lengths)), np.nan)
        for r in results:
            if r["iters"] != n:
                continue
            j = lengths.index(r["length"])
            for i, b in enumerate(r["by_depth"]):
                if b["accuracy"] is not None:
                    grid[i, j] = b["accuracy"]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(nb):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([format_tokens(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(nb))
        ax.set_yticklabels([f"{b['lo']:.1f}-{b['hi']:.1f}" for b in results[0]["by_depth"]],
                           fontsize=7)
        ax.set_xlabel("context length")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{n}-iter", fontsize=9)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _int_list(s: str, name: str) -> List[int]:
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
    from .evaluate import held_out_documents

    if args.wording is not None:
        from .data import check_wording

        check_wording(args.wording)
    lengths = _int_list(args.lengths, "--lengths")
    iters = sorted(set(_int_list(args.iters, "--iters")))
    # every path first: a wrong one must not wait for the model to load
    for p in args.haystack or ():
        check_document(p, "--haystack", args.force_binary)
    if args.corpus and not args.haystack:
        check_corpus(args.corpus, "--corpus", args.force_binary)
    check_model_args(args)
    plot = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else "niah.png")
    for name, out in (("--json", args.json), ("--plot", None if args.no_plot else plot)):
        if out:
            check_output_path(out, name)
    model, tok = load_model_from_args(args, seed=args.seed)
    tok = byte_fallback(model, tok)
    if args.haystack:
        from .data import read_document

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


def add_niah_subcommands(subparsers) -> None:
    """Registers ``niah`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "niah", help="needle-in-a-haystack accuracy by length, n-iter and depth",
        description="SPEC needle protocol: 5 needles 'The secret number for ID-xxxx is dddddd.' "
                    "in held-out book text, greedy decoding, exact match; n-iter reads the "
                    "haystack n-1 extra times first (memory kept).")
    add_model_args(p)
    from .evaluate import _add_split_args

    _add_split_args(p)
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
    g.add_argument("--encoding-errors", default="latin1", choices=["strict", "latin1", "replace"])
    g.add_argument("--force-binary", action="store_true", help=FORCE_BINARY_HELP)
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, metavar="OUT", help="results JSON")
    g.add_argument("--plot", default=None,
                   help="heatmap PNG (default: OUT.png next to --json, else niah.png)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cli_errors(niah_cmd))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fwpkm_ext.niah",
                                     description="Needle-in-a-haystack evaluation")
    sub = parser.add_subparsers(dest="command", metavar="{niah}")
    sub.required = True
    add_niah_subcommands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "niah":
        argv = ["niah"] + argv
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
