"""Needle in a haystack (SPEC "Evaluation the paper reports"): the protocol. The command is
``fwpkm niah`` (``fwpkm_ext.cli.niah``; also ``python -m fwpkm_ext.niah``), its heatmap
``fwpkm_ext.plots.plot_heatmap``.

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

import dataclasses
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import check_wording, make_needles, needle_query, needle_sentence
from .model import LM, LMCache
from .stream import FULL_READ_CHUNK, format_tokens

__all__ = ["Needle", "NiahSample", "make_needles", "build_sample", "haystack_tokens",
           "extract_answer", "score_answer", "read_context", "run_niah", "format_table",
           "QUERY_RESERVE", "NEEDLES", "query_reserve", "evaluate_samples", "summarize"]

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
    return max(QUERY_RESERVE, len(_nl(tok)) + len(tok.encode(needle_query("0000", wording))) + 16)


def build_sample(haystack: np.ndarray, tok, length: int, rng: random.Random,
                 n_needles: int = NEEDLES, wording: Optional[str] = None) -> NiahSample:
    """One sample of ``length`` tokens in all: haystack text from a random offset (cyclic) with
    ``n_needles`` needle lines at random depths; the context is ``length - query_reserve(tok)``
    tokens (the same for every sample of a length, so samples can be read side by side).
    ``wording``: the needle's format string (default SPEC's, see ``data.check_wording``)."""
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


@torch.no_grad()
def read_context(model: LM, x: torch.Tensor, cache: LMCache, segment: int,
                 read_only: bool = False) -> Tuple[Optional[torch.Tensor], LMCache]:
    """Feed (B, T) tokens segment by segment; returns the last segment's logits and the cache.
    ``read_only``: the update window is longer than anything still to come before the answer,
    so pending tokens can never be written: drop them as we go (same outputs, constant
    memory)."""
    logits = None
    for a in range(0, x.shape[1], segment):
        logits, cache = model(x[:, a: a + segment], cache)
        if read_only:
            cache.mem = {i: st.without_pending() for i, st in cache.mem.items()}
    return logits, cache


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
    mem = LMCache.empty(model, B, chunk_size=pass_chunk).mem
    records = []
    done = 0  # extra passes applied to `mem`
    for n in sorted(set(iters)):
        while done < n - 1:
            _, cache = read_context(model, ctx, LMCache.empty(model, mem=mem), segment_tokens)
            mem = {i: model.blocks[i].fwpkm.flush(st) for i, st in cache.mem.items()}
            done += 1
        if update_chunk is None:
            final_mem = {i: _with_chunk(st, FULL_READ_CHUNK) for i, st in mem.items()}
        else:
            final_mem = dict(mem)
        _, cache = read_context(model, ctx, LMCache.empty(model, mem=final_mem), segment_tokens,
                                read_only=update_chunk is None)
        for b, s in enumerate(samples):
            cb = cache.select(b) if B > 1 else cache
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


if __name__ == "__main__":  # `python -m fwpkm_ext.niah ...`: the `fwpkm niah` command
    from fwpkm_ext.cli.niah import main

    sys.exit(main())
