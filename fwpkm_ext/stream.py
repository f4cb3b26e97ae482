"""Streaming long documents through the reference LM, fast weights carried across segments.

    reader = StreamingReader(model, segment_tokens=2048, tokenizer=tok)
    report = reader.read("book.txt.gz")          # path, text, or an iterable of token ids
    print(report.table())                       # NLL / perplexity by position bucket

A document is read segment by segment (absolute boundaries: [0, S), [S, 2S), ...). Between
segments the model's cache is carried: the attention keys/values of the last ``window`` positions
(constant size) and, per FwPKM layer, the fast-weight state with the pending tokens of the
unfinished update window. Nothing kept grows with the document, except in the "one update per
full read" mode (``update_chunk=None``), where every token stays pending until the end of the
read (that is what the mode means) and is written by the final flush.

``snapshot(path)`` saves a paused read (``read(doc, stop_at=N)``, or periodically with
``snapshot_every``); ``resume(path)`` on a new reader and ``read(doc)`` with the same document
continue it and give the same report (bit for bit, apart from timings) as an uninterrupted read.

The command: ``fwpkm stream PATH`` (``fwpkm_ext.cli.stream``; also ``python -m fwpkm_ext.stream``).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._fileio import CHECKSUM_KEY, damaged, read_sealed, write_sealed
from .data import read_document
from .model import LM, LMCache, LMConfig
from .pretrained import load_checkpoint

__all__ = [
    "StreamingReader", "StreamReport", "Bucket", "ByteTokenizer", "SyntheticTokens",
    "TokenSource", "open_document", "position_buckets", "bucket_label", "bucket_table",
    "format_tokens", "peak_rss_mb", "load_snapshot", "SNAPSHOT_VERSION", "FULL_READ_CHUNK",
    "MODEL_CHUNK",
]

SNAPSHOT_FORMAT = "fwpkm_ext.StreamSnapshot"
SNAPSHOT_VERSION = 1
_SNAPSHOT_ENTRIES = ("model_config", "weights_sha256", "dtype", "reader", "pos", "cache_pos",
                     "digest", "segments", "kv", "mem", "stats", "prev_row", "token_nll")
#: every top-level entry a snapshot may hold ("conv" and the checksum were added within version 1:
#: files without them still load)
_SNAPSHOT_KEYS = frozenset(_SNAPSHOT_ENTRIES + ("format", "version", "conv", CHECKSUM_KEY))
#: update window used for "one update per full read" (``update_chunk=None``): larger than any
#: document, so no window completes before the final flush.
FULL_READ_CHUNK = 1 << 40
MODEL_CHUNK = "model"

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def format_tokens(n: int) -> str:
    """1024 -> '1K', 131072 -> '128K', 1048576 -> '1M', 1500 -> '1500'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _bucket_of(pos: int, first: int) -> int:
    return (pos // first).bit_length()


def _bucket_bounds(i: int, first: int) -> Tuple[int, int]:
    return (0, first) if i == 0 else (first << (i - 1), first << i)


def position_buckets(length: int, first: int = 1024) -> List[Tuple[int, int]]:
    """Position buckets [0, first), [first, 2 first), [2 first, 4 first), ... covering
    positions 0 .. length-1 (the last one may extend past ``length``)."""
    if first < 1:
        raise ValueError(f"first: must be positive, got {first}")
    if length <= 0:
        return []
    return [_bucket_bounds(i, first) for i in range(_bucket_of(length - 1, first) + 1)]


def bucket_label(lo: int, hi: int) -> str:
    return f"[{format_tokens(lo)}, {format_tokens(hi)})"


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss), NaN where unavailable."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return float("nan")
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024.0


def _nan_exp(x: float) -> float:
    if x != x:
        return float("nan")
    return math.exp(min(x, 700.0))


