"""Export a trained run as the package's bundled default model (fwpkm_ext/default_model/).

    python tools/export_default_model.py runs/results/b [--out fwpkm_ext/default_model]

Writes float16 weights (no initial fast-weight tables: they are regenerated from the seed),
the tokenizer, train_args.json, a haystack text sampled from the exported model, and
MODEL_CARD.json with the run's training command and its evaluation figures (ppl.json and
niah.json from the run directory, when present). Fails when the result exceeds 20 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fwpkm_ext.pretrained import DEFAULT_MODEL_DIR, export_model  # noqa: E402


def _card(run: str) -> dict:
    card: dict = {"source_run": os.path.basename(os.path.abspath(run))}
    targs = os.path.join(run, "train_args.json")
    if os.path.isfile(targs):
        with open(targs, encoding="utf-8") as f:
            a = json.load(f)
        flags = []
        for k in ("preset", "config", "init_from", "seq_len", "steps", "batch_size", "lr",
                  "warmup", "needle_rate", "needles_per_seq", "needle_wordings",
                  "needle_loss_weight", "seed", "val_every", "val_batches", "threads"):
            if a.get(k) is not None:
                v = a[k]
                flags.append(f"--{k.replace('_', '-')} " + (f"'{v}'" if k == "config" else str(v)))
        card["training_command"] = "fwpkm train --corpus ../shared/data/gutenberg " + " ".join(flags)
    for name in ("ppl", "niah"):
        p = os.path.join(run, f"{name}.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
            card[name] = ({"ppl": d["ppl"], "tokens": d["tokens"]} if name == "ppl"
                          else d.get("accuracy"))
    metrics = os.path.join(run, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8") as f:
            vals = [json.loads(x) for x in f if '"val_ppl"' in x]
        if vals:
            card["final_val_ppl_packed_4k"] = vals[-1]["val_ppl"]
    card["docs"] = "docs/RESULTS.md"
    return card


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a `fwpkm train` output directory")
    ap.add_argument("--out", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--haystack-tokens", type=int, default=4096)
    a = ap.parse_args()
    card = _card(a.run)
    if "niah" not in card:
        card["niah"] = None
    sizes = export_model(a.run, a.out, card=card, haystack_tokens=a.haystack_tokens)
    for f, n in sizes.items():
        print(f"{f:>20} {n / 1e6:8.2f} MB")
    print(f"{'total':>20} {sum(sizes.values()) / 1e6:8.2f} MB -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
