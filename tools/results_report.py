"""Tables and plots of docs/RESULTS.md from the runs' JSON files.

    python tools/results_report.py --run "(a) SWA only=runs/a" --run "(b) + FwPKM=runs/b" \
        --plots docs/results

Each run directory holds `metrics.jsonl` (fwpkm train), `ppl.json` (fwpkm eval ppl --json) and
`niah.json` (fwpkm niah --json). Prints markdown; writes ppl_by_position.png, niah.png and
training.png under --plots (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Tuple


def _load(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _metrics(run: str) -> List[Dict[str, Any]]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def training_table(runs: List[Tuple[str, str]]) -> str:
    rows = ["| run | steps | val ppl (packed 4K, step 0 -> last) | needle answer-token acc. "
            "(last 50 steps) | tokens/s |", "|---|---|---|---|---|"]
    for label, run in runs:
        m = _metrics(run)
        vals = [r for r in m if "val_ppl" in r]
        tr = [r for r in m if "loss" in r]
        nd = [r for r in tr if "needle_acc" in r][-5:]
        acc = sum(r["needle_acc"] for r in nd) / len(nd) if nd else float("nan")
        tps = tr[-1]["tokens_per_s"] if tr else float("nan")
        rows.append(f"| {label} | {tr[-1]['step'] if tr else 0} | "
                    f"{vals[0]['val_ppl']:.1f} -> {vals[-1]['val_ppl']:.1f} | {acc:.1%} | "
                    f"{tps:,.0f} |" if vals else f"| {label} | - | - | - | - |")
    return "\n".join(rows)


def ppl_table(runs: List[Tuple[str, str]]) -> str:
    data = [(label, _load(os.path.join(run, "ppl.json"))) for label, run in runs]
    data = [(label, d) for label, d in data if d]
    if not data:
        return "(no ppl.json)"
    labels = [b["label"] for b in data[0][1]["buckets"]]
    rows = ["| run | all tokens | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels)]
    for label, d in data:
        cells = [f"{b['ppl']:.1f}" for b in d["buckets"]]
        rows.append(f"| {label} | **{d['ppl']:.2f}** | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def niah_table(runs: List[Tuple[str, str]]) -> str:
    data = [(label, _load(os.path.join(run, "niah.json"))) for label, run in runs]
    data = [(label, d) for label, d in data if d]
    if not data:
        return "(no niah.json)"
    cols = [(L, n) for L in data[0][1]["lengths"] for n in data[0][1]["iters"]]
    rows = ["| run | " + " | ".join(f"{_tokens(L)} {n}-iter" for L, n in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for label, d in data:
        res = {(r["length"], r["iters"]): r for r in d["results"]}
        cells = []
        for key in cols:
            r = res.get(key)
            cells.append(f"{r['accuracy']:.0%} ({r['correct']}/{r['total']})" if r else "-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def digit_table(runs: List[Tuple[str, str]]) -> str:
    """A finer view than exact match: share of the 6 digits right at their position."""
    data = [(label, _load(os.path.join(run, "niah.json"))) for label, run in runs]
    data = [(label, d) for label, d in data if d]
    if not data:
        return "(no niah.json)"
    cols = [(L, n) for L in data[0][1]["lengths"] for n in data[0][1]["iters"]]
    rows = ["| run | " + " | ".join(f"{_tokens(L)} {n}-iter" for L, n in cols) +
            " | most common answer |", "|---|" + "---|" * (len(cols) + 1)]
    for label, d in data:
        cells = []
        for L, n in cols:
            rs = [r for r in d["records"] if r["length"] == L and r["iters"] == n]
            right = sum(sum(a == b for a, b in zip(r["answer"].strip()[:6], r["number"]))
                        for r in rs)
            cells.append(f"{right / max(1, 6 * len(rs)):.1%}")
        answers = [r["answer"].strip().split("\n")[0] for r in d["records"]]
        top = max(set(answers), key=answers.count) if answers else ""
        rows.append(f"| {label} | " + " | ".join(cells) +
                    f" | `{top}` ({answers.count(top)}/{len(answers)}) |")
    return "\n".join(rows)


def plots(runs: List[Tuple[str, str]], out_dir: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, run in runs:
        d = _load(os.path.join(run, "ppl.json"))
        if d:
            bs = d["buckets"]
            ax.plot(range(len(bs)), [b["ppl"] for b in bs], marker="o", label=label)
            ax.set_xticks(range(len(bs)))
            ax.set_xticklabels([b["label"] for b in bs], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("token position in the held-out document")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("streamed perplexity, fast weights carried", fontsize=9)
    fig.tight_layout()
    p = os.path.join(out_dir, "ppl_by_position.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ok = [(label, _load(os.path.join(run, "niah.json"))) for label, run in runs]
    ok = [(label, d) for label, d in ok if d]
    if ok:
        cols = [(L, n) for L in ok[0][1]["lengths"] for n in ok[0][1]["iters"]]
        w = 0.8 / len(ok)
        for i, (label, d) in enumerate(ok):
            res = {(r["length"], r["iters"]): r["accuracy"] for r in d["results"]}
            ax.bar([j + i * w for j in range(len(cols))], [res.get(c, 0.0) for c in cols], w,
                   label=label)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cols))])
        ax.set_xticklabels([f"{_tokens(L)}\n{n}-iter" for L, n in cols], fontsize=7)
        ax.set_ylim(0, 1)
        if all(r["accuracy"] == 0 for _, d in ok for r in d["results"]):
            ax.text(len(cols) / 2 - 0.5, 0.5, "0 correct in every cell", ha="center",
                    va="center", fontsize=10, color="0.4")
        ax.set_ylabel("exact-match accuracy")
        ax.legend(fontsize=8)
        ax.set_title("needle in a haystack (5 needles per sample)", fontsize=9)
        fig.tight_layout()
        p = os.path.join(out_dir, "niah.png")
        fig.savefig(p, dpi=110)
        written.append(p)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for label, run in runs:
        m = _metrics(run)
        tr = [r for r in m if "needle_acc" in r]
        if tr:
            axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label=label, lw=1)
            axes[1].plot([r["step"] for r in tr], [r["needle_acc"] for r in tr], label=label, lw=1)
    axes[0].set_title("training loss", fontsize=9)
    axes[1].set_title("needle answer tokens: argmax accuracy", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, "training.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--plots", default=None, metavar="DIR")
    a = ap.parse_args()
    runs = []
    for spec in a.run:
        if "=" not in spec:
            ap.error(f"--run: expected LABEL=DIR, got {spec!r}")
        label, run = spec.split("=", 1)
        runs.append((label, run))
    print("## Training\n\n" + training_table(runs))
    print("\n## Streamed perplexity (held-out books)\n\n" + ppl_table(runs))
    print("\n## Needle in a haystack\n\n" + niah_table(runs))
    print("\n### Digits right at their position (chance 10%)\n\n" + digit_table(runs))
    if a.plots:
        for p in plots(runs, a.plots):
            print(f"\nwrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
