"""`fwpkm train` (a language model on a text corpus; the run itself: ``fwpkm_ext.train``) and
`fwpkm tokenizer train` (a SentencePiece tokenizer of a corpus)."""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Optional, Sequence

from ..data import resolve_corpus
from ..input_checks import check_corpus, check_output_path
from ..model import PRESETS
from ..tokenizer import train_tokenizer
from ..train import train
from .common import add_command, add_encoding_args, command_main


def add_subcommand(subparsers) -> None:
    """Registers ``train`` and ``tokenizer`` on an argparse subparsers object."""
    _add_train_args(add_command(subparsers, "train", train,
                                "train a language model (optionally with FwPKM)",
                                "Train the reference LM on a text corpus."))

    t = subparsers.add_parser("tokenizer", help="tokenizer tools",
                              description="SentencePiece BPE tokenizer (byte fallback).")
    tsub = t.add_subparsers(dest="tokenizer_cmd", metavar="{train}")
    tsub.required = True
    tt = add_command(tsub, "train", train_tokenizer_cmd, "train a tokenizer on a corpus")
    tt.add_argument("--corpus", default=None,
                    help="directory of .txt/.txt.gz files (default: ../shared/data/gutenberg)")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--out", required=True, help="path of the .model file to write")
    tt.add_argument("--max-lines", type=int, default=2_000_000,
                    help="sample at most this many lines for training")
    tt.add_argument("--seed", type=int, default=0)
    add_encoding_args(tt)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model preset (default: tiny)")
    g.add_argument("--config", default=None,
                   help="LMConfig overrides: a JSON file or an inline JSON object, applied on top "
                        "of the preset (e.g. '{\"dim\": 128, \"n_layers\": 2}')")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default=None,
                   help="directory of .txt/.txt.gz files (default: ../shared/data/gutenberg)")
    g.add_argument("--tokenizer", default=None,
                   help="sentencepiece model; if absent, one is trained on the training split "
                        "into OUT/tokenizer.model (or reused from there)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per training sequence (default: 4096 on GPU; 1024 on CPU, so "
                        "the tiny preset trains in minutes)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of documents held out for validation (default 0.1)")
    g.add_argument("--needle-rate", type=float, default=0.0,
                   help="probability that a training sequence gets synthetic needles")
    g.add_argument("--needles-per-seq", type=int, default=1,
                   help="needle facts (and later queries) in a sequence that gets needles "
                        "(default 1); the loss on their answers is logged as needle_loss")
    g.add_argument("--needle-loss-weight", type=float, default=0.0,
                   help="extra weight of the needle answers' mean loss in the objective (default "
                        "0: plain next-token loss); the logged loss stays the plain one")
    g.add_argument("--needle-wordings", default="spec", choices=["spec", "varied"],
                   help="needle sentences: SPEC's wording only (default), or each needle drawn "
                        "from 8 wordings (data.VARIED_WORDINGS; data.HELD_OUT_WORDING is never "
                        "used, so `fwpkm niah --wording` can test an unseen one)")
    add_encoding_args(g, help="files that are not valid UTF-8: fail (strict), decode as Latin-1 "
                              "with a warning (default), or replace bad bytes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences per micro-batch and process (default: 8 on GPU, 1 on CPU)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final lr of the cosine decay as a fraction of --lr (default 0.1)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default: 5%% of --steps, at most 1000)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--pkm-value-lr-scale", type=float, default=1.0,
                   help="lr multiplier of static PKM value tables (default 1.0)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output directory (checkpoints, logs)")
    g.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the weights of a saved model (model.safetensors + config.json, "
                        "e.g. a run's output or fwpkm_ext/default_model): every tensor of the same "
                        "name and shape is loaded, the FwPKM initial tables follow --config, new "
                        "tensors (e.g. query batch-norm statistics) keep their fresh values")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out exactly where it stopped")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype: auto = bfloat16 on GPU, float32 on CPU")
    g.add_argument("--val-every", type=int, default=100,
                   help="validate every N steps (and at the start and the end; 0: only those)")
    g.add_argument("--val-batches", type=int, default=4, help="batches per validation")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps (default: at validations and at the end)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="checkpoint and stop after this step (the schedule still follows "
                        "--steps); continue later with --resume")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_tokenizer_cmd(args: argparse.Namespace) -> int:
    """`fwpkm tokenizer train`: a BPE tokenizer of a corpus."""
    corpus = resolve_corpus(args.corpus)
    check_corpus(corpus, "--corpus", getattr(args, "force_binary", False))
    check_output_path(args.out, "--out")
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_tokenizer(corpus, vocab_size=args.vocab_size, max_lines=args.max_lines,
                              seed=args.seed, out=args.out, encoding_errors=args.encoding_errors)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"tokenizer: vocab_size={tok.vocab_size} written to {args.out} "
          f"({time.time() - t0:.1f}s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fwpkm_ext.train {train,tokenizer} ...``"""
    return command_main(add_subcommand, None, argv)

