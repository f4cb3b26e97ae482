"""Text corpus -> packed token sequences for language-model training.

- A corpus is a directory of ``.txt`` / ``.txt.gz`` files; each file is one document.
- Files are decoded as UTF-8. Undecodable bytes raise a ``ValueError`` naming the file
  (``encoding_errors="strict"``, the library default); ``"latin1"`` decodes such a file as
  Latin-1 instead (with a warning), ``"replace"`` substitutes U+FFFD.
- Train/validation are split by whole documents with a fixed seed: validation books are never
  seen in training.
- Documents are concatenated, each followed by the EOS token (the boundary marker), and cut into
  sequences of ``seq_len + 1`` tokens (inputs and shifted targets).
- Training sequences are visited in a per-epoch permutation that depends only on the seed, so
  the position in the data is one integer (the number of sequences consumed) and resuming is
  exact. Optional synthetic needles ("The secret number for ID-xxxx is dddddd.") are inserted
  deterministically per sample.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import random
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np

__all__ = [
    "DEFAULT_CORPUS", "resolve_corpus", "list_corpus_files", "read_document", "iter_documents",
    "split_documents", "make_needle", "make_needles", "needle_sentence", "needle_query", "PackedData",
    "SPEC_WORDING", "VARIED_WORDINGS", "HELD_OUT_WORDING", "check_wording",
    "tokenize_documents", "read_corpus", "build_datasets", "Datasets", "insert_needles",
]

DEFAULT_CORPUS = os.path.join("..", "shared", "data", "gutenberg")
ENCODING_ERRORS = ("strict", "latin1", "replace")


class TokenizerLike(Protocol):
    """What the data pipeline needs of a tokenizer (``fwpkm_ext.tokenizer.Tokenizer`` has it).
    Declared here, not imported: the tokenizer module reads corpora with this one."""

    eos_id: int
    newline_id: Optional[int]

    def encode(self, text: str) -> List[int]: ...

    def fingerprint(self) -> str: ...


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def resolve_corpus(corpus: Optional[str]) -> str:
    """``corpus`` or, when None, the default ``../shared/data/gutenberg`` if it exists."""
    if corpus:
        return corpus
    if os.path.isdir(DEFAULT_CORPUS):
        return DEFAULT_CORPUS
    raise FileNotFoundError(
        f"no corpus given and the default corpus {DEFAULT_CORPUS!r} (relative to "
        f"{os.getcwd()!r}) does not exist: pass --corpus DIR (a directory of .txt/.txt.gz files)")


def list_corpus_files(corpus: str) -> List[str]:
    """Sorted ``.txt`` / ``.txt.gz`` files directly in ``corpus`` (or the file itself)."""
    if not os.path.exists(corpus):
        raise FileNotFoundError(f"corpus not found: {corpus!r} does not exist")
    if os.path.isfile(corpus):
        if corpus.endswith((".txt", ".txt.gz")):
            return [corpus]
        raise ValueError(f"corpus {corpus!r} is a file but not .txt or .txt.gz")
    files = sorted(
        os.path.join(corpus, f) for f in os.listdir(corpus)
        if f.endswith((".txt", ".txt.gz")) and os.path.isfile(os.path.join(corpus, f)))
    if not files:
        raise ValueError(f"corpus {corpus!r} is empty: it holds no .txt or .txt.gz files")
    return files


def read_document(path: str, encoding_errors: str = "strict") -> str:
    """Read one ``.txt`` or ``.txt.gz`` file as UTF-8 text (see module doc for ``encoding_errors``)."""
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read corpus file {path}: {e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{raw[e.start]:02x} at offset {e.start}"
        if encoding_errors == "strict":
            raise ValueError(
                f"corpus file {path} is not valid UTF-8 ({where}); re-encode it as UTF-8 or "
                f"use encoding_errors='latin1' / 'replace' (CLI: --encoding-errors)") from None
        if encoding_errors == "latin1":
            warnings.warn(f"{path} is not valid UTF-8 ({where}); decoded as Latin-1", stacklevel=2)
            text = raw.decode("latin-1")
        else:
            warnings.warn(f"{path} is not valid UTF-8 ({where}); bad bytes replaced", stacklevel=2)
            text = raw.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n")


def iter_documents(files: Sequence[str], encoding_errors: str = "strict",
                   skip_empty: bool = True) -> Iterator[Tuple[str, str]]:
    """Yields ``(path, text)``; raises if every document is empty."""
    n = 0
    for p in files:
        text = read_document(p, encoding_errors)
        if skip_empty and not text.strip():
            continue
        n += 1
        yield p, text
    if n == 0:
        raise ValueError(f"corpus is empty: all {len(files)} file(s) hold no text "
                         f"({', '.join(os.path.basename(f) for f in files[:5])})")


def split_documents(files: Sequence[str], val_fraction: float = 0.1, seed: int = 0,
                    ) -> Tuple[List[str], List[str]]:
    """Split documents (files) into train and validation by whole documents, reproducibly.

    At least one document goes to each side; ``val_fraction=0`` gives no validation set.
    """
    files = sorted(files)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return list(files), []
    if len(files) < 2:
        raise ValueError(
            f"the corpus has {len(files)} document(s); a train/validation split by whole "
            f"documents needs at least 2 (add files or set the validation fraction to 0)")
    rng = random.Random(f"fwpkm-split-{seed}")
    order = list(files)
    rng.shuffle(order)
    n_val = min(len(files) - 1, max(1, int(round(val_fraction * len(files)))))
    return sorted(order[n_val:]), sorted(order[:n_val])


# --------------------------------------------------------------------------------------------
# Needles (SPEC: "The secret number for ID-xxxx is dddddd.")
# --------------------------------------------------------------------------------------------
def make_needle(rng: random.Random) -> Tuple[str, str]:
    """A random (key, number): 4 hex chars and 6 digits."""
    key = "".join(rng.choice("0123456789abcdef") for _ in range(4))
    number = "".join(rng.choice("0123456789") for _ in range(6))
    return key, number


def make_needles(rng: random.Random, count: int) -> List[Tuple[str, str]]:
    """``count`` (key, number) pairs with distinct keys (repeats are drawn again)."""
    if count > 16 ** 4:
        raise ValueError(f"count: at most {16 ** 4} distinct keys, got {count}")
    out, keys = [], set()
    while len(out) < count:
        key, number = make_needle(rng)
        if key not in keys:
            keys.add(key)
            out.append((key, number))
    return out


SPEC_WORDING = "The secret number for ID-{key} is {number}."
# `--needle-wordings varied`: each training needle draws one of these (SPEC's among them). The
# wording `HELD_OUT_WORDING` never appears in training: it tests that a model learned to
# retrieve, not one sentence (`fwpkm niah --wording`).
VARIED_WORDINGS = (
    SPEC_WORDING,
    "The access code of user {key} is {number}.",
    "Remember that locker {key} opens with {number}.",
    "Agent {key} was given the number {number}.",
    "The password for account {key} is {number}.",
    "Room {key} has the phone extension {number}.",
    "The serial number of device {key} is {number}.",
    "Ticket {key} won the prize number {number}.",
)
HELD_OUT_WORDING = "The vault combination for box {key} is {number}."


def check_wording(wording: str) -> str:
    """A needle wording: a format string with one ``{key}`` before one ``{number}``; the query is
    its text up to ``{number}``. Raises ``ValueError`` naming ``wording`` otherwise."""
    if not isinstance(wording, str):
        raise TypeError(f"wording: expected a str, got {type(wording).__name__}")
    if wording.count("{key}") != 1 or wording.count("{number}") != 1 or \
            wording.index("{key}") > wording.index("{number}"):
        raise ValueError(f"wording: needs one {{key}} followed later by one {{number}}, got {wording!r}")
    try:
        wording.format(key="k", number="n")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"wording: not a valid format string ({exc}): {wording!r}") from None
    return wording


def needle_sentence(key: str, number: str, wording: Optional[str] = None) -> str:
    return (wording or SPEC_WORDING).format(key=key, number=number)


def needle_query(key: str, wording: Optional[str] = None) -> str:
    w = wording or SPEC_WORDING
    return w[: w.index("{number}")].format(key=key)


# --------------------------------------------------------------------------------------------
# Tokenized corpus and packing
# --------------------------------------------------------------------------------------------
def tokenize_documents(docs: Sequence[Tuple[str, str]], tok: TokenizerLike,
                       cache_dir: Optional[str] = None, tag: str = "") -> List[np.ndarray]:
    """Token ids (int32 arrays) of ``(path, text)`` documents, optionally cached on disk
    (keyed by the tokenizer, the files' paths, sizes and mtimes, and ``tag``)."""
    path = None
    if cache_dir:
        h = hashlib.sha256()
        h.update(tok.fingerprint().encode())
        h.update(tag.encode())
        for f, text in docs:
            try:
                st = os.stat(f)
                h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}|{len(text)}\n".encode())
            except OSError:
                h.update(text.encode("utf-8", "replace"))
        path = os.path.join(cache_dir, f"tokens-{h.hexdigest()[:20]}.npz")
        if os.path.isfile(path):
            try:
                with np.load(path) as z:
                    out = [z[f"d{i}"] for i in range(int(z["n"]))]
                if len(out) == len(docs):
                    return out
            except Exception:  # unreadable cache: recompute
                pass
    out = [np.asarray(tok.encode(text), dtype=np.int32) for _, text in docs]
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, n=np.int64(len(out)), **{f"d{i}": d for i, d in enumerate(out)})
        os.replace(tmp, path)
    return out