# --------------------------------------------------------------------------------------------
# Token sources
# --------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Tokenizer-free fallback: a text is its UTF-8 bytes (ids 0..255). For untrained models
    (``--random-init``) and checkpoints without ``tokenizer.model``; needs ``vocab_size >= 256``."""

    vocab_size = 256
    newline_id = 10
    eos_id = None
    bos_id = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes"

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SyntheticTokens:
    """``n`` random token ids in ``[0, vocab_size)``, generated lazily block by block from the
    seed (so reading them keeps memory constant and any split gives the same ids)."""

    def __init__(self, n: int, vocab_size: int, seed: int = 0, block: int = 8192):
        if n < 0 or vocab_size < 1 or block < 1:
            raise ValueError(f"SyntheticTokens: need n >= 0, vocab_size >= 1 and block >= 1, got "
                             f"n={n}, vocab_size={vocab_size}, block={block}")
        self.n, self.vocab_size, self.seed, self.block = int(n), int(vocab_size), int(seed), int(block)

    def __len__(self) -> int:
        return self.n

    def _block(self, j: int) -> np.ndarray:
        size = min(self.block, self.n - j * self.block)
        rng = np.random.default_rng([self.seed, j, 0x70C5])
        return rng.integers(0, self.vocab_size, size=size, dtype=np.int64)

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(0, a), min(self.n, b)
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        j0, j1 = a // self.block, (b - 1) // self.block
        parts = [self._block(j) for j in range(j0, j1 + 1)]
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
        off = j0 * self.block
        return arr[a - off: b - off]

    def __iter__(self) -> Iterator[int]:
        for j in range(0, self.n, self.block):
            yield from self.slice(j, j + self.block).tolist()

    def __repr__(self) -> str:
        return f"SyntheticTokens(n={self.n}, vocab_size={self.vocab_size}, seed={self.seed})"


class TokenSource:
    """A document as a stream of token ids: ``take(n)`` returns up to ``n`` ids (int64 numpy).
    Backed by an array, a :class:`SyntheticTokens` (lazy) or any iterator of ints."""

    def __init__(self, data, name: str = "<tokens>"):
        self.name = name
        self.offset = 0
        self._stop: Optional[int] = None
        self._arr = self._synth = self._it = None
        if isinstance(data, SyntheticTokens):
            self._synth = data
            self.length: Optional[int] = len(data)
        elif isinstance(data, Tensor):
            if data.dim() != 1:
                raise ValueError(f"doc: a token tensor must be 1-D, got shape {tuple(data.shape)}")
            self._arr = data.detach().cpu().to(torch.int64).numpy()
            self.length = len(self._arr)
        elif isinstance(data, (np.ndarray, list, tuple, range)):
            arr = np.asarray(data)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"doc: token ids must be a 1-D sequence of integers, got "
                                 f"{arr.dtype} of shape {arr.shape}")
            self._arr = arr.astype(np.int64, copy=False)
            self.length = len(self._arr)
        else:
            try:
                self._it = iter(data)
            except TypeError:
                raise TypeError(f"doc: expected a path, a text, or an iterable of token ids, got "
                                f"{type(data).__name__}") from None
            self.length = None

    def limit(self, n: int) -> "TokenSource":
        """Read at most ``n`` tokens in all (from the start of the document)."""
        if n < 0:
            raise ValueError(f"limit: must be >= 0, got {n}")
        self._stop = n
        if self.length is not None:
            self.length = min(self.length, n)
        return self

    def take(self, n: int) -> np.ndarray:
        if self._stop is not None:
            n = max(0, min(n, self._stop - self.offset))
        if self._arr is not None:
            out = self._arr[self.offset: self.offset + n]
        elif self._synth is not None:
            out = self._synth.slice(self.offset, self.offset + n)
        else:
            try:
                out = np.fromiter(itertools.islice(self._it, n), dtype=np.int64)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ValueError(f"doc: the token iterator yielded a non-integer ({exc})") from None
        self.offset += len(out)
        return out


def _is_path_like(doc) -> bool:
    if isinstance(doc, os.PathLike):
        return True
    return isinstance(doc, str) and "\n" not in doc and doc.endswith((".txt", ".txt.gz")) \
        and len(doc) < 4096


def open_document(doc, tokenizer=None, encoding_errors: str = "strict") -> TokenSource:
    """A :class:`TokenSource` for ``doc``: a path (``.txt`` / ``.txt.gz``, or any ``os.PathLike``),
    a text (str, tokenized with ``tokenizer``), a :class:`TokenSource`, or token ids (1-D tensor,
    numpy array, list, :class:`SyntheticTokens`, any iterable / iterator of ints)."""
    if isinstance(doc, TokenSource):
        return doc
    if isinstance(doc, (str, os.PathLike)):
        if _is_path_like(doc):
            path = os.fspath(doc)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"doc: no such file: {path!r}")
            text, name = read_document(path, encoding_errors), path
        else:
            text, name = doc, "<text>"
        if tokenizer is None:
            raise ValueError("doc: a text document needs a tokenizer: pass tokenizer=... to "
                             "StreamingReader (the checkpoint's tokenizer.model, or "
                             "fwpkm_ext.stream.ByteTokenizer() to read UTF-8 bytes)")
        return TokenSource(np.asarray(tokenizer.encode(text), dtype=np.int64), name)
    return TokenSource(doc, repr(doc) if isinstance(doc, SyntheticTokens) else "<tokens>")


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
class _Perplexity:
    """``nll`` (mean over the predicted tokens, NaN with none) and ``ppl`` of ``nll_sum``; the
    field ``_predicted`` names counts the predicted tokens."""

    _predicted = "tokens"

    @property
    def nll(self) -> float:
        n = getattr(self, self._predicted)
        return self.nll_sum / n if n else float("nan")

    @property
    def ppl(self) -> float:
        return _nan_exp(self.nll)


@dataclass
class Bucket(_Perplexity):
    """Predicted tokens at positions [lo, hi) of a document and the sum of their NLL (nats)."""

    lo: int
    hi: int
    tokens: int
    nll_sum: float

    @property
    def label(self) -> str:
        return bucket_label(self.lo, self.hi)

    def to_dict(self) -> Dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "label": self.label, "tokens": self.tokens,
                "nll_sum": self.nll_sum, "nll": self.nll, "ppl": self.ppl}


def bucket_table(buckets: Sequence[Bucket], predicted: int, nll: float, ppl: float) -> str:
    """NLL and perplexity by position bucket, one row each, then the whole read (``predicted``
    tokens, ``nll``, ``ppl``): the table of a report."""
    rows = [f"{'position':<18}{'tokens':>10}{'nll':>10}{'ppl':>12}"]
    for b in buckets:
        rows.append(f"{b.label:<18}{b.tokens:>10}{b.nll:>10.4f}{b.ppl:>12.2f}")
    rows.append(f"{'all':<18}{predicted:>10}{nll:>10.4f}{ppl:>12.2f}")
    return "\n".join(rows)


class _Stats:
    """Per-stream NLL sums by position bucket (float64, summed per segment: deterministic for a
    given segmentation)."""

    def __init__(self, first: int, sums=None, counts=None):
        self.first = first
        self.sums: List[float] = list(sums or [])
        self.counts: List[int] = list(counts or [])

    def add(self, a: int, nll: np.ndarray) -> None:
        """NLL of the tokens at positions a .. a+len(nll)-1."""
        p, end = a, a + len(nll)
        while p < end:
            i = _bucket_of(p, self.first)
            while len(self.sums) <= i:
                self.sums.append(0.0)
                self.counts.append(0)
            hi = min(end, _bucket_bounds(i, self.first)[1])
            self.sums[i] += float(nll[p - a: hi - a].sum())
            self.counts[i] += hi - p
            p = hi

    def buckets(self) -> List[Bucket]:
        return [Bucket(*_bucket_bounds(i, self.first), c, s)
                for i, (s, c) in enumerate(zip(self.sums, self.counts))]


def _merge_buckets(lists: Sequence[Sequence[Bucket]]) -> List[Bucket]:
    merged: Dict[Tuple[int, int], Bucket] = {}
    for bl in lists:
        for b in bl:
            m = merged.setdefault((b.lo, b.hi), Bucket(b.lo, b.hi, 0, 0.0))
            m.tokens += b.tokens
            m.nll_sum += b.nll_sum
    return [merged[k] for k in sorted(merged)]


@dataclass
class StreamReport(_Perplexity):
    """What a read measured. ``tokens``: positions read (all streams); ``predicted``: tokens with
    an NLL (every token but the first of each document); ``seconds`` / ``tokens_timed``: wall time
    and tokens of the reading loop in this process (a resumed read times only its own part)."""

    tokens: int
    predicted: int
    nll_sum: float
    buckets: List[Bucket]
    seconds: float
    tokens_timed: int
    segments: int
    segment_tokens: int
    update_chunk: Optional[int]
    telemetry: Dict[int, Dict[str, float]]
    complete: bool
    peak_rss_mb: float
    kv_bytes: int = 0
    state_bytes: int = 0
    documents: List[Dict[str, Any]] = field(default_factory=list)
    token_nll: Optional[np.ndarray] = None
    cpu_seconds: float = float("nan")  # process CPU time of the reading loop (all threads)
    _predicted = "predicted"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_timed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / self.tokens_timed if self.tokens_timed else float("nan")

    @property
    def cpu_ms_per_token(self) -> float:
        """CPU time per token (all threads): less sensitive than wall time to other jobs."""
        return 1e3 * self.cpu_seconds / self.tokens_timed if self.tokens_timed else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "tokens", "predicted", "nll_sum", "nll", "ppl", "seconds", "tokens_timed",
            "tokens_per_s", "ms_per_token", "cpu_seconds", "cpu_ms_per_token", "segments", "segment_tokens", "update_chunk",
            "complete", "peak_rss_mb", "kv_bytes", "state_bytes", "documents")}
        d["buckets"] = [b.to_dict() for b in self.buckets]
        d["telemetry"] = {str(k): v for k, v in self.telemetry.items()}
        return d

    def table(self) -> str:
        return bucket_table(self.buckets, self.predicted, self.nll, self.ppl)

    def summary(self) -> str:
        chunk = "full read" if self.update_chunk is None else str(self.update_chunk)
        return (f"{self.tokens} tokens in {self.seconds:.2f} s: {self.tokens_per_s:.0f} tokens/s, "
                f"{self.ms_per_token:.3f} ms/token (CPU time {self.cpu_ms_per_token:.3f} ms/token), "
                f"peak RSS {self.peak_rss_mb:.0f} MiB "
                f"({self.segments} segments of {self.segment_tokens}, update chunk {chunk}"
                f"{'' if self.complete else ', paused'})")

    def telemetry_lines(self) -> List[str]:
        out = []
        for layer, t in sorted(self.telemetry.items()):
            out.append(f"memory layer {layer}: " + " ".join(
                f"{k}={int(v)}" if k == "tokens" else f"{k}={v:.4g}" for k, v in t.items()))
        return out


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------
@dataclass
class _Session:
    cache: LMCache
    pos: int
    stats: List[_Stats]
    prev_row: Optional[Tensor]  # (B, V) logits of the last position read
    digest: str  # chained sha256 over the segments read (identifies the document prefix)
    segments: int = 0
    nll_parts: Optional[List[List[np.ndarray]]] = None


def _weights_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _chain(digest: str, tokens: np.ndarray) -> str:
    return hashlib.sha256(digest.encode() + np.ascontiguousarray(tokens, dtype="<i8").tobytes()
                          ).hexdigest()


class StreamingReader:
    """Reads documents through ``model`` segment by segment with the cache carried.

    segment_tokens: tokens per forward call (absolute segment boundaries).
    update_chunk: FwPKM update window: ``"model"`` (default, the layers' ``chunk_size``), an int,
        or ``None`` = one update per full read (tokens stay pending until the end of the read,
        so memory grows with the document in that mode only).
    batch_size: documents read side by side by :meth:`read_many` (one memory per document).
    bucket_tokens: width of the first position bucket ([0, b), [b, 2b), [2b, 4b), ...).
    tokenizer: for documents given as paths or text.
    flush_at_end: write the last partial update window when a document ends (the final memory;
        no effect on the logits of the document).
    keep_token_nll: also return every token's NLL (memory grows with the document).
    """

    def __init__(self, model: LM, *, segment_tokens: int = 2048,
                 update_chunk: Union[int, None, str] = MODEL_CHUNK, batch_size: int = 1,
                 progress: bool = True, tokenizer=None, bucket_tokens: int = 1024,
                 encoding_errors: str = "strict", flush_at_end: bool = True,
                 keep_token_nll: bool = False, device: Union[str, torch.device, None] = None):
        for name, val in (("segment_tokens", segment_tokens), ("batch_size", batch_size),
                          ("bucket_tokens", bucket_tokens)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if update_chunk == MODEL_CHUNK:
            update_chunk = model.cfg.fwpkm_chunk_size
        elif update_chunk is not None and (isinstance(update_chunk, bool)
                                           or not isinstance(update_chunk, int) or update_chunk < 1):
            raise ValueError(f"update_chunk: expected a positive int, None (one update per full "
                             f"read) or 'model', got {update_chunk!r}")
        self.model = model
        self.segment_tokens = segment_tokens
        self.update_chunk: Optional[int] = update_chunk
        self.batch_size = batch_size
        self.progress = progress
        self.tokenizer = tokenizer
        self.bucket_tokens = bucket_tokens
        self.encoding_errors = encoding_errors
        self.flush_at_end = flush_at_end
        self.keep_token_nll = keep_token_nll
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._session: Optional[_Session] = None
        self._weights_sha: Optional[str] = None
        self.cache: Optional[LMCache] = None  # the cache after the last read (final memory)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, ckpt_dir: str, map_location: str = "cpu", **kw) -> "StreamingReader":
        """Model and tokenizer (``tokenizer.model`` if present) of a ``fwpkm train`` checkpoint."""
        model, tok = load_checkpoint(ckpt_dir, map_location)
        kw.setdefault("tokenizer", tok)
        return cls(model, **kw)

    def _settings(self) -> Dict[str, Any]:
        return {"segment_tokens": self.segment_tokens, "update_chunk": self.update_chunk,
                "bucket_tokens": self.bucket_tokens, "flush_at_end": self.flush_at_end,
                "keep_token_nll": self.keep_token_nll}

    def _new_cache(self, batch_size: int) -> LMCache:
        chunk = FULL_READ_CHUNK if self.update_chunk is None else self.update_chunk
        return LMCache.empty(self.model, batch_size, chunk_size=chunk)

    def _new_session(self, batch_size: int) -> _Session:
        return _Session(cache=self._new_cache(batch_size), pos=0,
                        stats=[_Stats(self.bucket_tokens) for _ in range(batch_size)],
                        prev_row=None, digest="",
                        nll_parts=[[] for _ in range(batch_size)] if self.keep_token_nll else None)

    @property
    def paused(self) -> bool:
        """True while a read was stopped (``stop_at``) or resumed and not yet finished."""
        return self._session is not None

    def reset(self) -> None:
        """Drop a paused read."""
        self._session = None

    # -- reading ------------------------------------------------------------------------------
    def read(self, doc, *, stop_at: Optional[int] = None, snapshot_every: Optional[int] = None,
             snapshot_path: Optional[PathLike] = None,
             on_segment: Optional[Callable[[int, Tensor, Tensor], None]] = None) -> StreamReport:
        """Read one document and report NLL/perplexity by position, speed and memory telemetry.

        ``stop_at=N`` pauses after the segment that reaches N tokens (snapshots are taken at
        segment boundaries, so a resumed read computes exactly what an uninterrupted one does);
        ``read(doc)`` again (same document, from its start) continues a paused or resumed read.
        ``snapshot_every=N`` with ``snapshot_path``: save a snapshot after every N tokens.
        ``on_segment(pos, tokens, logits)`` is called after each segment with its first position,
        its tokens (1, T) and logits (1, T, vocab).
        """
        if (snapshot_every is None) != (snapshot_path is None):
            raise ValueError("snapshot_every and snapshot_path go together")
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"snapshot_every: must be positive, got {snapshot_every}")
        src = open_document(doc, self.tokenizer, self.encoding_errors)
        sess = self._session
        if sess is not None:
            if len(sess.stats) != 1:
                raise ValueError("the paused read holds several documents; call reset() first")
            self._skip_prefix(src, sess)
        else:
            sess = self._session = self._new_session(1)
        return self._run([src], sess, stop_at, snapshot_every, snapshot_path, on_segment)

    def read_many(self, docs: Sequence) -> StreamReport:
        """Read several documents, ``batch_size`` side by side (one memory per document; the
        shorter ones are padded at their end, which never affects their own results). Returns
        the merged report; ``report.documents`` lists each document's tokens, NLL and perplexity.
        Telemetry is averaged over groups and, for groups of several documents, includes the
        padding positions."""
        if self._session is not None:
            raise ValueError("a read is paused; call reset() first")
        docs = list(docs)
        reports = []
        for g in range(0, len(docs), self.batch_size):
            srcs = [open_document(d, self.tokenizer, self.encoding_errors)
                    for d in docs[g: g + self.batch_size]]
            self._session = self._new_session(len(srcs))
            try:
                reports.append(self._run(srcs, self._session, None, None, None))
            finally:
                self._session = None
        return _merge_reports(reports, self)

    def _skip_prefix(self, src: TokenSource, sess: _Session) -> None:
        """Advance a resumed/paused document past the tokens already read, checking they are the
        same ones (chained hash over the same segments)."""
        digest, pos, S = "", 0, self.segment_tokens
        while pos < sess.pos:
            part = src.take(min(S - pos % S, sess.pos - pos))
            if len(part) == 0:
                break
            digest = _chain(digest, part)
            pos += len(part)
        if pos != sess.pos or digest != sess.digest:
            raise ValueError(f"doc: is not the document of the paused/resumed read (its first "
                             f"{sess.pos} tokens differ); pass the same document from its start, "
                             f"or call reset()")

    @torch.no_grad()
    def _run(self, srcs: List[TokenSource], sess: _Session, stop_at, snapshot_every,
             snapshot_path, on_segment=None) -> StreamReport:
        model, S, B = self.model, self.segment_tokens, len(srcs)
        V = model.cfg.vocab_size
        was_training = model.training
        model.eval()
        done = [False] * B
        lengths = [sess.pos] * B
        total = None
        if all(s.length is not None for s in srcs):
            total = sum(s.length for s in srcs)
        bar = None
        if self.progress:
            bar = tqdm(total=total, initial=sess.pos * B, unit="tok", unit_scale=True,
                       dynamic_ncols=True, leave=False, file=sys.stderr, desc="stream")
        tokens_timed, complete = 0, True
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            while True:
                if stop_at is not None and sess.pos >= stop_at:
                    complete = False
                    break
                n = S - sess.pos % S
                parts = [np.zeros(0, dtype=np.int64) if done[b] else srcs[b].take(n) for b in range(B)]
                lens = [len(p) for p in parts]
                for b in range(B):
                    if lens[b] < n:
                        done[b] = True
                    if lens[b] and (int(parts[b].min()) < 0 or int(parts[b].max()) >= V):
                        raise ValueError(f"doc: token ids must be in [0, {V}) (the model's "
                                         f"vocab_size), got {int(parts[b].min())}.."
                                         f"{int(parts[b].max())} near position {sess.pos}")
                T = max(lens)
                if T == 0:
                    break
                x = np.zeros((B, T), dtype=np.int64)
                for b in range(B):
                    x[b, :lens[b]] = parts[b]
                xt = torch.from_numpy(x).to(self.device)
                # the reader owns its cache: write the fast weights in place (no table copy)
                logits, sess.cache = model(xt, sess.cache, inplace_memory=True)
                self._score(sess, xt, logits, lens)
                if on_segment is not None:
                    on_segment(sess.pos, xt, logits)
                sess.prev_row = logits[:, -1].clone() if T else sess.prev_row
                if B == 1:
                    sess.digest = _chain(sess.digest, parts[0])
                old = sess.pos
                sess.pos += T
                sess.segments += 1
                for b in range(B):
                    lengths[b] += lens[b]
                tokens_timed += sum(lens)
                if bar is not None:
                    bar.update(sum(lens))
                if snapshot_every is not None and sess.pos // snapshot_every > old // snapshot_every \
                        and not all(done):
                    self.snapshot(snapshot_path)
                if all(done):
                    break
        finally:
            if bar is not None:
                bar.close()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        model.train(was_training)
        if complete and self.flush_at_end:
            for i, st in list(sess.cache.mem.items()):
                sess.cache.mem[i] = model.blocks[i].fwpkm.flush(st)
        self.cache = sess.cache
        if complete:
            self._session = None
        rep = self._report(sess, lengths, seconds, tokens_timed, complete, srcs)
        rep.cpu_seconds = cpu_seconds
        return rep

    def _score(self, sess: _Session, x: Tensor, logits: Tensor, lens: List[int]) -> None:
        """Per-token NLL of the segment: position a uses the last row of the previous segment."""
        B, T = x.shape
        a = sess.pos
        lf = logits.float()
        nll_rest = torch.logsumexp(lf[:, :-1], -1) - lf[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
        if sess.prev_row is not None:
            pr = sess.prev_row.float()
            first = torch.logsumexp(pr, -1) - pr.gather(-1, x[:, :1]).squeeze(-1)
            nll = torch.cat([first[:, None], nll_rest], 1)
            start = a
        else:
            nll, start = nll_rest, a + 1
        nll = nll.double().cpu().numpy()
        for b in range(B):
            m = lens[b] - (start - a)  # predicted tokens of this stream in the segment
            if m > 0:
                sess.stats[b].add(start, nll[b, :m])
                if sess.nll_parts is not None:
                    sess.nll_parts[b].append(nll[b, :m].astype(np.float32))

    def _report(self, sess, lengths, seconds, tokens_timed, complete, srcs) -> StreamReport:
        tel = {i: st.telemetry() for i, st in sess.cache.mem.items()}
        state_bytes = sum(st.nbytes() for st in sess.cache.mem.values())
        buckets = _merge_buckets([s.buckets() for s in sess.stats])
        docs = []
        for b, s in enumerate(sess.stats):
            pred, tot = sum(s.counts), sum(s.sums)
            docs.append({"name": srcs[b].name, "tokens": lengths[b], "predicted": pred,
                         "nll_sum": tot, "nll": tot / pred if pred else float("nan"),
                         "ppl": _nan_exp(tot / pred) if pred else float("nan")})
        token_nll = None
        if sess.nll_parts is not None and len(sess.nll_parts) == 1:
            parts = sess.nll_parts[0]
            token_nll = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return StreamReport(
            tokens=sum(lengths), predicted=sum(b.tokens for b in buckets),
            nll_sum=sum(b.nll_sum for b in buckets), buckets=buckets, seconds=seconds,
            tokens_timed=tokens_timed, segments=sess.segments, segment_tokens=self.segment_tokens,
            update_chunk=self.update_chunk, telemetry=tel, complete=complete,
            peak_rss_mb=peak_rss_mb(), kv_bytes=sess.cache.nbytes(), state_bytes=state_bytes,
            documents=docs, token_nll=token_nll)

    @torch.no_grad()
    def warmup(self, tokens: Optional[int] = None) -> float:
        """One untimed forward of ``tokens`` (default: one segment) random ids through a
        throwaway cache, so one-time costs of the process (kernel selection, first-touch
        allocations) stay out of the timings of the next read. Returns its seconds."""
        n = self.segment_tokens if tokens is None else int(tokens)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, self.model.cfg.vocab_size, (1, n), generator=g).to(self.device)
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        self.model(x, self._new_cache(1))
        self.model.train(was_training)
        return time.perf_counter() - t0

    # -- snapshots ------------------------------------------------------------------------------
    def weights_sha(self) -> str:
        if self._weights_sha is None:
            self._weights_sha = _weights_sha(self.model)
        return self._weights_sha

    def snapshot(self, path: PathLike) -> None:
        """Save the paused read (cache, position, statistics) to ``path`` (one ``torch.save``
        file, loadable with ``weights_only=True``, with a checksum; written atomically: the
        file at ``path`` is always a complete snapshot)."""
        sess = self._session
        if sess is None:
            raise ValueError("snapshot: no read in progress (use read(doc, stop_at=N) or "
                             "snapshot_every/snapshot_path)")
        if len(sess.stats) != 1:
            raise ValueError("snapshot: only single-document reads can be snapshot")
        cache = sess.cache.to_payload()
        payload = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "model_config": self.model.cfg.to_dict(),
            "weights_sha256": self.weights_sha(),
            "dtype": str(next(self.model.parameters()).dtype),
            "reader": self._settings(),
            "pos": int(sess.pos),
            "cache_pos": cache["pos"],
            "digest": sess.digest,
            "segments": int(sess.segments),
            "kv": cache["kv"],
            "mem": cache["mem"],
            "conv": cache["conv"],
            "stats": {"first": sess.stats[0].first, "sums": list(sess.stats[0].sums),
                      "counts": list(sess.stats[0].counts)},
            "prev_row": None if sess.prev_row is None else sess.prev_row.detach().cpu(),
            "token_nll": (None if sess.nll_parts is None else
                          torch.from_numpy(np.concatenate(sess.nll_parts[0]) if sess.nll_parts[0]
                                           else np.zeros(0, dtype=np.float32))),
        }
        # atomic and fsynced: a crash or kill mid-write leaves the previous snapshot whole
        write_sealed(payload, path)

    def resume(self, path: PathLike) -> "StreamingReader":
        """Load a snapshot; the next ``read(doc)`` (same document, from its start) continues it.
        Rejects another format/version, model config, weights or reader settings, and damaged
        files, with a ValueError starting with ``path``."""
        payload = load_snapshot(path)
        where = f"path: snapshot {os.fspath(path)!r}"
        try:
            self._session = self._session_from_payload(payload, where)
        except ValueError as exc:
            if str(exc).startswith("path"):
                raise
            raise ValueError(f"{where}: {exc}") from exc
        except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
            # only an edited file (checksum recomputed) or one older than checksums gets here
            raise ValueError(f"{where} is malformed ({exc!r})") from exc
        return self

    def _session_from_payload(self, payload: Dict[str, Any], where: str) -> _Session:
        cfg = LMConfig.from_dict(payload["model_config"])
        if cfg != self.model.cfg:
            a, b = cfg.to_dict(), self.model.cfg.to_dict()
            diff = [f"{k}: snapshot {a[k]!r} vs model {b[k]!r}" for k in sorted(a) if a[k] != b.get(k)]
            raise ValueError(f"{where} was taken with another model config ({'; '.join(diff)})")
        dtype = str(next(self.model.parameters()).dtype)
        if payload["dtype"] != dtype:
            raise ValueError(f"{where} was taken with model dtype {payload['dtype']}, this model "
                             f"is {dtype}")
        if payload["weights_sha256"] != self.weights_sha():
            raise ValueError(f"{where} was taken with other model weights (same config)")
        mine = self._settings()
        theirs = payload["reader"]
        diff = [f"{k}: snapshot {theirs.get(k)!r} vs reader {v!r}" for k, v in mine.items()
                if theirs.get(k) != v]
        if diff:
            raise ValueError(f"{where} was taken with other reader settings ({'; '.join(diff)})")
        # snapshots older than short convolutions have no "conv" entry
        cache = LMCache.from_payload({"pos": payload["cache_pos"], "kv": payload["kv"],
                                      "mem": payload["mem"], "conv": payload.get("conv") or {}},
                                     self.model, where)
        st = payload["stats"]
        prev = payload["prev_row"]
        tn = payload["token_nll"]
        return _Session(cache=cache.to(self.device), pos=int(payload["pos"]),
                        stats=[_Stats(int(st["first"]), st["sums"], st["counts"])],
                        prev_row=None if prev is None else prev.to(self.device),
                        digest=str(payload["digest"]), segments=int(payload["segments"]),
                        nll_parts=None if tn is None else [[tn.numpy()]])


def load_snapshot(path: PathLike) -> Dict[str, Any]:
    """Read and check the envelope of a snapshot file (format, version, checksum, entries);
    a file that is not one, or is damaged, raises a ValueError starting with ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: snapshot not found: {os.fspath(path)!r}")
    # snapshots written before checksums existed have none; every newer one is verified
    payload, intact = read_sealed(path, SNAPSHOT_FORMAT, "stream snapshot",
                                  {SNAPSHOT_VERSION: _SNAPSHOT_KEYS})
    if not intact:
        raise damaged(path)
    missing = [k for k in _SNAPSHOT_ENTRIES if k not in payload]
    if missing:
        raise ValueError(f"path: snapshot {os.fspath(path)!r} is malformed (missing {missing})")
    return payload


def _merge_reports(reports: List[StreamReport], reader: StreamingReader) -> StreamReport:
    if not reports:
        return StreamReport(0, 0, 0.0, [], 0.0, 0, 0, reader.segment_tokens, reader.update_chunk,
                            {}, True, peak_rss_mb())
    buckets = _merge_buckets([r.buckets for r in reports])
    tel: Dict[int, Dict[str, float]] = {}
    weights = [len(r.documents) for r in reports]
    for layer in reports[0].telemetry:
        keys = reports[0].telemetry[layer].keys()
        tel[layer] = {k: sum(w * r.telemetry[layer][k] for w, r in zip(weights, reports)) / sum(weights)
                      for k in keys}
        tel[layer]["tokens"] = float(sum(r.telemetry[layer]["tokens"] for r in reports))
    return StreamReport(
        tokens=sum(r.tokens for r in reports), predicted=sum(b.tokens for b in buckets),
        nll_sum=sum(b.nll_sum for b in buckets), buckets=buckets,
        seconds=sum(r.seconds for r in reports), tokens_timed=sum(r.tokens_timed for r in reports),
        cpu_seconds=sum(r.cpu_seconds for r in reports),
        segments=sum(r.segments for r in reports), segment_tokens=reader.segment_tokens,
        update_chunk=reader.update_chunk, telemetry=tel, complete=True, peak_rss_mb=peak_rss_mb(),
        kv_bytes=max(r.kv_bytes for r in reports), state_bytes=max(r.state_bytes for r in reports),
        documents=[d for r in reports for d in r.documents])


if __name__ == "__main__":  # `python -m fwpkm_ext.stream ...`: the `fwpkm stream` command
    from fwpkm_ext.cli.stream import main

    sys.exit(main())
