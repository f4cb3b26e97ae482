"""What the commands share: the parser and its one error handler, the model flags and the glue
from them to ``pretrained.load_checkpoint``, the reading and held-out split flags, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from ..input_checks import (check_checkpoint_dir, check_input_file, check_json_or_file,
                            check_output_path)
from ..model import LM, LMConfig, PRESETS, config_overrides
from ..pretrained import default_model_dir, load_checkpoint
from ..stream import MODEL_CHUNK, ByteTokenizer, StreamingReader
from ..tokenizer import Tokenizer

FORCE_BINARY_HELP = ("read input documents even when they do not look like text (by default a "
                     "document whose first 64 KiB are mostly undecodable UTF-8 or control bytes "
                     "is refused)")
ENCODING_ERRORS = ["strict", "latin1", "replace"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

#: registers a command (or a group of them) on an argparse subparsers object
AddCommand = Callable[[Any], None]


# --------------------------------------------------------------------------------------------
# The parser and the error handler
# --------------------------------------------------------------------------------------------
def build_parser(commands: Iterable[AddCommand], required: bool = False) -> argparse.ArgumentParser:
    """The `fwpkm` parser with ``commands`` (each command sets its handler as ``func``)."""
    parser = argparse.ArgumentParser(prog="fwpkm", description="Fast-weight Product Key Memory tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = required
    for add in commands:
        add(sub)
    return parser


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], int], help: str,
                description: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of command ``name`` on ``subparsers``; ``run`` calls ``func`` for it."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the parsed command. User errors (a bad path, config, checkpoint, snapshot, a missing
    package) are a message on stderr and exit code 2, not a traceback."""
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def command_main(add: AddCommand, command: Optional[str], argv: Optional[Sequence[str]]) -> int:
    """``main`` of one command's module (``python -m fwpkm_ext.stream ...``): ``fwpkm`` with that
    command only, whose word may be left out when ``command`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is not None and (not argv or argv[0] != command):
        argv = [command] + argv
    return run(build_parser([add], required=True).parse_args(argv))


def as_option(fn: Callable, option: str) -> Callable:
    """``fn`` with its errors about its ``path`` argument named after the command-line option."""

    def call(*a, **kw):
        try:
            return fn(*a, **kw)
        except (ValueError, FileNotFoundError) as exc:
            msg = str(exc)
            if not msg.startswith("path: "):
                raise
            raise type(exc)(f"{option}: {msg[len('path: '):]}") from exc

    return call


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (NaN allowed), written whole or not at all."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The model flags
# --------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --preset --random-init / --config / --tokenizer / --device / --dtype / --threads."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="CKPT", default=None,
                   help="checkpoint directory written by `fwpkm train` (config.json, "
                        "model.safetensors, tokenizer.model); default: the model bundled with "
                        "the package (docs/RESULTS.md)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="with --random-init: an untrained model of this preset")
    g.add_argument("--config", default=None,
                   help="LMConfig overrides for --preset (inline JSON object or a JSON file)")
    g.add_argument("--random-init", action="store_true",
                   help="use a randomly initialised model (--preset), no checkpoint")
    g.add_argument("--tokenizer", default=None,
                   help="sentencepiece model (default: CKPT/tokenizer.model; without one, text "
                        "is read as UTF-8 bytes)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="model dtype (fast weights stay float32, or float64 with float64)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def check_model_args(args: argparse.Namespace) -> None:
    """The path arguments of ``add_model_args`` exist (checked before any model is loaded)."""
    if args.model:
        check_checkpoint_dir(args.model, "--model")
    if args.tokenizer:
        check_input_file(args.tokenizer, "--tokenizer")
    check_json_or_file(args.config, "--config")


def load_model_from_args(args: argparse.Namespace, seed: int = 0):
    """(model, tokenizer or None) from the --model / --preset --random-init arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = None
    if args.model:
        if args.preset or args.random_init or args.config:
            raise ValueError("--model loads a checkpoint: --preset/--config/--random-init are for "
                             "an untrained model instead")
        model, tok = load_checkpoint(args.model)
    elif not (args.preset or args.random_init or args.config):
        args.model = default_model_dir()
        print(f"model: the bundled default ({args.model})", file=sys.stderr, flush=True)
        model, tok = load_checkpoint(args.model)
    else:
        if not (args.preset and args.random_init):
            raise ValueError("pass --model CKPT, or --preset NAME --random-init for an untrained "
                             "model (or neither, for the bundled default model)")
        cfg = LMConfig.preset(args.preset, **config_overrides(args.config))
        if args.tokenizer:
            tok = Tokenizer.load(args.tokenizer)
            if tok.vocab_size != cfg.vocab_size:
                cfg = cfg.replace(vocab_size=tok.vocab_size)
        torch.manual_seed(seed)
        model = LM(cfg)
    if args.tokenizer and args.model:
        tok = Tokenizer.load(args.tokenizer)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model's vocab_size is "
                         f"{model.cfg.vocab_size}")
    model = model.to(device=dev, dtype=DTYPES[args.dtype]).eval()
    return model, tok


