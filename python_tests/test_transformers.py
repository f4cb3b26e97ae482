"""fwpkm_ext.integrations.transformers: FwPKM retrofitted into Hugging Face transformers 5.x models.

Skipped without transformers (the optional [hf] extra). Tiny random configs only: no hub access.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    pytest.skip("fwpkm_ext.integrations.transformers needs transformers 5.x", allow_module_level=True)

from transformers import (DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import fwpkm_ext  # noqa: E402
from fwpkm_ext.integrations.transformers import (FwPKMCache, add_fwpkm, freeze_base,  # noqa: E402
                                                 fwpkm_layers, load_fwpkm_model, load_memory,
                                                 save_memory, stream_document)

V = 128
# small enough that update windows complete inside the test sequences
OPTS = dict(n_subkeys=16, mem_k_dim=16, mem_v_dim=32, topk=4, chunk_size=4)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    elif kind == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))
    elif kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=256,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:
        raise AssertionError(kind)
    return m.eval()


def retrofit(kind: str, layers=(1,), seed: int = 0, active: bool = True, **opts):
    """A tiny model with FwPKM at ``layers``; ``active``: a non-zero output projection, as after
    training, so the memory changes the logits. ``tables_seed``: the seed of the fast weights."""
    tables_seed = opts.pop("tables_seed", 0)
    m = add_fwpkm(make(kind, seed), list(layers), seed=tables_seed, **{**OPTS, **opts})
    if active:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for fw in fwpkm_layers(m).values():
                fw.to_out.weight.copy_(torch.randn(fw.to_out.weight.shape, generator=g) * 0.5)
    return m


def ids(B, T, seed=0):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def incremental(m, x, pieces, cache=None):
    cache = FwPKMCache(config=m.config) if cache is None else cache
    out, t = [], 0
    with torch.no_grad():
        for p in pieces:
            out.append(m(input_ids=x[:, t:t + p], cache=cache, use_cache=True).logits)
            t += p
    assert t == x.shape[1]
    return torch.cat(out, 1), cache


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3"])
def test_identity_at_insertion(kind):
    m = make(kind)
    x = ids(2, 12)
    with torch.no_grad():
        before = m(x).logits
        before_nc = m(x, use_cache=False).logits
    add_fwpkm(m, [0, -1], **OPTS)
    assert sorted(fwpkm_layers(m)) == [0, 1]
    fw = fwpkm_layers(m)[0]
    assert fw.dim == 64 and fw.config.chunk_size == 4
    assert torch.count_nonzero(fw.to_out.weight) == 0 and torch.count_nonzero(fw.to_out.bias) == 0
    with torch.no_grad():
        cache = FwPKMCache(config=m.config)
        after = m(x, cache=cache, use_cache=True).logits
        after_nc = m(x, use_cache=False).logits
    assert torch.equal(before, after) and torch.equal(before_nc, after_nc)
    # the memory did read and write (one memory per sequence in the cache)
    st = cache.memory_states[0]
    assert st.per_sequence and st.keys.shape[0] == 2 and st.tokens == 24
    assert not torch.equal(st.values[0], fw.init_values)
    assert m.config.fwpkm["layers"] == [0, 1]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral", "qwen2"])
def test_incremental_equals_full_forward(kind):
    m = retrofit(kind)
    x = ids(1, 23, seed=1)
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        base = make(kind)(x, use_cache=False).logits
    assert (full - base).abs().max() > 1e-3  # the memory matters
    for pieces in ([1] * 23, [5, 1, 7, 3, 7]):
        inc, cache = incremental(m, x, pieces)
        torch.testing.assert_close(inc, full, rtol=1e-5, atol=2e-5)
        st = cache.memory_states[1]
        assert st.tokens == 23 and st.pending == 23 % 4


def test_bfloat16_model_keeps_float32_fast_weights():
    m = retrofit("llama").to(torch.bfloat16)
    fw = fwpkm_layers(m)[1]
    assert fw.to_q.weight.dtype == torch.bfloat16 and fw.init_values.dtype == torch.float32
    x = ids(1, 13, seed=15)
    with torch.no_grad():
        full = m(x, use_cache=False).logits.float()
    inc, cache = incremental(m, x, [6, 7])
    assert cache.memory_states[1].values.dtype == torch.float32
    torch.testing.assert_close(inc.float(), full, rtol=0.05, atol=0.05)


def test_default_dynamic_cache_is_adopted():
    m = retrofit("llama")
    x = ids(1, 10)
    c = DynamicCache(config=m.config)
    with torch.no_grad():
        a = m(x, cache=c, use_cache=True).logits
        b = m(x, use_cache=False).logits
    assert isinstance(c, FwPKMCache) and 1 in c.memory_states
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def _greedy_reference(m, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_greedy_carries_memory(kind):
    m = retrofit(kind)
    prompt = ids(1, 9, seed=2)
    cache = FwPKMCache(config=m.config)
    out = m.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache=cache)
    # the reference re-reads the whole sequence through the memory at every step
    assert torch.equal(out, _greedy_reference(m, prompt, 8))
    st = cache.memory_states[1]
    assert st.tokens == 9 + 8 - 1  # the last token is never fed back
    assert not torch.equal(st.values[0], fwpkm_layers(m)[1].init_values)
    # without an explicit cache generate's own DynamicCache carries the memory as well
    out2 = m.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out2, out)


def test_generate_sampling_carries_memory():
    m = retrofit("llama")
    prompt = ids(1, 6, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        cache = FwPKMCache(config=m.config)
        runs.append(m.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0,
                               cache=cache))
        assert cache.memory_states[1].tokens == 6 + 6 - 1
    assert torch.equal(runs[0], runs[1])


def test_beam_search_scores_match_full_forward():
    """The beams' scores are computed with the carried memory; they equal the log-probabilities
    of the returned sequences recomputed from scratch only if every reorder moved the memories."""
    m = retrofit("llama")
    prompt = ids(1, 7, seed=4)
    cache = FwPKMCache(config=m.config)
    out = m.generate(prompt, max_new_tokens=6, min_new_tokens=6, num_beams=4, num_return_sequences=4,
                     do_sample=False, length_penalty=0.0, output_scores=True,
                     return_dict_in_generate=True, cache=cache)
    seqs = out.sequences
    assert cache.memory_states[1].keys.shape[0] == 4  # one memory per beam
    with torch.no_grad():
        logp = torch.log_softmax(m(seqs, use_cache=False).logits.float(), -1)
    P = prompt.shape[1]
    ref = logp[:, P - 1:-1].gather(-1, seqs[:, P:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, ref, rtol=1e-4, atol=1e-4)


def test_cache_batch_ops_move_memories():
    m = retrofit("llama")
    x = ids(3, 10, seed=5)
    _, cache = incremental(m, x, [10])
    before = cache.memory_snapshot()[1]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    st = cache.memory_states[1]
    for row, src in enumerate([2, 0, 0]):
        assert torch.equal(st.values[row], before.values[src])
        assert torch.equal(st.keys[row], before.keys[src])
        assert torch.equal(st.pending_q[row], before.pending_q[src])
    cache.batch_select_indices(torch.tensor([0]))
    assert cache.memory_states[1].keys.shape[0] == 1
    cache.batch_repeat_interleave(2)
    assert cache.memory_states[1].keys.shape[0] == 2
    assert torch.equal(cache.memory_states[1].values[1], before.values[2])
    with pytest.raises(NotImplementedError):
        cache.crop(-1)
    assert not cache.is_croppable


def test_batched_memories_are_per_sequence():
    m = retrofit("llama")
    x = ids(2, 11, seed=6)
    inc, cache = incremental(m, x, [4, 7])
    assert cache.memory_states[1].keys.shape[0] == 2
    gen = m.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                     cache=FwPKMCache(config=m.config))
    for b in range(2):
        alone, _ = incremental(m, x[b:b + 1], [11])
        torch.testing.assert_close(inc[b:b + 1], alone, rtol=1e-5, atol=2e-5)
        gen1 = m.generate(x[b:b + 1], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                          cache=FwPKMCache(config=m.config))
        assert torch.equal(gen[b:b + 1], gen1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padded_batch_memories_equal_running_alone(kind):
    """Left padding: each sequence's memory reads and writes only its real tokens, with its own
    update windows, so every row generates what it generates alone."""
    m = retrofit(kind)
    x = ids(3, 11, seed=13)
    am = torch.ones(3, 11, dtype=torch.long)
    am[0, :4] = 0
    am[2, :1] = 0
    x = x.masked_fill(am == 0, 0)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cache = FwPKMCache(config=m.config)
    out = m.generate(x, attention_mask=am, cache=cache, **kw)
    rows = cache.memory_states[1]
    assert isinstance(rows, list) and len(rows) == 3
    for b in range(3):
        real = x[b:b + 1, am[b] == 1]
        alone_cache = FwPKMCache(config=m.config)
        alone = m.generate(real, cache=alone_cache, **kw)
        assert torch.equal(out[b, -6:], alone[0, -6:]), b
        assert rows[b].tokens == alone_cache.memory_states[1].tokens == real.shape[1] + 5
        # batched attention rounds differently from a batch of one: close, not bit-equal
        torch.testing.assert_close(rows[b].values, alone_cache.memory_states[1].values,
                                   rtol=1e-5, atol=1e-5)
    # beams over a padded batch: the per-row memories are reordered (copies, never shared)
    cache = FwPKMCache(config=m.config)
    m.generate(x, attention_mask=am, cache=cache, num_beams=2, **kw)
    rows = cache.memory_states[1]
    assert len(rows) == 6 and len({id(r.values) for r in rows}) == 6
    # without a cache (training), padding tokens write nothing; the call still runs
    with torch.no_grad():
        assert torch.isfinite(m(x, attention_mask=am, use_cache=False).logits).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_load_round_trip(kind, tmp_path):
    m = retrofit(kind, layers=(0, 1), query_norm="zscore", gate_bias=-1.0, tables_seed=3)
    path = str(tmp_path / "model")
    m.save_pretrained(path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["fwpkm"]["layers"] == [0, 1] and cfg["fwpkm"]["options"]["n_subkeys"] == 16
    assert cfg["fwpkm"]["seed"] == 3 and cfg["fwpkm"]["options"]["query_norm"] == "zscore"
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".fwpkm.to_out.weight" in k for k in keys)
    assert not any(k.endswith((".init_values", ".init_keys")) for k in keys)  # seeded, not stored
    m2 = load_fwpkm_model(path)
    assert type(m2) is type(m) and sorted(fwpkm_layers(m2)) == [0, 1]
    x = ids(1, 14, seed=7)
    with torch.no_grad():
        assert torch.equal(m(x, use_cache=False).logits, m2(x, use_cache=False).logits)
    for i in (0, 1):
        assert torch.equal(fwpkm_layers(m2)[i].init_values, fwpkm_layers(m)[i].init_values)
    # a memory saved beside the model continues where it was
    _, cache = incremental(m, x, [14])
    save_memory(cache, path)
    restored = load_memory(m2, path)
    y = ids(1, 6, seed=8)
    with torch.no_grad():
        a = m(y, cache=FwPKMCache(config=m.config, memory=cache.memory_snapshot()), use_cache=True).logits
        b = m2(y, cache=restored, use_cache=True).logits
    assert torch.equal(a, b)
    assert restored.memory_states[1].tokens == 14 + 6


def test_short_conv_streams_and_round_trips(tmp_path):
    """short_conv=W: the memory reads h + causal_conv(h); the conv's last W-1 inputs travel in the
    cache (any split == one call; padded rows; beams; saved beside the memory)."""
    x = ids(2, 19, seed=16)
    base = make("llama")
    with torch.no_grad():
        ref = base(x, use_cache=False).logits
    m = retrofit("llama", active=False, short_conv=3)
    with torch.no_grad():
        assert torch.equal(m(x, use_cache=False).logits, ref)  # still an identity
    m = retrofit("llama", short_conv=3)
    assert fwpkm_layers(m)[1].short_conv.kernel_size == (3,)
    x1 = x[:1]
    with torch.no_grad():
        full = m(x1, use_cache=False).logits
    for pieces in ([1] * 19, [2, 5, 1, 11]):
        inc, cache = incremental(m, x1, pieces)
        torch.testing.assert_close(inc, full, rtol=1e-5, atol=2e-5)
        assert cache.conv_tails[1].shape == (1, 2, 64)
    # padded rows keep their own tails
    am = torch.ones(2, 19, dtype=torch.long)
    am[0, :5] = 0
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out = m.generate(x, attention_mask=am, cache=FwPKMCache(config=m.config), **kw)
    for b in range(2):
        alone = m.generate(x[b:b + 1, am[b] == 1], cache=FwPKMCache(config=m.config), **kw)
        assert torch.equal(out[b, -4:], alone[0, -4:])
    m.generate(x1, num_beams=3, cache=FwPKMCache(config=m.config), **kw)
    # save/load: model, memory and tails
    m.save_pretrained(str(tmp_path))
    m2 = load_fwpkm_model(str(tmp_path))
    assert torch.equal(fwpkm_layers(m2)[1].short_conv.weight, fwpkm_layers(m)[1].short_conv.weight)
    _, cache = incremental(m, x1, [19])
    save_memory(cache, str(tmp_path))
    restored = load_memory(m2, str(tmp_path))
    assert torch.equal(restored.conv_tails[1], cache.conv_tails[1])
    y = ids(1, 5, seed=17)
    fresh = FwPKMCache(config=m.config, memory=cache.memory_snapshot(), conv_tails=dict(cache.conv_tails))
    with torch.no_grad():
        a = m(y, cache=fresh, use_cache=True).logits
        b = m2(y, cache=restored, use_cache=True).logits
        c = m2(y, cache=FwPKMCache(config=m.config, memory=cache.memory_snapshot()),
               use_cache=True).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the tail matters


def test_stream_document_constant_memory():
    m = retrofit("llama")
    doc = ids(1, 96, seed=9)[0]
    with torch.no_grad():
        logits = m(doc[None], use_cache=False).logits[0].float()
    full_nll = torch.nn.functional.cross_entropy(logits[:-1], doc[1:]).item()
    # a window longer than the document: the stream equals one forward
    rep = stream_document(m, doc, segment_tokens=10, window=128, progress=False, flush_at_end=False)
    assert rep.tokens == 96 and rep.predicted == 95 and rep.segments == 10
    assert rep.table().splitlines()[-1].split()[:2] == ["all", "95"]
    assert rep.nll == pytest.approx(full_nll, rel=1e-5, abs=1e-5)
    # generating from the streamed cache (the whole sequence given, only the prompt is fed)
    prompt = ids(1, 5, seed=2)
    seq = torch.cat([doc[None], prompt], 1)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(m.generate(seq, cache=rep.cache, **kw),
                       m.generate(seq, cache=FwPKMCache(config=m.config), **kw))
    # a short window: the attention cache stays bounded, the memory keeps a constant size
    rep = stream_document(m, doc.tolist(), segment_tokens=8, window=16, progress=False)
    assert rep.max_kv_positions == 16 and rep.kv_positions_per_segment[-6:] == [16] * 6
    assert rep.state_bytes == rep.cache.memory_nbytes() and rep.cache.memory_states[1].pending == 0
    nbytes = rep.cache.memory_states[1].nbytes()
    rep2 = stream_document(m, ids(1, 200, seed=10)[0], segment_tokens=8, window=16, progress=False)
    assert rep2.max_kv_positions == 16 and rep2.cache.memory_states[1].nbytes() == nbytes
    assert rep2.max_kv_bytes == rep.max_kv_bytes
    with pytest.raises(ValueError, match="absolute"):
        stream_document(retrofit("gpt2"), ids(1, 300)[0], progress=False)


def test_training_plain_loop_reduces_loss():
    m = freeze_base(retrofit("llama", active=False)).train()
    base = {k: v.clone() for k, v in m.state_dict().items() if ".fwpkm." not in k}
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".fwpkm." in n for n in trainable)
    groups = fwpkm_ext.param_groups(m, weight_decay=0.0)
    table_ids = {id(fw.init_values) for fw in fwpkm_layers(m).values()}
    assert not table_ids & {id(p) for g in groups for p in g["params"]}
    opt = torch.optim.AdamW(groups, lr=3e-2)
    x = ids(2, 24, seed=11)
    losses = []
    for _ in range(6):
        loss = m(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    for k, v in m.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k


def test_gradient_checkpointing_gives_the_same_gradients():
    """The FwPKM hook runs outside the checkpointed layer (once per forward); under gradient
    checkpointing transformers drops the cache, so the memory is the whole-document one."""
    x = ids(2, 16, seed=14)
    grads = []
    for gc in (False, True):
        m = freeze_base(retrofit("llama")).train()
        if gc:
            m.gradient_checkpointing_enable()
        m(input_ids=x, labels=x, use_cache=False if not gc else None).loss.backward()
        grads.append(fwpkm_layers(m)[1].to_q.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_training_with_trainer(tmp_path):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it; not in the test extra
    from transformers import Trainer, TrainingArguments

    m = retrofit("gpt2", active=False).train()
    data = [{"input_ids": t, "labels": t} for t in ids(4, 16, seed=12)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    before = fwpkm_layers(m)[1].to_out.weight.detach().clone()
    Trainer(model=m, args=args, train_dataset=data).train()
    assert not torch.equal(fwpkm_layers(m)[1].to_out.weight.detach(), before)


def test_unsupported_architecture_and_bad_layers():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=64))
    with pytest.raises(ValueError, match="supported model types: gpt2, llama, mistral, qwen2, qwen3"):
        add_fwpkm(neox, [0])
    m = make("llama")
    with pytest.raises(ValueError, match="layer indices"):
        add_fwpkm(m, [2])
    with pytest.raises(ValueError, match="distinct"):
        add_fwpkm(m, [0, -2])
    assert not fwpkm_layers(m) and not hasattr(m.config, "fwpkm")
    add_fwpkm(m, [0], **OPTS)
    with pytest.raises(ValueError, match="already has FwPKM"):
        add_fwpkm(m, [1])