def read_corpus(corpus: str, encoding_errors: str = "strict") -> List[Tuple[str, str]]:
    """``(path, text)`` of every non-empty document of the corpus (errors if none)."""
    return list(iter_documents(list_corpus_files(corpus), encoding_errors))


class PackedData:
    """Documents joined with an EOS separator, cut into ``seq_len + 1``-token sequences.

    ``sample(i)`` for training: global sample number ``i`` (0, 1, 2, ... over all epochs) ->
    sequence ``perm_epoch[i % n]`` where the permutation depends on (seed, epoch) only.
    ``needle_rate``: probability that a training sample gets a needle pair (the fact early in
    the sequence, the same sentence as query + answer later), drawn per sample from the seed.
    """

    def __init__(self, docs: Sequence[np.ndarray], seq_len: int, eos_id: int, *, seed: int = 0,
                 shuffle_docs: bool = True, name: str = "train", allow_short: bool = False):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        docs = [np.asarray(d, dtype=np.int64) for d in docs if len(d) > 0]
        if shuffle_docs:
            order = list(range(len(docs)))
            random.Random(f"fwpkm-docs-{seed}-{name}").shuffle(order)
            docs = [docs[i] for i in order]
        eos = np.array([eos_id], dtype=np.int64)
        parts = []
        for d in docs:
            parts.extend([d, eos])
        self.stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.seed = seed
        self.name = name
        n = (len(self.stream) - 1) // seq_len
        if n < 1:
            if allow_short and len(self.stream) >= 2:
                # one shorter sequence: everything there is
                self.seq_len = len(self.stream) - 1
                n = 1
            else:
                raise ValueError(
                    f"the {name} split has {len(self.stream)} tokens, fewer than seq_len+1 = "
                    f"{seq_len + 1}: use a smaller --seq-len or a larger corpus")
        self.n = n
        self._perm_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return self.n

    @property
    def num_tokens(self) -> int:
        return int(len(self.stream))

    def sequence(self, j: int) -> np.ndarray:
        """The j-th packed sequence (seq_len + 1 tokens)."""
        a = j * self.seq_len
        return self.stream[a: a + self.seq_len + 1].copy()

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            self._perm_cache = (epoch, rng.permutation(self.n))
        return self._perm_cache[1]

    def sample(self, i: int, tok: Optional[TokenizerLike] = None, needle_rate: float = 0.0,
               needles: int = 1, answers: Optional[List[int]] = None,
               wordings: Optional[Sequence[str]] = None) -> np.ndarray:
        epoch, r = divmod(int(i), self.n)
        seq = self.sequence(int(self._perm(epoch)[r]))
        if needle_rate > 0 and tok is not None:
            seq = insert_needles(seq, tok, random.Random(f"fwpkm-needle-{self.seed}-{i}"),
                                 needle_rate, needles, answers, wordings)
        return seq

    def batch(self, start: int, batch_size: int, tok=None, needle_rate: float = 0.0,
              needles: int = 1, answers: Optional[List[Tuple[int, int]]] = None,
              wordings: Optional[Sequence[str]] = None) -> np.ndarray:
        """Samples ``start .. start + batch_size - 1`` stacked: (batch_size, seq_len + 1).
        ``answers`` receives ``(row, position)`` of every needle answer token."""
        rows = []
        for b in range(batch_size):
            pos: List[int] = []
            rows.append(self.sample(start + b, tok, needle_rate, needles, pos, wordings))
            if answers is not None:
                answers.extend((b, p) for p in pos)
        return np.stack(rows)

    def eval_sequences(self, count: int) -> List[int]:
        """``count`` sequence indices spread evenly over the split (deterministic)."""
        count = max(1, min(count, self.n))
        return sorted(set(np.linspace(0, self.n - 1, count).round().astype(int).tolist()))