def byte_fallback(model: LM, tok):
    """``tok`` or, when None, a :class:`ByteTokenizer` (checking the vocabulary is large enough)."""
    if tok is not None:
        return tok
    if model.cfg.vocab_size < 256:
        raise ValueError(f"reading text without a tokenizer uses UTF-8 bytes (256 ids); the model's "
                         f"vocab_size is {model.cfg.vocab_size}: pass --tokenizer")
    return ByteTokenizer()


# --------------------------------------------------------------------------------------------
# Reading and the held-out split
# --------------------------------------------------------------------------------------------
def parse_update_chunk(s: Optional[str]):
    """CLI value: 'model' (default), 'full' (one update per full read) or a positive int."""
    if s is None or s == "model":
        return MODEL_CHUNK
    if s in ("full", "none", "None"):
        return None
    try:
        v = int(s)
    except ValueError:
        raise ValueError(f"--update-chunk: expected 'model', 'full' or a positive int, got {s!r}") from None
    if v < 1:
        raise ValueError(f"--update-chunk: must be positive, got {v}")
    return v


def reader_from_args(args: argparse.Namespace, model: LM, tok,
                     snapshot: Optional[Dict[str, Any]] = None, **kw) -> StreamingReader:
    """A reader with the ``add_reader_args`` settings (``kw``: other reader arguments); when
    resuming, the flags left unset take the ``snapshot``'s values."""
    prev = snapshot["reader"] if snapshot else {}
    seg = args.segment_tokens if args.segment_tokens is not None else prev.get("segment_tokens", 2048)
    if args.update_chunk is None and snapshot:
        chunk = prev.get("update_chunk")
    else:
        chunk = parse_update_chunk(args.update_chunk)
    bucket = args.bucket_tokens if args.bucket_tokens is not None else prev.get("bucket_tokens", 1024)
    return StreamingReader(model, segment_tokens=seg, update_chunk=chunk, bucket_tokens=bucket,
                           tokenizer=tok, progress=not args.no_progress,
                           encoding_errors=args.encoding_errors, **kw)


def add_reader_args(p: argparse.ArgumentParser) -> None:
    """How documents are read: segments, update window, buckets, encoding, progress."""
    g = p.add_argument_group("reading")
    g.add_argument("--segment-tokens", type=int, default=None,
                   help="tokens per forward call (default 2048)")
    g.add_argument("--update-chunk", default=None,
                   help="FwPKM update window: 'model' (default: the layers' chunk size), 'full' "
                        "(one update per full read: every token stays pending until the end), "
                        "or a number of tokens")
    g.add_argument("--bucket-tokens", type=int, default=None,
                   help="width of the first position bucket (default 1024): [0,b) [b,2b) [2b,4b) ...")
    add_encoding_args(g, help="text files that are not valid UTF-8 (default: decode as Latin-1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_encoding_args(g, help: Optional[str] = None) -> None:
    """--encoding-errors (default latin1) and --force-binary."""
    g.add_argument("--encoding-errors", default="latin1", choices=ENCODING_ERRORS, help=help)
    g.add_argument("--force-binary", action="store_true", help=FORCE_BINARY_HELP)


def add_split_args(p: argparse.ArgumentParser) -> None:
    """--corpus / --val-fraction / --split-seed: the held-out documents of a training run."""
    g = p.add_argument_group("held-out split (defaults: the checkpoint's train_args.json)")
    g.add_argument("--corpus", default=None,
                   help="directory of .txt/.txt.gz files (default: the training corpus, else "
                        "../shared/data/gutenberg)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="validation share used in training (default: from the checkpoint, 0.1)")
    g.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/validation split (default: from the checkpoint, 0)")


def check_outputs(outputs: Sequence[Tuple[str, Optional[str]]]) -> None:
    """Each ``(option, path or None)`` given can be written (checked before the model loads)."""
    for name, out in outputs:
        if out:
            check_output_path(out, name)

