"""`fwpkm demo`, the main job: the bundled language model (or --model CKPT) answers questions on
needle facts hidden in a long text (``demo.run_lm_demo``); ``--synthetic``: a FwPKM layer with
random projections memorizing associations (``demo.run_demo``)."""
from __future__ import annotations

import argparse

from ..data import read_document
from ..demo import run_demo, run_lm_demo
from ..input_checks import check_checkpoint_dir, check_document
from ..pretrained import load_checkpoint
from .common import FORCE_BINARY_HELP, add_command


def add_subcommand(sub) -> None:
    """Registers ``demo`` on an argparse subparsers object."""
    p = add_command(
        sub, "demo", demo_cmd,
        "the main job: a trained LM recalls needles from a long text (bundled model)",
        "Needles in a long text, answered by the bundled FwPKM language model (or "
        "--model CKPT); --synthetic: a FwPKM layer with random projections memorizing "
        "associations among random distractors (no trained weights).")
    p.add_argument("--model", default=None, metavar="CKPT",
                   help="checkpoint directory (default: the bundled model)")
    p.add_argument("--length", type=int, default=16384,
                   help="tokens of text the needles hide in (default 16384)")
    p.add_argument("--haystack", nargs="+", default=None, metavar="PATH",
                   help="text files to hide the needles in (default: bundled text)")
    p.add_argument("--force-binary", action="store_true", help=FORCE_BINARY_HELP)
    p.add_argument("--synthetic", action="store_true",
                   help="the layer-only association demo instead (options below)")
    g = p.add_argument_group("--synthetic options")
    g.add_argument("--distractors", type=int, default=131072, help="distractor tokens (default 131072)")
    g.add_argument("--pairs", type=int, default=256, help="associations written first (default 256)")
    g.add_argument("--n-subkeys", type=int, default=512)
    g.add_argument("--key-dim", type=int, default=512)
    g.add_argument("--value-dim", type=int, default=512)
    g.add_argument("--dim", type=int, default=512)
    g.add_argument("--topk", type=int, default=8)
    g.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--segment", type=int, default=None,
                   help="tokens per streaming call (default 2048; --synthetic: 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def demo_cmd(a: argparse.Namespace) -> int:
    """`fwpkm demo`: the LM needle demo, or with --synthetic the layer-only association demo."""
    if a.synthetic:
        run_demo(dim=a.dim, n_subkeys=a.n_subkeys, key_dim=a.key_dim, value_dim=a.value_dim,
                 topk=a.topk, chunk_size=a.chunk_size, pairs=a.pairs, distractors=a.distractors,
                 segment=a.segment or 4096, seed=a.seed, threads=a.threads,
                 progress=not a.no_progress)
        return 0
    # every path first: a wrong one must not wait for the model to load
    for p in a.haystack or ():
        check_document(p, "--haystack", a.force_binary)
    if a.model:
        check_checkpoint_dir(a.model, "--model")
    model = tok = None
    if a.model:
        model, tok = load_checkpoint(a.model)
    haystack = None
    if a.haystack:
        haystack = [(p, read_document(p, "latin1")) for p in a.haystack]
    run_lm_demo(model, tok, length=a.length, haystack=haystack, seed=a.seed,
                segment=a.segment or 2048, threads=a.threads)
    return 0
