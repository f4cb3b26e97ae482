"""The walk-through of docs/TRANSFORMERS.md, end to end, on a CPU in about 20 s:

    OMP_NUM_THREADS=1 python tools/hf_demo.py --out /tmp/hfdemo            # retrofit, fine-tune, stream, generate
    OMP_NUM_THREADS=1 python tools/hf_demo.py --out /tmp/hfdemo --stream-only 65536

1. retrofit a Llama checkpoint with one FwPKM sublayer (a randomly initialised 4-layer, dim-256
   Llama saved locally stands in for a hub checkpoint: this machine has no hub access);
2. fine-tune the memory sublayer only on 1024-token windows of a long document;
3. save, reload without trust_remote_code, stream a 32K-token document at constant memory,
   generate from the streamed cache, save the memory beside the model, beam-search from it.

Needs the [hf] extra (transformers 5.x). The perplexities are those of an untrained base model:
this shows the mechanics and their cost, not a quality gain.
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import fwpkm_ext
from fwpkm_ext.integrations.transformers import (add_fwpkm, freeze_base, load_fwpkm_model,
                                                 load_memory, save_memory, stream_document)
from fwpkm_ext.pretrained import DEFAULT_MODEL_DIR
from fwpkm_ext.stream import SyntheticTokens
from fwpkm_ext.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="hf_demo_out")
    ap.add_argument("--stream-only", type=int, default=None, metavar="N",
                    help="only stream N synthetic tokens through the saved retrofitted model")
    args = ap.parse_args()
    base, retro = os.path.join(args.out, "base"), os.path.join(args.out, "retrofitted")
    if args.stream_only:
        model = load_fwpkm_model(retro)
        rep = stream_document(model, SyntheticTokens(args.stream_only, 8192), segment_tokens=512,
                              window=512, progress=False)
        print(f"{rep.tokens} tokens: {rep.tokens_per_s:.0f} tok/s, attention cache <= "
              f"{rep.max_kv_positions} positions, memory state {rep.state_bytes / 2**20:.1f} MiB, "
              f"peak RSS {rep.peak_rss_mb:.0f} MiB")
        return

    torch.manual_seed(0)
    # -- 1. retrofit ------------------------------------------------------------------------------
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=8192,
                                 max_position_embeddings=4096)).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = Tokenizer.load(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.model"))  # anything with encode()
    with open(os.path.join(DEFAULT_MODEL_DIR, "haystack.txt"), encoding="utf-8") as f:
        ids = torch.tensor([tok.encode(f.read())])                   # 4093 tokens
    with torch.no_grad():
        before = model(ids[:, :512]).logits
    add_fwpkm(model, layers=[1], chunk_size=256)                     # other options: the defaults
    with torch.no_grad():
        after = model(ids[:, :512]).logits
    print("identity at insertion:", torch.equal(before, after))
    n_mem = sum(p.numel() for n, p in model.named_parameters() if ".fwpkm." in n)
    print(f"FwPKM parameters: {n_mem:,} (+ {16384 * 256:,} seeded fast-weight values, not stored)")

    # -- 2. fine-tune the memory sublayer on long documents -------------------------------------------
    freeze_base(model).train()
    opt = torch.optim.AdamW(fwpkm_ext.param_groups(model, weight_decay=0.0), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(8):
        x = ids[:, 1024 * (step % 3): 1024 * (step % 3) + 1024]
        loss = model(input_ids=x, labels=x, use_cache=False).loss  # one document, 4 windows of 256
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    print(f"fine-tuning: {(time.perf_counter() - t0) / 8:.2f} s/step (1024 tokens)")
    model.eval()
    model.save_pretrained(retro)
    model = load_fwpkm_model(retro)                                  # no trust_remote_code

    # -- 3. stream a long document, then generate with what the memory wrote ---------------------------
    doc = ids[0].repeat(8)                                            # 32,744 tokens
    rep = stream_document(model, doc, segment_tokens=512, window=512, flush_at_end=False)
    print(f"streamed {rep.tokens} tokens in {rep.seconds:.1f} s ({rep.tokens_per_s:.0f} tok/s), "
          f"attention cache <= {rep.max_kv_positions} positions ({rep.max_kv_bytes / 2**20:.1f} MiB), "
          f"memory state {rep.state_bytes / 2**20:.1f} MiB, peak RSS {rep.peak_rss_mb:.0f} MiB")
    print(rep.table())
    prompt = torch.tensor([tok.encode("The password for account")])
    # a cache that holds positions expects the whole sequence; generate feeds only the new tokens
    out = model.generate(torch.cat([doc[None], prompt], 1), max_new_tokens=16, do_sample=False,
                         cache=rep.cache)
    print("generated after the stream:", tuple(out.shape), "memory tokens:",
          rep.cache.memory_states[1].tokens)
    save_memory(rep.cache, retro)                                     # beside the model
    cache = load_memory(model, retro, window=512)                     # empty attention, same memory
    beams = model.generate(prompt, max_new_tokens=16, num_beams=4, do_sample=False, cache=cache)
    print("beam search from the restored memory:", tuple(beams.shape))


if __name__ == "__main__":
    main()
