"""SPEC "Extensions beyond the paper": the FwPKM options (query normalisation, zero initial
values, learned or carried initial keys, gate bias) and their LM fields. Each is off by default;
each keeps the streaming contract, and the math the memory sees is checked against the
reference in float64."""
import pytest
import torch
from torch import nn

from fwpkm_ext import FwPKM, param_groups
from fwpkm_ext.model import LM, LMConfig
from fwpkm_ext.reference import fwpkm_memory_reference

from test_layers import SPLITS, T_STREAM, TIGHT, _layer, _manual_forward, _stream, _x

NORMS = ["batch", "zscore", "l2"]


def test_defaults_are_the_papers_layer():
    layer = FwPKM(8, n_subkeys=4, mem_k_dim=6, mem_v_dim=5, topk=2, chunk_size=4)
    assert layer.query_norm == "none" and layer.q_bn is None
    assert layer.init_values_mode == "random" and float(layer.init_values.abs().sum()) > 0
    assert not layer.learn_init_keys and not layer.carry_keys
    assert "init_keys" in dict(layer.named_buffers())
    cfg = LMConfig()
    assert (cfg.fwpkm_query_norm, cfg.fwpkm_init_values, cfg.fwpkm_learn_init_keys,
            cfg.fwpkm_carry_keys, cfg.fwpkm_gate_bias) == ("none", "random", False, False, None)


@pytest.mark.parametrize("norm", NORMS)
def test_query_norm_shapes_the_queries(norm):
    layer = _layer(dk=8, heads=2, query_norm=norm)
    x = _x(3, 17)
    layer.train()
    q, _, _ = layer.project(x)
    halves = q.reshape(3, 17, 2, 2, 4)
    if norm == "zscore":
        torch.testing.assert_close(halves.mean(-1), torch.zeros(3, 17, 2, 2, dtype=q.dtype), atol=1e-12, rtol=0)
        # eps 1e-6 inside the square root: variance 1 up to eps / var of the raw 4-dim halves
        torch.testing.assert_close(halves.var(-1, unbiased=False), torch.ones(3, 17, 2, 2, dtype=q.dtype),
                                   atol=1e-2, rtol=0)
    elif norm == "l2":
        torch.testing.assert_close(halves.norm(dim=-1), torch.ones(3, 17, 2, 2, dtype=q.dtype), **TIGHT)
    else:  # batch statistics over every token in training
        flat = q.reshape(-1, 16)
        torch.testing.assert_close(flat.mean(0), torch.zeros(16, dtype=q.dtype), atol=1e-12, rtol=0)
        torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(16, dtype=q.dtype), atol=1e-4, rtol=0)
        # running statistics were updated, and eval mode uses them (a per-token function)
        assert int(layer.q_bn.num_batches_tracked) == 1
        layer.eval()
        q1, _, _ = layer.project(x[:, :5])
        q2, _, _ = layer.project(x)
        torch.testing.assert_close(q1, q2[:, :5], **TIGHT)


@pytest.mark.parametrize("norm", NORMS)
def test_query_norm_forward_matches_reference(norm):
    """The options change what reaches the memory, not the memory: the layer equals SPEC eq. 12
    around the reference memory, fed with the normalised queries (gradients included)."""
    layer = _layer(query_norm=norm).eval()
    x = _x(2, 11, requires_grad=True)
    y, st = layer(x)
    y_ref, nk, nv = _manual_forward(layer, x)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(st.keys[0], nk, **TIGHT)
    torch.testing.assert_close(st.values[0], nv, **TIGHT)
    cot = torch.randn_like(y)
    g1, = torch.autograd.grad((y * cot).sum(), x)
    g2, = torch.autograd.grad((y_ref * cot).sum(), x)
    torch.testing.assert_close(g1, g2, **TIGHT)


@pytest.mark.parametrize("split", ["one_token", "random_a", "crosses_several_windows"])
@pytest.mark.parametrize("opts", [dict(query_norm="batch"), dict(query_norm="zscore"),
                                  dict(query_norm="l2"), dict(init_values="zero"),
                                  dict(learn_init_keys=True), dict(gate_bias=-1.5),
                                  dict(query_norm="batch", init_values="zero", carry_keys=True)])
def test_streaming_split_equals_one_call(split, opts):
    layer = _layer(C=4, **opts)
    with torch.no_grad():  # give batch norm non-trivial running statistics
        layer.train()(_x(2, 9, seed=5))
    layer.eval()
    x = _x(2, T_STREAM)
    with torch.no_grad():
        ref_out, ref_state = layer(x, layer.init_state(2), flush=True)
        out, state = _stream(layer, x, SPLITS[split], layer.init_state(2))
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(state.keys, ref_state.keys, **TIGHT)
    torch.testing.assert_close(state.values, ref_state.values, **TIGHT)


def test_zero_initial_values_read_zero_until_written():
    layer = _layer(C=4, init_values="zero")
    assert float(layer.init_values.abs().sum()) == 0
    x = _x(1, 9)
    with torch.no_grad():
        q, v, g = layer.project(x)
    vhat, _, nv = fwpkm_memory_reference(q, v, g, layer.init_keys, layer.init_values, topk=2,
                                         chunk_size=4)
    assert float(vhat[:, :4].abs().max()) == 0  # the first window reads the initial table
    assert float(vhat[:, 4:].abs().max()) > 0   # later windows read what it wrote
    assert float(nv.abs().sum()) > 0


