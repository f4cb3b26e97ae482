"""Loading checkpoints, and the default model shipped inside the package
(``fwpkm_ext/default_model/``).

``load_checkpoint`` is the one loader of a ``fwpkm train`` output directory (model and
tokenizer), used by every command and tool.

It is the best FwPKM model of docs/RESULTS.md (trained with ``fwpkm train``), stored with its
weights in float16 and without the initial fast-weight tables (regenerated from
``fwpkm_init_seed``), next to its tokenizer, its training arguments, a model card, and a
haystack text the model wrote itself (so `fwpkm demo` needs no corpus). `fwpkm demo`,
`fwpkm niah` and `fwpkm stream` use it when no ``--model`` is given.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch

from .input_checks import check_checkpoint_dir
from .model import LM
from .run_args import copy_training_args
from .tokenizer import TOKENIZER_FILENAME, Tokenizer

__all__ = ["load_checkpoint", "DEFAULT_MODEL_DIR", "REQUIRED_FILES", "default_model_dir",
           "has_default_model", "load_default_model", "default_haystack", "model_card",
           "export_model"]

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
REQUIRED_FILES = ("config.json", "model.safetensors", TOKENIZER_FILENAME)
HAYSTACK_FILE = "haystack.txt"
CARD_FILE = "MODEL_CARD.json"
MAX_BYTES = 20 * 1024 * 1024  # what the package may carry for its default model


def load_checkpoint(ckpt_dir: str, map_location: str = "cpu") -> Tuple[LM, Optional[Tokenizer]]:
    """(model in eval mode, tokenizer or None) of a ``fwpkm train`` output directory."""
    check_checkpoint_dir(ckpt_dir, "ckpt_dir")
    model = LM.from_pretrained(ckpt_dir, map_location=map_location)
    tpath = os.path.join(ckpt_dir, TOKENIZER_FILENAME)
    tok = Tokenizer.load(tpath) if os.path.isfile(tpath) else None
    return model.eval(), tok


def has_default_model() -> bool:
    return all(os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, f)) for f in REQUIRED_FILES)


def default_model_dir() -> str:
    """The bundled checkpoint directory; a clear error when this install does not have one."""
    if not has_default_model():
        missing = [f for f in REQUIRED_FILES
                   if not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, f))]
        raise FileNotFoundError(
            f"the bundled default model is missing {missing} in {DEFAULT_MODEL_DIR}; reinstall "
            f"fwpkm_ext, or pass --model CKPT (a `fwpkm train` output directory)")
    return DEFAULT_MODEL_DIR


def load_default_model(map_location: str = "cpu"):
    """``(model, tokenizer)`` of the bundled default model, in float32, in eval mode."""
    model, tok = load_checkpoint(default_model_dir(), map_location=map_location)
    if tok is None:
        raise FileNotFoundError(f"bundled default model: {TOKENIZER_FILENAME} missing in "
                                f"{DEFAULT_MODEL_DIR}")
    return model, tok


def default_haystack() -> Tuple[str, str]:
    """``(path, text)`` of the bundled haystack text (written by the default model itself)."""
    path = os.path.join(default_model_dir(), HAYSTACK_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundled haystack text missing: {path}")
    with open(path, encoding="utf-8") as f:
        return path, f.read()


def model_card(ckpt_dir: Optional[str] = None) -> Dict[str, Any]:
    """The model card (training command, figures) of a bundled or exported model, or {}."""
    path = os.path.join(ckpt_dir or DEFAULT_MODEL_DIR, CARD_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def export_model(ckpt_dir: str, out_dir: str, *, dtype: torch.dtype = torch.float16,
                 card: Optional[Dict[str, Any]] = None, haystack_tokens: int = 4096,
                 seed: int = 0, max_bytes: int = MAX_BYTES) -> Dict[str, int]:
    """Write a compact copy of a ``fwpkm train`` checkpoint into ``out_dir``: weights in
    ``dtype``, tokenizer, training arguments, ``card`` as MODEL_CARD.json, and
    ``haystack_tokens`` tokens of text sampled from the model (temperature 1, ``seed``).
    Raises ``ValueError`` when the result exceeds ``max_bytes``. Returns file sizes."""
    model, tok = load_checkpoint(ckpt_dir)
    if tok is None:
        raise ValueError(f"{ckpt_dir!r} has no {TOKENIZER_FILENAME}: the export needs one")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, dtype=dtype)
    tok.save(os.path.join(out_dir, TOKENIZER_FILENAME))
    copy_training_args(ckpt_dir, out_dir)  # its paths made relative: the export is shipped
    if haystack_tokens > 0:
        # the exported (rounded) weights write the text, so the demo reads what it would write
        small, _ = load_checkpoint(out_dir)
        text = _sample_text(small, tok, haystack_tokens, seed)
        with open(os.path.join(out_dir, HAYSTACK_FILE), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(out_dir, CARD_FILE), "w", encoding="utf-8") as f:
        json.dump(card or {}, f, indent=2, sort_keys=True)
    sizes = {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))}
    total = sum(sizes.values())
    if total > max_bytes:
        raise ValueError(f"exported model takes {total} bytes, more than the {max_bytes} allowed")
    return sizes


def _sample_text(model, tok, n_tokens: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    nl = getattr(tok, "newline_id", None)
    start = [int(nl)] if nl is not None and nl >= 0 else [int(tok.eos_id)]
    cache = model.init_cache(batch_size=1)
    logits, cache = model(torch.tensor([start]), cache)
    out = []
    while len(out) < n_tokens:
        probs = torch.softmax(logits[0, -1].float(), -1)
        nxt = int(torch.multinomial(probs, 1, generator=g))
        if nxt == tok.eos_id:
            nxt = start[0]
        out.append(nxt)
        logits, cache = model(torch.tensor([[nxt]]), cache)
    return tok.decode(out)
