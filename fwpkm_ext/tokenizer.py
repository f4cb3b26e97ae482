"""SentencePiece BPE tokenizer with byte fallback.

The tokenizer is trained line by line on a corpus directory (``.txt`` / ``.txt.gz``), keeps
newlines as a token of their own (so decoded text has its line structure back), and keeps
the serialized model proto in memory so a checkpoint directory can hold a copy of it.

Special ids: 0 = <unk>, 1 = <s> (BOS), 2 = </s> (EOS, also the document separator), 3 = <pad>.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from typing import Iterable, Iterator, List, Optional, Sequence, Union

from .data import iter_documents, list_corpus_files

__all__ = ["Tokenizer", "train_tokenizer", "TOKENIZER_FILENAME"]

TOKENIZER_FILENAME = "tokenizer.model"


def _spm():
    try:
        import sentencepiece as spm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the tokenizer needs the 'sentencepiece' package: pip install sentencepiece") from e
    return spm


class Tokenizer:
    """Thin wrapper around a SentencePiece processor that remembers its model bytes."""

    def __init__(self, model_proto: bytes):
        if not model_proto:
            raise ValueError("empty tokenizer model")
        spm = _spm()
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except Exception as e:
            raise ValueError(f"not a valid sentencepiece model: {e}") from e
        nl = self.sp.piece_to_id("\n")
        self.newline_id: Optional[int] = nl if nl != self.sp.unk_id() else None
        # Our tokenizers keep "\n" as an atomic user-defined piece and add no dummy prefix, so a
        # text can be encoded line by line (in parallel) with the same result; check it.
        self._by_lines = False
        if self.newline_id is not None:
            probe = "Ab cd\n  ef.\n\nG h\n"
            self._by_lines = self._encode_lines(probe, 1) == list(self.sp.encode(probe, out_type=int))

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str) -> None:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)

    @classmethod
    def train(cls, corpus: Union[str, Sequence[str]], vocab_size: int = 8192, **kw) -> "Tokenizer":
        return train_tokenizer(corpus, vocab_size=vocab_size, **kw)

    # -- properties -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    # the special ids (fixed when trained: see the module doc)
    bos_id = property(lambda self: int(self.sp.bos_id()))
    eos_id = property(lambda self: int(self.sp.eos_id()))
    pad_id = property(lambda self: int(self.sp.pad_id()))
    unk_id = property(lambda self: int(self.sp.unk_id()))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()[:16]

    # -- encode / decode --------------------------------------------------------------------
    def _encode_lines(self, text: str, num_threads: int) -> List[int]:
        enc = self.sp.encode(text.split("\n"), out_type=int, num_threads=num_threads)
        out: List[int] = []
        for i, e in enumerate(enc):
            if i:
                out.append(self.newline_id)
            out.extend(e)
        return out

    def encode(self, text: str, bos: bool = False, eos: bool = False, num_threads: int = -1
               ) -> List[int]:
        if self._by_lines and len(text) > 10000:
            ids = self._encode_lines(text, num_threads)
        else:
            ids = list(self.sp.encode(text, out_type=int))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: List[str], num_threads: int = -1) -> List[List[int]]:
        return [list(x) for x in self.sp.encode(texts, out_type=int, num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha={self.fingerprint()})"


def _training_lines(texts: Iterable[str], max_lines: int, seed: int) -> Iterator[str]:
    """Non-empty lines of the corpus; reservoir-sampled down to ``max_lines``."""
    rng = random.Random(seed)
    reservoir: List[str] = []
    n = 0
    for text in texts:
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            if len(line.encode("utf-8")) > 4000:  # sentencepiece skips longer "sentences"
                line = line[:1000]
            n += 1
            if len(reservoir) < max_lines:
                reservoir.append(line)
            else:
                j = rng.randrange(n)
                if j < max_lines:
                    reservoir[j] = line
    return iter(reservoir)


def train_tokenizer(corpus: Union[str, Sequence[str]], vocab_size: int = 8192, *,
                    max_lines: int = 2_000_000, seed: int = 0, num_threads: Optional[int] = None,
                    out: Optional[str] = None, texts: Optional[Iterable[str]] = None,
                    encoding_errors: str = "strict") -> Tokenizer:
    """Train a BPE tokenizer with byte fallback on a corpus directory (or a list of files).

    ``texts`` may be given instead of ``corpus`` (an iterable of document strings). If the
    corpus is too small for ``vocab_size``, the vocabulary is made smaller rather than failing.
    ``out``: optional path to save the ``.model`` file to.
    """
    spm = _spm()
    if texts is None:
        files = list_corpus_files(corpus) if isinstance(corpus, str) else list(corpus)
        texts = (text for _, text in iter_documents(files, encoding_errors))
    lines = list(_training_lines(texts, max_lines, seed))
    if not lines:
        raise ValueError("cannot train a tokenizer: the corpus has no text")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 byte pieces + specials), got {vocab_size}")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=1_000_000,
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        minloglevel=2,
    )
    tok = Tokenizer(buf.getvalue())
    if out:
        tok.save(out)
    return tok