def insert_needles(seq: np.ndarray, tok: TokenizerLike, rng: random.Random, rate: float,
                   count: int = 1, answers: Optional[List[int]] = None,
                   wordings: Optional[Sequence[str]] = None) -> np.ndarray:
    """With probability ``rate``: insert ``count`` needle sentences (distinct IDs) in the first
    quarter of ``seq`` and the same sentences again (query + answer, shuffled) in the second
    half, so every query is at least a quarter of the sequence after its fact (beyond a sliding
    attention window of that size); the length is kept. ``answers``, when given, receives the
    positions of the answer tokens of the queries (the digits after "... is ").
    ``wordings``: each needle draws one of these format strings (default: SPEC's only)."""
    if count < 1:
        raise ValueError(f"count: expected a positive number of needles, got {count}")
    if rng.random() >= rate:
        return seq
    L = len(seq)
    nl = [tok.newline_id] if tok.newline_id is not None and tok.newline_id > 0 else []
    needles = make_needles(rng, count)
    # draws only when wordings are given, so SPEC-only samples stay what they always were
    words = [rng.choice(list(wordings)) for _ in needles] if wordings else [None] * count
    sents = [tok.encode(needle_sentence(k, v, w)) for (k, v), w in zip(needles, words)]
    pieces = [nl + s + nl for s in sents]
    m = sum(len(p) for p in pieces)
    if 4 * m > L:  # too short to hold the facts and their queries meaningfully
        return seq
    # cut points in the original sequence: facts in [0, L/4 - m], queries in [L/2 - m, L - 2m]
    fact_cuts = sorted(rng.randrange(0, max(1, L // 4 - m + 1)) for _ in needles)
    query_cuts = sorted(rng.randrange(L // 2 - m, L - 2 * m + 1) for _ in needles)
    query_order = list(range(count))
    rng.shuffle(query_order)
    inserts = [(c, i, False) for i, c in enumerate(fact_cuts)]
    inserts += [(c, query_order[j], True) for j, c in enumerate(query_cuts)]
    parts, prev, pos = [], 0, 0
    for cut, i, is_query in inserts:  # already in order of cut
        parts.append(seq[prev:cut])
        pos += cut - prev
        prev = cut
        if is_query and answers is not None:
            q = tok.encode(needle_query(needles[i][0], words[i]))
            start = len(q) if sents[i][:len(q)] == q else len(sents[i]) - 7
            answers.extend(p for p in range(pos + len(nl) + start, pos + len(nl) + len(sents[i]))
                           if p < L)
        parts.append(np.asarray(pieces[i], dtype=seq.dtype))
        pos += len(pieces[i])
    parts.append(seq[prev:])
    return np.concatenate(parts)[:L].astype(seq.dtype)


@dataclass
class Datasets:
    train: PackedData
    val: Optional[PackedData]
    train_files: List[str]
    val_files: List[str]


def build_datasets(corpus: str, tok: TokenizerLike, seq_len: int = 4096, *, seed: int = 0,
                   val_fraction: float = 0.1, encoding_errors: str = "strict",
                   cache_dir: Optional[str] = None,
                   docs: Optional[List[Tuple[str, str]]] = None) -> Datasets:
    """Read, split (by document), tokenize and pack a corpus. ``docs`` may carry the already
    read ``(path, text)`` list of the corpus."""
    if docs is None:
        docs = read_corpus(corpus, encoding_errors)
    by_path = dict(docs)
    train_files, val_files = split_documents(list(by_path), val_fraction, seed)
    train_tok = tokenize_documents([(f, by_path[f]) for f in train_files], tok, cache_dir, "train")
    train = PackedData(train_tok, seq_len, tok.eos_id, seed=seed, name="train")
    val = None
    if val_files:
        val_tok = tokenize_documents([(f, by_path[f]) for f in val_files], tok, cache_dir, "val")
        val = PackedData(val_tok, seq_len, tok.eos_id, seed=seed, shuffle_docs=False,
                         name="validation", allow_short=True)
    return Datasets(train, val, train_files, val_files)
