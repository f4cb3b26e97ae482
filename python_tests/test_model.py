"""Reference LM: config, attention, incremental decoding, checkpoints."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fwpkm_ext.model import LM, LMCache, LMConfig, windowed_attention


def _has_layers() -> bool:
    try:
        from fwpkm_ext.layers import FwPKM, PKM  # noqa: F401
    except Exception:
        return False
    return True


needs_layers = pytest.mark.skipif(not _has_layers(), reason="fwpkm_ext.layers not available")


def small_cfg(**kw):
    d = dict(vocab_size=101, dim=32, n_layers=2, n_heads=2, window=7)
    d.update(kw)
    return LMConfig(**d)


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
def test_presets():
    t = LMConfig.preset("tiny")
    assert (t.n_layers, t.dim, t.n_heads, t.window, t.vocab_size) == (4, 256, 4, 512, 8192)
    assert t.fwpkm_layers == [1]
    assert (t.fwpkm_n_subkeys, t.fwpkm_k_dim, t.fwpkm_v_dim, t.fwpkm_topk, t.fwpkm_chunk_size) == \
        (128, 128, 256, 8, 512)
    p = LMConfig.preset("paper")
    assert (p.n_layers, p.dim, p.window) == (12, 768, 512)
    assert p.fwpkm_layers == [2, 10]
    assert (p.fwpkm_n_subkeys, p.fwpkm_k_dim, p.fwpkm_v_dim) == (512, 512, 512)
    assert LMConfig.preset("tiny", dim=128).dim == 128
    with pytest.raises(ValueError, match="unknown preset"):
        LMConfig.preset("huge")


def test_config_json_roundtrip(tmp_path):
    c = LMConfig.preset("paper")
    path = tmp_path / "config.json"
    c.save(str(path))
    assert LMConfig.load(str(path)) == c
    assert json.loads(path.read_text())["fwpkm_layers"] == [2, 10]
    with pytest.raises(ValueError, match="unknown LMConfig fields"):
        LMConfig.from_dict({"dim": 64, "bogus": 1})


@pytest.mark.parametrize("kw,msg", [
    (dict(dim=30, n_heads=4), "divisible"),
    (dict(fwpkm_layers=[5]), "out of range"),
    (dict(pkm_layers=[0, 0]), "duplicates"),
    (dict(window=-3), "window"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        small_cfg(**kw)


# ------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 5, 16, None])
def test_windowed_attention_matches_dense(window):
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 37, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    out = windowed_attention(q, k, v, 0, 0, window, block=6)
    i = torch.arange(T)
    diff = i[:, None] - i[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref)


def _pieces(x, sizes, model, cache=None):
    outs, i = [], 0
    for s in sizes:
        logits, cache = model(x[:, i:i + s], cache)
        outs.append(logits)
        i += s
    assert i == x.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("window", [7, None])
def test_incremental_equals_full(window):
    torch.manual_seed(0)
    model = LM(small_cfg(window=window)).double().eval()
    x = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        full, _ = model(x, use_cache=False)
        full2, _ = model(x)
        torch.testing.assert_close(full, full2)
        g = torch.Generator().manual_seed(1)
        splits = [[1] * 40, [40], [3, 1, 17, 2, 17]]
        for _ in range(3):
            cuts = sorted(torch.randperm(39, generator=g)[:5].add(1).tolist())
            splits.append([b - a for a, b in zip([0] + cuts, cuts + [40])])
        for sizes in splits:
            inc, cache = _pieces(x, sizes, model)
            torch.testing.assert_close(inc, full, rtol=1e-9, atol=1e-9)
            assert cache.pos == 40


def test_incremental_float32_and_constant_cache():
    torch.manual_seed(0)
    model = LM(small_cfg(window=5)).eval()
    x = torch.randint(0, 101, (1, 30))
    with torch.no_grad():
        full, _ = model(x)
        inc, cache = _pieces(x, [1] * 30, model)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
    for k, v in cache.kv:
        assert k.shape[2] == 5 and v.shape[2] == 5  # only the window is kept
    assert isinstance(cache, LMCache)


def test_generate_greedy_matches_argmax():
    torch.manual_seed(0)
    model = LM(small_cfg()).eval()
    prompt = torch.randint(0, 101, (1, 9))
    gen, _ = model.generate(prompt, 6)
    seq = prompt
    for _ in range(6):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq[:, 9:])


def test_training_forward_backward():
    torch.manual_seed(0)
    model = LM(small_cfg())
    x = torch.randint(0, 101, (2, 17))
    loss = model.loss(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(101)) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------
def test_checkpoint_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = LM(small_cfg())
    model.save_pretrained(str(tmp_path))
    again = LM.from_pretrained(str(tmp_path))
    assert again.cfg == model.cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_checkpoint_of_other_config(tmp_path):
    pytest.importorskip("safetensors")
    LM(small_cfg(dim=32)).save_pretrained(str(tmp_path))
    other = LM(small_cfg(dim=64))
    with pytest.raises(ValueError, match="does not match this model config"):
        other.load_weights(str(tmp_path / "model.safetensors"))
    deeper = LM(small_cfg(n_layers=3))
    with pytest.raises(ValueError, match="missing"):
        deeper.load_weights(str(tmp_path / "model.safetensors"))


# ------------------------------------------------------------------------------------------
# memory layers (need the core package)
# ------------------------------------------------------------------------------------------
def mem_cfg(**kw):
    d = dict(vocab_size=101, dim=32, n_layers=2, n_heads=2, window=8, fwpkm_layers=[1],
             fwpkm_n_subkeys=8, fwpkm_k_dim=16, fwpkm_v_dim=24, fwpkm_topk=4,
             fwpkm_chunk_size=8)
    d.update(kw)
    return LMConfig(**d)


@needs_layers
def test_fwpkm_model_incremental_equals_full():
    torch.manual_seed(0)
    model = LM(mem_cfg()).double().eval()
    x = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        full, _ = model(x, use_cache=False)
        for sizes in ([1] * 37, [37], [5, 8, 3, 16, 5], [8, 8, 8, 8, 5]):
            inc, cache = _pieces(x, sizes, model)
            torch.testing.assert_close(inc, full, rtol=1e-7, atol=1e-7)
        # one memory per sequence: batch rows stream independently
        per_seq, _ = _pieces(x, [4, 33], model, model.init_cache(batch_size=2))
        for b in range(2):
            single, _ = model(x[b:b + 1], use_cache=False)
            torch.testing.assert_close(per_seq[b:b + 1], single, rtol=1e-7, atol=1e-7)


@needs_layers
def test_fwpkm_model_trains():
    torch.manual_seed(0)
    model = LM(mem_cfg())
    x = torch.randint(0, 101, (2, 33))
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    fw = model.blocks[1].fwpkm
    grads = [p.grad for p in fw.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@needs_layers
def test_pkm_model():
    torch.manual_seed(0)
    cfg = small_cfg(pkm_layers=[0], pkm_n_subkeys=8, pkm_k_dim=16, pkm_heads=2, pkm_topk=4)
    model = LM(cfg).double().eval()
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        full, _ = model(x)
        inc, _ = _pieces(x, [3, 9, 8], model)
    torch.testing.assert_close(inc, full)


def test_checkpoint_omits_seeded_tables_and_half_precision_roundtrip(tmp_path):
    cfg = LMConfig.preset("tiny", dim=32, n_layers=2, n_heads=2, vocab_size=300, window=16,
                          fwpkm_layers=[1], fwpkm_n_subkeys=8, fwpkm_k_dim=8, fwpkm_v_dim=16,
                          fwpkm_chunk_size=8)
    torch.manual_seed(0)
    m = LM(cfg)
    torch.manual_seed(1)
    m2 = LM(cfg)  # the tables do not depend on the global RNG
    assert torch.equal(m.blocks[1].fwpkm.init_values, m2.blocks[1].fwpkm.init_values)
    assert not torch.equal(m.embed.weight, m2.embed.weight)
    other = LM(cfg.replace(fwpkm_init_seed=3))
    assert not torch.equal(m.blocks[1].fwpkm.init_values, other.blocks[1].fwpkm.init_values)
    from safetensors.torch import load_file

    m.save_pretrained(str(tmp_path / "a"))
    assert not any("init_" in k for k in load_file(str(tmp_path / "a" / "model.safetensors")))
    back = LM.from_pretrained(str(tmp_path / "a"))
    for (k, v), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # tables that differ from the seeded ones are stored
    with torch.no_grad():
        m.blocks[1].fwpkm.init_values.add_(1.0)
    m.save_pretrained(str(tmp_path / "b"), dtype=torch.float16)
    sd = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sd["blocks.1.fwpkm.init_values"].dtype == torch.float32
    assert sd["embed.weight"].dtype == torch.float16
    back = LM.from_pretrained(str(tmp_path / "b"))
    assert back.embed.weight.dtype == torch.float32
    assert torch.equal(back.blocks[1].fwpkm.init_values, m.blocks[1].fwpkm.init_values)
    assert torch.allclose(back.embed.weight, m.embed.weight, atol=1e-3, rtol=1e-3)
    with pytest.raises(TypeError, match="dtype"):
        m.save_pretrained(str(tmp_path / "c"), dtype=torch.int8)


@pytest.mark.parametrize("width", [2, 4])
def test_short_conv_streams_like_one_call_and_sees_previous_tokens(width):
    cfg = LMConfig.preset("tiny", dim=32, n_layers=2, n_heads=2, vocab_size=300, window=16,
                          fwpkm_layers=[1], fwpkm_n_subkeys=8, fwpkm_k_dim=8, fwpkm_v_dim=16,
                          fwpkm_chunk_size=8, fwpkm_short_conv=width)
    torch.manual_seed(0)
    m = LM(cfg).double()
    assert m.blocks[1].mem_conv is not None and m.blocks[0].mem_conv is None
    x = torch.randint(0, 300, (2, 37))
    with torch.no_grad():
        full, _ = m(x, m.init_cache(batch_size=2))
        cache = m.init_cache(batch_size=2)
        outs = []
        for a, b in ((0, 1), (1, 6), (6, 7), (7, 20), (20, 37)):
            o, cache = m(x[:, a:b], cache)
            outs.append(o)
        assert cache.conv[1].shape == (2, width - 1, 32)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)
    # the memory input at a token depends on the previous width-1 tokens, not further back
    blk = m.blocks[1]
    h = torch.randn(1, 10, 32, dtype=torch.float64)
    h2 = h.clone()
    h2[0, 3] += 1.0
    y1, _ = blk._short_conv(h, None)
    y2, _ = blk._short_conv(h2, None)
    changed = (y1 - y2).abs().sum(-1)[0] > 0
    assert changed.tolist() == [i in range(3, 3 + width) for i in range(10)]
    # trains: gradients reach the convolution
    loss = m.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    assert blk.mem_conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fwpkm_short_conv"):
        cfg.replace(fwpkm_short_conv=-1)
