"""The training arguments a run keeps next to its checkpoint (``train_args.json``): written by
``fwpkm train``, copied by the model export, read by the evaluations (the held-out split).

Paths are written relative to the directory the run was started in, never absolute: the file is
shipped with the bundled model and must not carry the layout of the machine that made it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

__all__ = ["TRAIN_ARGS_FILE", "portable_args", "write_training_args", "training_args",
           "copy_training_args"]

TRAIN_ARGS_FILE = "train_args.json"


def _portable(value: Any) -> Any:
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    try:
        return os.path.relpath(value)
    except ValueError:  # another drive (Windows): no relative path exists
        return os.path.basename(value)


def portable_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """``args`` with every absolute path made relative to the current directory (the one its
    relative paths were given from); the command's handler (``func``) left out."""
    return {k: _portable(v) for k, v in args.items() if k != "func"}


def write_training_args(out_dir: str, args: Mapping[str, Any]) -> None:
    """Write ``train_args.json`` (``portable_args(args)``) into ``out_dir``."""
    with open(os.path.join(out_dir, TRAIN_ARGS_FILE), "w", encoding="utf-8") as f:
        json.dump(portable_args(args), f, indent=2)


def training_args(ckpt: Optional[str]) -> Dict[str, Any]:
    """``train_args.json`` of a checkpoint directory ({} when absent or unreadable)."""
    if not ckpt:
        return {}
    try:
        with open(os.path.join(ckpt, TRAIN_ARGS_FILE), "r", encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def copy_training_args(src_dir: str, out_dir: str) -> bool:
    """Copy ``train_args.json`` of ``src_dir`` (if it has one) into ``out_dir``, with portable
    paths. Returns whether there was one."""
    if not os.path.isfile(os.path.join(src_dir, TRAIN_ARGS_FILE)):
        return False
    write_training_args(out_dir, training_args(src_dir))
    return True
