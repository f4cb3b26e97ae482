"""How much of a model's streamed perplexity comes from writing its fast weights.

    python tools/memory_ablation.py RUN [--corpus DIR] [--niah 4096,32768 --samples 4]

Reads the held-out documents of RUN (the `fwpkm eval ppl` protocol: in order, 2,048-token
segments, fast weights carried and written every chunk) twice: as trained, and with the
fast-weight step set to 0 (the memory keeps its initial tables and only reads them). The gap is
what test-time writing buys; the rest of any gain over a model without FwPKM comes from the
extra sublayer itself. With `--niah LENGTHS` it also runs the NIAH protocol (`fwpkm niah`,
2-iter, update chunk = whole input) both ways: a needle found only when the fast weights are
written was retrieved from the memory, not from the model's weights or its attention.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fwpkm_ext.evaluate import held_out_documents  # noqa: E402
from fwpkm_ext.niah import haystack_tokens, run_niah  # noqa: E402
from fwpkm_ext.pretrained import load_checkpoint  # noqa: E402
from fwpkm_ext.stream import StreamingReader, open_document  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--niah", default=None, metavar="LENGTHS",
                    help="also run NIAH (2-iter) at these comma-separated lengths, both ways")
    ap.add_argument("--samples", type=int, default=4, help="NIAH samples per length (5 needles each)")
    ap.add_argument("--skip-ppl", action="store_true", help="only the NIAH part")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_checkpoint(a.run)
    if not model.cfg.fwpkm_layers:
        raise SystemExit("the model has no FwPKM layer")
    _, docs, _ = held_out_documents(a.corpus, a.run)
    base = {i: model.blocks[i].fwpkm.config for i in model.cfg.fwpkm_layers}
    for name, over in (("fast weights written (as trained)", {}),
                       ("never written (fast-weight lr 0)", {"lr": 0.0})):
        for i, cfg in base.items():
            model.blocks[i].fwpkm.config = dataclasses.replace(cfg, **over)
        if not a.skip_ppl:
            rd = StreamingReader(model, segment_tokens=2048, bucket_tokens=1024, progress=False,
                                 tokenizer=tok)
            rep = rd.read_many([open_document(p, tok, "latin1") for p, _ in docs])
            print(f"{name:>34}: ppl {rep.ppl:.2f} over {rep.tokens} tokens", flush=True)
        if a.niah:
            lengths = [int(x) for x in a.niah.split(",") if x.strip()]
            out = run_niah(model, tok, haystack_tokens(docs, tok), lengths, [2], a.samples,
                           progress=False, log=None)
            cells = ", ".join(f"{r['length']}: {r['correct']}/{r['total']}" for r in out["results"])
            print(f"{name:>34}: NIAH 2-iter {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
