"""`fwpkm info`: what was built (kernels, CUDA architectures, OpenMP) and the runtime, as JSON."""
from __future__ import annotations

import argparse
import json

import torch

from .. import build_info
from .common import add_command


def add_subcommand(sub) -> None:
    """Registers ``info`` on an argparse subparsers object."""
    add_command(sub, "info", info_cmd, "print build and runtime information as JSON")


def info_cmd(_args: argparse.Namespace) -> int:
    """`fwpkm info`: ``build_info()`` plus torch's version, threads and CUDA availability."""
    info = dict(build_info())
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    print(json.dumps(info, indent=2))
    return 0
