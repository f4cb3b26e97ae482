"""The `fwpkm` command line: `demo` (the main job), `info`, `stream`, `eval ppl|memory`, `niah`,
and (with the LM extras installed) `train` / `tokenizer`."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _info(_args) -> int:
    import torch

    from . import build_info

    info = dict(build_info())
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import add_demo_subcommand

    parser = argparse.ArgumentParser(prog="fwpkm", description="Fast-weight Product Key Memory tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_subcommand(sub)
    info = sub.add_parser("info", help="print build and runtime information as JSON")
    info.set_defaults(func=_info)
    try:
        from .train import add_train_subcommands
    except ImportError as exc:  # optional LM extras (sentencepiece, safetensors) missing
        missing = str(exc)

        def _needs_extras(_args, missing=missing):
            print(f"fwpkm: this command needs the LM extras: pip install 'fwpkm_ext[lm]' ({missing})",
                  file=sys.stderr)
            return 2

        for name in ("train", "tokenizer"):
            sub.add_parser(name, help="(needs pip install 'fwpkm_ext[lm]')").set_defaults(func=_needs_extras)
    else:
        add_train_subcommands(sub)
    from .evaluate import add_eval_subcommands
    from .niah import add_niah_subcommands
    from .stream import add_stream_subcommands

    add_stream_subcommands(sub)
    add_eval_subcommands(sub)
    add_niah_subcommands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # no subcommand: the main job on its embedded defaults
        args = parser.parse_args(["demo"] + list(argv if argv is not None else sys.argv[1:]))
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
