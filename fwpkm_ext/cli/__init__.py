"""The `fwpkm` command line: `demo` (the main job), `info`, `train` / `tokenizer`, `stream`,
`eval ppl|memory`, `niah`. One parser and one error handler (``common``); each command's module
adds its options (``add_subcommand``) and runs it (``*_cmd``) over the library."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .. import threads
from . import demo, eval, info, niah, stream, train
from .common import build_parser as _parser_of, run

#: every command, in the order `fwpkm --help` lists them
COMMANDS = (demo.add_subcommand, info.add_subcommand, train.add_subcommand, stream.add_subcommand,
            eval.add_subcommand, niah.add_subcommand)


def build_parser() -> argparse.ArgumentParser:
    """The `fwpkm` parser, every command on it."""
    return _parser_of(COMMANDS)


def main(argv: Optional[List[str]] = None) -> int:
    """`fwpkm ...` (the console script, and ``python -m fwpkm_ext``); no command runs `demo`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # no subcommand: the main job on its embedded defaults
        args = parser.parse_args(["demo"] + argv)
    # a laptop is never quiet: one thread while other processes hold the cores (threads.py)
    threads.enable()
    try:
        return run(args)
    finally:
        threads.disable()

