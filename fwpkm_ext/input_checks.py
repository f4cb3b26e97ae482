"""Checks of the commands' input and output paths and documents: each fails fast, with an error
whose message starts with the argument's name, before a model is loaded (the checks take
milliseconds; loading and warming up a model takes seconds)."""
from __future__ import annotations

import codecs
import gzip
import os
import re
import zlib
from typing import Optional, Union

from .data import list_corpus_files

__all__ = ["TEXT_SNIFF_BYTES", "BINARY_FRACTION", "non_text_fraction", "check_document",
           "check_input_file", "check_json_or_file", "check_output_path", "check_checkpoint_dir",
           "check_corpus"]

PathLike = Union[str, os.PathLike]

#: how much of a document (decompressed, for .gz) `check_document` looks at
TEXT_SNIFF_BYTES = 64 * 1024
#: share of those bytes that are not text (undecodable as UTF-8, or control characters other
#: than \t \n \r \f) above which a document is refused as binary. Latin-script text in a legacy
#: 8-bit encoding (a few percent of such bytes; read with --encoding-errors latin1) stays far
#: below it; random or compressed data (about 55 %) and UTF-16 (about 50 %) are far above.
BINARY_FRACTION = 0.3
# control characters (C0 but \t \n \f \r, DEL, C1) and the lone surrogates that
# "surrogateescape" decodes each undecodable byte to
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\udc80-\udcff]")


def non_text_fraction(raw: bytes, final: bool = True) -> float:
    """Share of the bytes of ``raw`` that are not UTF-8 text or are control characters other
    than tab, newline, carriage return and form feed (``final=False``: ``raw`` is a prefix, a
    character cut at its end is not counted)."""
    if not raw:
        return 0.0
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(raw, final=final)
    return len(_NOT_TEXT.findall(text)) / len(raw)


def check_document(path: PathLike, name: str = "path", force_binary: bool = False) -> None:
    """Fail fast, with an error starting with ``name``, on a document the commands cannot read:
    missing, a directory, unreadable, a damaged .gz, or (unless ``force_binary``) data that is
    not text (see ``BINARY_FRACTION``; a .gz is judged by its decompressed start)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{name}: no such file: {p!r}")
    if os.path.isdir(p):
        raise ValueError(f"{name}: {p!r} is a directory, not a document")
    gz = p.endswith(".gz")
    try:
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
            raw = f.read(TEXT_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{name}: cannot read {p!r} ({exc})") from None
    if force_binary:
        return
    frac = non_text_fraction(raw, final=len(raw) < TEXT_SNIFF_BYTES)
    if frac > BINARY_FRACTION:
        raise ValueError(f"{name}: {p!r} does not look like text: {frac:.0%} of its first "
                         f"{len(raw)} bytes{' (decompressed)' if gz else ''} are not UTF-8 text "
                         f"or are control characters; pass --force-binary to read it anyway")


def check_input_file(path: PathLike, name: str) -> None:
    """``path`` is an existing, readable regular file (else an error starting with ``name``)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{name}: no such file: {p!r}")
    if not os.path.isfile(p):
        raise ValueError(f"{name}: {p!r} is not a file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{name}: {p!r} is not readable")


def check_json_or_file(value: Optional[str], name: str) -> None:
    """``value`` (when given) is inline JSON (it starts with "{") or names a readable file."""
    if value and not value.strip().startswith("{"):
        check_input_file(value.strip(), name)


def check_output_path(path: PathLike, name: str, directory: bool = False) -> None:
    """``path`` can be written: no directory (``directory=False``) or file (``True``) in its
    place, and its nearest existing parent is a writable directory (missing parents are
    created by the writers)."""
    p = os.path.abspath(os.fspath(path))
    if directory and os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"{name}: {os.fspath(path)!r} exists and is not a directory")
    if not directory and os.path.isdir(p):
        raise ValueError(f"{name}: {os.fspath(path)!r} is a directory")
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{name}: cannot create {os.fspath(path)!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {os.fspath(path)!r}: {parent!r} is not writable")


def check_checkpoint_dir(ckpt_dir: PathLike, name: str = "--model") -> None:
    """``ckpt_dir`` is a ``fwpkm train`` output directory (config.json, model.safetensors)."""
    d = os.fspath(ckpt_dir)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{name}: checkpoint directory not found: {d!r}")
    for f in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(d, f)):
            raise FileNotFoundError(f"{name}: {d!r} is not a checkpoint: {f} missing")


def check_corpus(corpus: str, name: str = "--corpus", force_binary: bool = False) -> None:
    """``corpus`` is a .txt/.txt.gz file or a directory holding some, each a readable text."""
    try:
        files = list_corpus_files(corpus)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    for f in files:
        check_document(f, name, force_binary)