def test_learned_initial_keys_get_the_reference_gradient():
    layer = _layer(C=4, learn_init_keys=True)
    assert isinstance(layer.init_keys, nn.Parameter)
    x = _x(2, 11)
    y, _ = layer(x)
    cot = torch.randn_like(y)
    gk, = torch.autograd.grad((y * cot).sum(), layer.init_keys)
    keys = layer.init_keys.detach().clone().requires_grad_()
    y_ref, _, _ = _manual_forward(layer, x, keys=keys)
    gk_ref, = torch.autograd.grad((y_ref * cot).sum(), keys)
    assert float(gk_ref.abs().max()) > 0
    torch.testing.assert_close(gk, gk_ref, **TIGHT)
    ids = {id(p) for g in param_groups(layer) for p in g["params"]}
    assert id(layer.init_keys) in ids and id(layer.init_values) not in ids
    no_decay = [g for g in param_groups(layer) if g["weight_decay"] == 0.0][0]["params"]
    assert any(p is layer.init_keys for p in no_decay)


def test_carried_keys_follow_training_calls_only():
    layer = _layer(C=4, carry_keys=True)
    k0 = layer.init_keys.clone()
    x = _x(2, 11)
    layer.eval()
    layer(x)
    assert torch.equal(layer.init_keys, k0)  # inference never moves them
    layer.train()
    _, st = layer(x)
    assert not torch.equal(layer.init_keys, k0)
    torch.testing.assert_close(layer.init_keys, st.keys[0], **TIGHT)
    # an explicit state (streaming) does not carry either
    k1 = layer.init_keys.clone()
    layer(x, layer.init_state(2))
    assert torch.equal(layer.init_keys, k1)


def test_gate_bias():
    layer = _layer(gate_bias=-3.0)
    assert torch.all(layer.to_g.bias == -3.0)
    _, _, g = layer.project(_x(1, 5) * 0)
    assert float(g.max()) < 0.1


@pytest.mark.parametrize("kw,arg,exc", [
    (dict(query_norm="layer"), "query_norm", ValueError),
    (dict(init_values="ones"), "init_values", ValueError),
    (dict(learn_init_keys=1), "learn_init_keys", TypeError),
    (dict(carry_keys="yes"), "carry_keys", TypeError),
    (dict(learn_init_keys=True, carry_keys=True), "carry_keys", ValueError),
    (dict(gate_bias=float("inf")), "gate_bias", ValueError),
    (dict(gate_bias="1"), "gate_bias", ValueError),
])
def test_bad_options(kw, arg, exc):
    with pytest.raises(exc, match=rf"^{arg}"):
        FwPKM(8, n_subkeys=4, mem_k_dim=6, mem_v_dim=5, topk=2, chunk_size=4, **kw)


def _lm_cfg(**kw):
    return LMConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, window=6, fwpkm_layers=[1],
                    fwpkm_n_subkeys=4, fwpkm_k_dim=8, fwpkm_v_dim=8, fwpkm_topk=2,
                    fwpkm_chunk_size=4, fwpkm_short_conv=2, **kw)


@pytest.mark.parametrize("bad,match", [(dict(fwpkm_query_norm="x"), "fwpkm_query_norm"),
                                       (dict(fwpkm_init_values="x"), "fwpkm_init_values"),
                                       (dict(fwpkm_learn_init_keys=True, fwpkm_carry_keys=True),
                                        "exclude")])
def test_lm_config_rejects_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        _lm_cfg(**bad)


def test_lm_checkpoint_keeps_what_inference_needs(tmp_path):
    """Zero initial values are regenerated (not stored); learned keys and batch-norm statistics
    are stored; the reloaded model gives the same logits."""
    torch.manual_seed(0)
    m = LM(_lm_cfg(fwpkm_query_norm="batch", fwpkm_init_values="zero", fwpkm_learn_init_keys=True))
    tokens = torch.randint(0, 50, (2, 13))
    m.train()
    m(tokens, use_cache=False)  # moves the batch-norm statistics
    with torch.no_grad():
        m.blocks[1].fwpkm.init_keys.add_(0.01)  # as if trained
    m.eval()
    m.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "blocks.1.fwpkm.init_values" not in stored
    assert "blocks.1.fwpkm.init_keys" in stored and "blocks.1.fwpkm.q_bn.running_var" in stored
    back = LM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        a, _ = m(tokens, use_cache=False)
        b, _ = back(tokens, use_cache=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lm_streaming_with_options_equals_one_call():
    torch.manual_seed(1)
    m = LM(_lm_cfg(fwpkm_query_norm="batch", fwpkm_init_values="zero")).double()
    tokens = torch.randint(0, 50, (2, 15))
    with torch.no_grad():
        m.train()(tokens, use_cache=False)
        m.eval()
        full, _ = m(tokens)
        cache, outs = None, []
        for a, b in ((0, 1), (1, 6), (6, 7), (7, 15)):
            lg, cache = m(tokens[:, a:b], cache)
            outs.append(lg)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TIGHT)
