"""FwPKM in Hugging Face ``transformers`` (5.x) decoder models: retrofit, cache, save/load, stream.

    from transformers import AutoModelForCausalLM
    from fwpkm_ext.integrations.transformers import add_fwpkm, FwPKMCache, load_fwpkm_model

    model = AutoModelForCausalLM.from_pretrained("some/llama")      # Llama, Mistral, Qwen2/3, GPT-2
    add_fwpkm(model, layers=[2, 10], chunk_size=512)                # exact identity until trained
    out = model.generate(ids, max_new_tokens=50, cache=FwPKMCache(config=model.config))
    model.save_pretrained("retrofitted")                            # config.json holds "fwpkm"
    model = load_fwpkm_model("retrofitted")                         # no trust_remote_code

Where the sublayer goes (SPEC "The layer around the memory"): an extra residual sublayer before
the token mixer of the chosen decoder layers, ``h = h + FwPKM(h)``, then the layer's own
computation. The FwPKM module is registered as the child ``fwpkm`` of the decoder layer and runs
in a forward pre-hook of that layer, so the base model's module tree, parameter names, classes
and attributes (``attention_type``, gradient checkpointing, ``_no_split_modules``) are unchanged:
a retrofitted checkpoint is the base checkpoint plus ``*.fwpkm.*`` tensors.

Memory state: per FwPKM layer one :class:`~fwpkm_ext.MemoryState` per sequence, kept in the
``Cache`` object transformers already passes through the layers (:class:`FwPKMCache`, a
``DynamicCache``; a plain ``DynamicCache`` is converted in place the first time it reaches a FwPKM
layer). Calls with a cache stream (``flush=False``: the tokens of an unfinished update window stay
pending in the state), so feeding a sequence in any split equals one call. Without a cache
(``use_cache=False``) a call is one whole document from the initial tables, one memory shared by
the batch (the paper's training setup, what ``FwPKM(x)`` does).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fwpkm_ext.integrations.transformers needs transformers 5.x: "
                      "pip install 'fwpkm_ext[hf]'") from exc

from ..layers import FwPKM
from ..state import MemoryState

__all__ = ["SUPPORTED_MODEL_TYPES", "DEFAULT_MEMORY_OPTIONS", "CONFIG_KEY", "add_fwpkm",
           "fwpkm_layers", "FwPKMCache", "freeze_base", "load_fwpkm_model", "save_memory",
           "load_memory", "stream_document", "HFStreamReport"]

#: model_type -> attribute path of the decoder layers (the token mixer of each is its attention)
SUPPORTED_MODEL_TYPES: Dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gpt2": "transformer.h",
}
#: memory options for small models (any FwPKM keyword overrides them): 128 x 128 = 16,384 slots,
#: 256-dim values (16 MiB of fast weights per sequence and layer), top-8 reads, one write every
#: 512 tokens
DEFAULT_MEMORY_OPTIONS: Dict[str, Any] = dict(n_subkeys=128, mem_k_dim=128, mem_v_dim=256,
                                               topk=8, chunk_size=512)
#: the entry of ``model.config`` that records the retrofit (layers, seed, options)
CONFIG_KEY = "fwpkm"
_SPEC_VERSION = 1
_MEMORY_MANIFEST = "fwpkm_memory.json"
_MEMORY_FORMAT = "fwpkm_ext.hf_memory"


# --------------------------------------------------------------------------------------------
# Retrofitting
# --------------------------------------------------------------------------------------------
def _decoder_layers(model: nn.Module, with_owner: bool = False):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"add_fwpkm: unsupported architecture {type(model).__name__} (model_type "
            f"{model_type!r}); supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))} "
            f"(their *ForCausalLM classes or base models)")
    path = SUPPORTED_MODEL_TYPES[model_type]
    obj = owner = model
    for i, part in enumerate(path.split(".")):
        if not hasattr(obj, part):
            # a base model (LlamaModel, GPT2Model) has the layers one level up
            if i == 0 and hasattr(obj, path.split(".")[-1]):
                continue
            raise ValueError(f"add_fwpkm: {type(model).__name__} has no {path} (expected a "
                             f"{model_type} causal LM or its base model)")
        owner, obj = obj, getattr(obj, part)
    if not isinstance(obj, nn.ModuleList):
        raise ValueError(f"add_fwpkm: {type(model).__name__}.{path} is not a ModuleList")
    return (model_type, obj, owner) if with_owner else (model_type, obj)


def fwpkm_layers(model: nn.Module) -> Dict[int, FwPKM]:
    """{decoder layer index: its FwPKM sublayer} of a retrofitted model ({} for a plain one)."""
    _, blocks = _decoder_layers(model)
    return {i: b.fwpkm for i, b in enumerate(blocks) if isinstance(getattr(b, "fwpkm", None), FwPKM)}


def _seeded_tables(fw: FwPKM, seed: int, index: int) -> Tuple[Tensor, Tensor]:
    """Initial keys and values drawn on the CPU from ``seed`` and the layer index (SPEC init),
    the same draws as ``fwpkm_ext.model.LM.seeded_fast_weight_tables``: checkpoints need not
    store them."""
    c = fw.config
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    bound = 1.0 / math.sqrt(c.key_dim)
    keys = (torch.rand(tuple(fw.init_keys.shape), generator=g, dtype=torch.float64) * 2 - 1)
    keys = keys.mul_(bound).float()
    values = torch.randn(tuple(fw.init_values.shape), generator=g) / math.sqrt(c.value_dim)
    if fw.init_values_mode == "zero":
        values.zero_()
    return keys, values


def add_fwpkm(model: nn.Module, layers: Sequence[int], *, seed: int = 0,
              **memory_options: Any) -> nn.Module:
    """Insert a FwPKM sublayer before the token mixer of each of ``layers`` (decoder layer
    indices, negative ones count from the end) and return ``model`` (modified in place).

    ``memory_options`` go to :class:`fwpkm_ext.FwPKM` (``n_subkeys``, ``mem_k_dim``, ``mem_v_dim``,
    ``heads``, ``topk``, ``chunk_size``, ``lookahead``, ``lr``, ``query_norm``, ``gate_bias``, ...);
    unset ones take :data:`DEFAULT_MEMORY_OPTIONS`. Its ``dim`` is the model's hidden size.
    ``short_conv=W`` (default 0, off) adds a depthwise causal convolution of width W on the
    memory's input (``h + conv(h)``; its last W-1 inputs are carried in the cache), as
    ``fwpkm_ext.model.LMConfig.fwpkm_short_conv``.
    The output projection (``to_out``, weight and bias) starts at zero, so the retrofitted model
    gives bit-identical logits until it is trained. The initial fast-weight tables are drawn from
    ``seed`` (and the layer index), so ``save_pretrained`` does not store them. The retrofit is
    recorded in ``model.config.fwpkm`` (what :func:`load_fwpkm_model` rebuilds).
    """
    model_type, blocks, owner = _decoder_layers(model, with_owner=True)
    if fwpkm_layers(model):
        raise ValueError(f"add_fwpkm: the model already has FwPKM sublayers at layers "
                         f"{sorted(fwpkm_layers(model))}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    if isinstance(layers, int):
        layers = [layers]
    L = len(blocks)
    idx = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -L <= i < L:
            raise ValueError(f"layers: expected layer indices in [-{L}, {L}) for this "
                             f"{L}-layer model, got {i!r}")
        idx.append(i % L)
    if not idx or len(set(idx)) != len(idx):
        raise ValueError(f"layers: expected distinct layer indices, got {list(layers)}")
    options = _jsonable({**DEFAULT_MEMORY_OPTIONS, **memory_options})
    if "dim" in options:
        raise TypeError("add_fwpkm: the memory's dim is the model's hidden size; do not pass dim")
    fw_options = dict(options)
    short_conv = fw_options.pop("short_conv", 0)
    if isinstance(short_conv, bool) or not isinstance(short_conv, int) or short_conv < 0:
        raise ValueError(f"short_conv: expected an int >= 0 (0 = off), got {short_conv!r}")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
        else model.config
    dim = int(config.hidden_size)
    built = {}
    for i in sorted(idx):  # build every layer first: a bad option leaves the model untouched
        fw = FwPKM(dim, **fw_options)
        if short_conv:
            # as fwpkm_ext.model's fwpkm_short_conv: the memory reads h + causal_conv(h), so a
            # query sees the few tokens before it
            fw.add_module("short_conv", nn.Conv1d(dim, dim, short_conv, groups=dim, bias=False))
        keys, values = _seeded_tables(fw, seed, i)
        with torch.no_grad():
            fw.init_keys.copy_(keys)
            fw.init_values.copy_(values)
            nn.init.zeros_(fw.to_out.weight)
            nn.init.zeros_(fw.to_out.bias)
        # seeded, not stored: the initial values always, the initial keys unless they change
        # (learned ones are parameters; carried ones are rewritten by training)
        fw._non_persistent_buffers_set.add("init_values")
        if not fw.carry_keys and not fw.learn_init_keys:
            fw._non_persistent_buffers_set.add("init_keys")
        ref = next(blocks[i].parameters(), None)
        if ref is not None:
            fw.to(device=ref.device, dtype=ref.dtype)  # fast weights stay float32 (FwPKM._apply)
        for m in fw.modules():
            m._is_hf_initialized = True  # transformers' weight init must not redraw them
        fw.fwpkm_layer_index = i
        built[i] = fw
    for i, fw in built.items():
        block = blocks[i]
        block.add_module("fwpkm", fw)
        block._fwpkm_hook = block.register_forward_pre_hook(_memory_pre_hook, with_kwargs=True)
    # the model body (LlamaModel, GPT2Model) hands its 2-D attention mask to the sublayers: padding
    # tokens are kept out of the memory (see _memory_pre_hook)
    owner._fwpkm_modules = [built[i] for i in sorted(built)]
    owner._fwpkm_mask_hooks = (owner.register_forward_pre_hook(_mask_pre_hook, with_kwargs=True),
                               owner.register_forward_hook(_mask_post_hook))
    model.config.fwpkm = {"version": _SPEC_VERSION, "layers": sorted(idx), "seed": int(seed),
                          "options": dict(options), "model_type": model_type}
    return model


def _jsonable(options: Dict[str, Any]) -> Dict[str, Any]:
    try:
        json.dumps(options)
    except TypeError as exc:
        raise TypeError(f"add_fwpkm: memory options must be JSON values (they are saved in "
                        f"config.json): {exc}") from None
    return dict(options)


def _find_cache(args: tuple, kwargs: dict) -> Optional[Cache]:
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        c = kwargs.get(name)
        if c is not None:
            return c if isinstance(c, Cache) else None
    for a in args[1:]:  # GPT-2 passes its cache positionally
        if isinstance(a, Cache):
            return a
    return None


def _mask_pre_hook(owner: nn.Module, args: tuple, kwargs: dict):
    """Pass the call's 2-D attention mask (B, past + T), if any, to the FwPKM sublayers."""
    am = kwargs.get("attention_mask")
    am = am if isinstance(am, Tensor) and am.dim() == 2 else None
    for fw in getattr(owner, "_fwpkm_modules", ()):
        fw._hf_attention_mask = am
    return None


def _mask_post_hook(owner: nn.Module, args, output):
    for fw in getattr(owner, "_fwpkm_modules", ()):
        fw._hf_attention_mask = None
    return None


def _token_mask(fw: FwPKM, h: Tensor) -> Optional[Tensor]:
    """(B, T) bool of the real (non-padding) tokens of this call, None when all are real."""
    am = getattr(fw, "_hf_attention_mask", None)
    B, T = h.shape[:2]
    if am is None or am.shape[0] != B or am.shape[1] < T:
        return None
    tm = am[:, am.shape[1] - T:].to(device=h.device) != 0
    return None if bool(tm.all()) else tm


def _memory_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """h = h + FwPKM(h) before the decoder layer's own computation; the memory state of the
    layer lives in the cache transformers passes to the layer."""
    fw: FwPKM = module.fwpkm
    if args:
        h = args[0]
    elif "hidden_states" in kwargs:
        h = kwargs["hidden_states"]
    else:
        raise TypeError(f"{type(module).__name__}: FwPKM found no hidden states in the call")
    cache = _find_cache(args, kwargs)
    if cache is not None and hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        cache = cache.self_attention_cache
    tm = _token_mask(fw, h)
    if cache is None:
        # one call = one whole document from the initial tables, one memory for the batch;
        # padding tokens are read but write nothing
        x, _ = _conv_input(fw, h, None)
        y, _ = fw(x, state=None, flush=True, return_state=False,
                  mask=None if tm is None else tm.to(h.dtype))
    else:
        cache = FwPKMCache.adopt(cache)
        i = fw.fwpkm_layer_index
        inplace = cache.inplace_memory and not torch.is_grad_enabled()
        state = cache.memory_states.get(i)
        if tm is None and not isinstance(state, list):
            state = cache._state_for(i, fw, h.shape[0])
            x, tail = _conv_input(fw, h, cache._tail_for(i, h.shape[0]))
            y, state = fw(x, state=state, flush=False, inplace=inplace)
        else:
            rows, tails = cache._rows_for(i, fw, h.shape[0])
            y, state, tail = _ragged_step(fw, h, tm, rows, tails, inplace)
        cache.memory_states[i] = state
        if tail is not None:
            cache.conv_tails[i] = tail
    h = h + y
    if args:
        return (h,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = h
    return args, kwargs


def _conv_input(fw: FwPKM, h: Tensor, tail: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """The memory's input: h, or h + causal depthwise conv(h) with ``tail`` the previous call's
    last width-1 inputs (zeros at the start of a stream). Returns it and the new tail."""
    conv = getattr(fw, "short_conv", None)
    if conv is None:
        return h, None
    w = conv.kernel_size[0]
    if tail is None:
        tail = h.new_zeros(h.shape[0], w - 1, h.shape[2])
    full = torch.cat([tail.to(h.dtype), h], dim=1)
    y = conv(full.transpose(1, 2)).transpose(1, 2)
    return h + y, full[:, full.shape[1] - (w - 1):]


def _ragged_step(fw: FwPKM, h: Tensor, tm: Optional[Tensor], rows: List[MemoryState],
                 tails: List[Optional[Tensor]], inplace: bool):
    """Padded batch: each sequence's memory reads and writes its real tokens only (its own
    absolute update windows, as if it ran alone); padding positions get a zero output. The
    states stay one per row (their pending windows differ in length). Returns (y, rows, tails
    or None)."""
    B, T, D = h.shape
    outs, new_rows, new_tails = [], [], []
    for b in range(B):
        keep = None if tm is None else tm[b]
        if keep is not None and not bool(keep.any()):
            outs.append(h.new_zeros(T, D))
            new_rows.append(rows[b])
            new_tails.append(tails[b])
            continue
        hb = h[b:b + 1] if keep is None or bool(keep.all()) else h[b:b + 1, keep]
        xb, tb = _conv_input(fw, hb, tails[b])
        yb, st = fw(xb, state=rows[b], flush=False, inplace=inplace)
        if hb.shape[1] == T:
            outs.append(yb[0])
        else:
            full = h.new_zeros(T, D)
            full[keep] = yb[0]
            outs.append(full)
        new_rows.append(st)
        new_tails.append(tb)
    has_conv = getattr(fw, "short_conv", None) is not None
    return torch.stack(outs), new_rows, (new_tails if has_conv else None)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
def _batch_index(idx, device) -> Tensor:
    t = torch.as_tensor(idx)
    if t.dtype == torch.bool:  # a mask of the rows to keep
        t = t.nonzero().flatten()
    return t.to(device=device, dtype=torch.long).flatten()


def _select(state: MemoryState, idx) -> MemoryState:
    """The states of batch rows ``idx`` (a LongTensor: copies, never views)."""
    return state.select(_batch_index(idx, state.device))


class FwPKMCache(DynamicCache):
    """A ``DynamicCache`` that also holds, per FwPKM layer, its memory state (one memory per
    sequence, created on first use with ``layer.init_state(batch_size)``).

    ``window``: keep only the last ``window`` positions of every attention layer (each layer is a
    ``DynamicSlidingWindowLayer``; positions and masks stay absolute), so the cache has a constant
    size however long the stream: queries see the kept positions plus the causal part of their own
    call. ``None`` (default): what ``DynamicCache(config=config)`` keeps.
    ``memory``: initial states {layer: MemoryState} (e.g. :func:`load_memory`); ``conv_tails``:
    the last inputs of the layers' short convolutions, if any (``add_fwpkm(short_conv=...)``).
    In a padded batch ``memory_states[layer]`` becomes one state per row (a list).
    ``inplace_memory``: under ``torch.no_grad`` write the fast weights in place (no table copy per
    call). A state read out of ``memory_states`` is then live; :meth:`memory_snapshot` copies.

    Beam search (``reorder_cache``), ``batch_select_indices`` and ``batch_repeat_interleave``
    move the memory states with the attention cache. ``crop`` cannot undo fast-weight writes:
    only ``crop(0)`` is allowed (``is_croppable`` is False).
    """

    def __init__(self, ddp_cache_data=None, config=None, offloading: bool = False,
                 offload_only_non_sliding: bool = False, *, window: Optional[int] = None,
                 num_layers: Optional[int] = None, memory: Optional[Dict[int, MemoryState]] = None,
                 inplace_memory: bool = True, conv_tails: Optional[Dict[int, Tensor]] = None):
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"window: expected a positive int (positions kept), got {window!r}")
            if num_layers is None:
                if config is None:
                    raise ValueError("window: needs config= (or num_layers=) to size the cache")
                num_layers = int(config.get_text_config(decoder=True).num_hidden_layers)
            # a sliding layer keeps sliding_window - 1 positions between calls
            Cache.__init__(self, layers=[DynamicSlidingWindowLayer(sliding_window=window + 1)
                                         for _ in range(num_layers)],
                           offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        else:
            super().__init__(ddp_cache_data, config=config, offloading=offloading,
                             offload_only_non_sliding=offload_only_non_sliding)
        self.window = window
        self.memory_states: Dict[int, MemoryState] = dict(memory or {})
        #: per FwPKM layer with a short convolution: its last width-1 inputs (B, width-1, dim)
        self.conv_tails: Dict[int, Any] = dict(conv_tails or {})
        self.inplace_memory = bool(inplace_memory)

    @classmethod
    def adopt(cls, cache: Cache) -> "FwPKMCache":
        """``cache`` as an FwPKMCache: itself, or a plain ``DynamicCache`` converted in place (what
        ``generate()`` and the models create by default)."""
        if isinstance(cache, FwPKMCache):
            return cache
        if type(cache) is DynamicCache:
            cache.__class__ = cls
            cache.window = None
            cache.memory_states = {}
            cache.conv_tails = {}
            cache.inplace_memory = True
            return cache
        raise TypeError(f"FwPKM layers keep their memory in the cache: pass an FwPKMCache (or a "
                        f"DynamicCache, converted in place), got {type(cache).__name__}")

    def _state_for(self, i: int, fw: FwPKM, batch_size: int) -> MemoryState:
        state = self.memory_states.get(i)
        if state is None:
            return fw.init_state(batch_size)
        S = state.keys.shape[0] if state.per_sequence else (
            state.pending_q.shape[0] if state.pending else None)
        if S == 1 and batch_size > 1 and state.per_sequence:
            # one memory (e.g. restored by load_memory) for every row: beams, samples
            return _select(state, torch.zeros(batch_size, dtype=torch.long))
        if S is not None and S != batch_size:
            raise ValueError(f"FwPKMCache: the memory of layer {i} holds {S} sequences, the batch "
                             f"has {batch_size}")
        return state

    def _tail_for(self, i: int, batch_size: int) -> Optional[Tensor]:
        tail = self.conv_tails.get(i)
        if isinstance(tail, Tensor) and tail.shape[0] == 1 and batch_size > 1:
            tail = tail.expand(batch_size, -1, -1)  # one restored stream for every row
        return tail

    def _rows_for(self, i: int, fw: FwPKM, batch_size: int):
        """The memory of layer ``i`` (and its convolution tails) as one entry per row (a padded
        batch: ragged windows)."""
        state, tails = self.memory_states.get(i), self.conv_tails.get(i)
        if isinstance(state, list):
            if len(state) != batch_size:
                raise ValueError(f"FwPKMCache: the memory of layer {i} holds {len(state)} "
                                 f"sequences, the batch has {batch_size}")
            return state, (tails if isinstance(tails, list) else [None] * batch_size)
        tails = self._tail_for(i, batch_size)
        tails = [None] * batch_size if tails is None else [tails[b:b + 1] for b in range(batch_size)]
        if state is None:
            return [fw.init_state(1) for _ in range(batch_size)], tails
        state = self._state_for(i, fw, batch_size)
        return [_select(state, [b]) for b in range(batch_size)], tails

    @staticmethod
    def _pick(st, idx) -> Union[MemoryState, List[MemoryState]]:
        idx = _batch_index(idx, "cpu")
        if isinstance(st, list):  # ragged rows: copies, so no two rows share tables
            return [_select(st[int(j)], [0]) for j in idx]
        return _select(st, idx)

    @staticmethod
    def _pick_tail(tail, idx):
        idx = _batch_index(idx, "cpu")
        if isinstance(tail, list):
            return [tail[int(j)] for j in idx]  # tails are never written in place
        return tail.index_select(0, idx.to(tail.device))

    # -- batch handling -----------------------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.memory_states = {i: self._pick(st, beam_idx) for i, st in self.memory_states.items()}
        self.conv_tails = {i: self._pick_tail(t, beam_idx) for i, t in self.conv_tails.items()}

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.memory_states = {i: self._pick(st, indices) for i, st in self.memory_states.items()}
        self.conv_tails = {i: self._pick_tail(t, indices) for i, t in self.conv_tails.items()}

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        out = {}
        for i, st in self.memory_states.items():
            B = len(st) if isinstance(st, list) else st.keys.shape[0] if st.per_sequence else \
                max(1, st.pending_q.shape[0] if st.pending else 1)
            out[i] = self._pick(st, torch.arange(B).repeat_interleave(repeats))
        self.memory_states = out
        self.conv_tails = {i: self._pick_tail(t, torch.arange(len(t) if isinstance(t, list) else
                                                            t.shape[0]).repeat_interleave(repeats))
                           for i, t in self.conv_tails.items()}

    def reset(self):
        super().reset()
        self.memory_states = {}
        self.conv_tails = {}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.memory_states:
            raise NotImplementedError("FwPKMCache.crop: the fast-weight writes of the cropped "
                                      "tokens cannot be undone (assisted decoding and rollbacks are "
                                      "not supported with FwPKM)")
        super().crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return False

    # -- memory -------------------------------------------------------------------------------
    def memory_snapshot(self) -> Dict[int, Union[MemoryState, List[MemoryState]]]:
        """Copies of the memory states (detached, cloned)."""
        def copy(st: MemoryState) -> MemoryState:
            d = st.detach()
            return MemoryState(**{k: (v.clone() if isinstance(v, Tensor) else
                                      dict(v) if isinstance(v, dict) else v)
                                  for k, v in vars(d).items()})
        return {i: [copy(r) for r in st] if isinstance(st, list) else copy(st)
                for i, st in self.memory_states.items()}

    def memory_nbytes(self) -> int:
        return sum(sum(r.nbytes() for r in st) if isinstance(st, list) else st.nbytes()
                   for st in self.memory_states.values())

    def kv_nbytes(self) -> int:
        """Bytes of the attention keys/values held."""
        n = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, Tensor):
                    n += t.numel() * t.element_size()
        return n

    def kv_positions(self) -> int:
        """Positions held by the largest attention layer."""
        best = 0
        for layer in self.layers:
            k = getattr(layer, "keys", None)
            if isinstance(k, Tensor) and k.dim() >= 2:
                best = max(best, int(k.shape[-2]))
        return best

    def flush_memory(self, model: nn.Module) -> None:
        """Write the pending tokens of every unfinished update window (end of a document)."""
        layers = fwpkm_layers(model)
        for i, st in list(self.memory_states.items()):
            self.memory_states[i] = [layers[i].flush(r) for r in st] if isinstance(st, list) \
                else layers[i].flush(st)


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------
def freeze_base(model: nn.Module) -> nn.Module:
    """Freeze every parameter but those of the FwPKM sublayers (returns ``model``). Build the
    optimizer from ``fwpkm_ext.param_groups(model)``: it leaves out frozen parameters and the
    initial fast-weight tables."""
    layers = fwpkm_layers(model)
    if not layers:
        raise ValueError("freeze_base: the model has no FwPKM sublayers (call add_fwpkm first)")
    keep = {id(p) for fw in layers.values() for p in fw.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


# --------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------
def _checkpoint_files(path: str) -> List[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors (or sharded index) to read the FwPKM "
                            f"weights from (save with safe_serialization, the default)")


def load_fwpkm_model(path: str, model_class=None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a retrofitted model saved with ``save_pretrained``: the base model through
    ``model_class.from_pretrained(path, **kwargs)`` (default ``AutoModelForCausalLM``; no
    ``trust_remote_code``), then :func:`add_fwpkm` as recorded in ``config.json`` ("fwpkm"), then
    the FwPKM weights of the checkpoint (the initial tables are regenerated from the seed)."""
    from safetensors import safe_open

    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    cpath = os.path.join(path, "config.json")
    if not os.path.isfile(cpath):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(cpath, encoding="utf-8") as f:
        spec = json.load(f).get(CONFIG_KEY)
    if not isinstance(spec, dict) or "layers" not in spec:
        raise ValueError(f"{path}: config.json has no {CONFIG_KEY!r} entry: not a model retrofitted "
                         f"with fwpkm_ext.integrations.transformers.add_fwpkm")
    if spec.get("version") != _SPEC_VERSION:
        raise ValueError(f"{path}: fwpkm entry of version {spec.get('version')!r}, this fwpkm_ext "
                         f"reads version {_SPEC_VERSION}")
    logger = transformers.utils.logging
    old = logger.get_verbosity()
    logger.set_verbosity_error()  # the *.fwpkm.* tensors are "unexpected" to the base class
    try:
        model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    finally:
        logger.set_verbosity(old)
    if fwpkm_layers(model):  # a loader that already knew (never the case for stock classes)
        raise ValueError(f"{path}: the loaded model already has FwPKM sublayers")
    add_fwpkm(model, spec["layers"], seed=int(spec.get("seed", 0)), **spec.get("options", {}))
    own = {k: v for k, v in model.state_dict().items() if ".fwpkm." in f".{k}"}
    found: Dict[str, Tensor] = {}
    for fpath in _checkpoint_files(path):
        with safe_open(fpath, framework="pt") as f:
            for key in f.keys():
                if ".fwpkm." not in f".{key}":
                    continue
                match = key if key in own else next(
                    (k for k in own if k.endswith("." + key) or key.endswith("." + k)), None)
                if match is None:
                    raise ValueError(f"{path}: checkpoint tensor {key!r} matches no FwPKM tensor "
                                     f"of the rebuilt model")
                found[match] = f.get_tensor(key)
    missing = sorted(set(own) - set(found))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks FwPKM tensors {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for k, t in found.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"{path}: {k} has shape {tuple(t.shape)} in the checkpoint, "
                                 f"{tuple(own[k].shape)} in the model")
            own[k].copy_(t.to(device=own[k].device, dtype=own[k].dtype))
    return model


def save_memory(cache_or_states: Union[FwPKMCache, Dict[int, MemoryState]], directory: str) -> None:
    """Save the memory states of a cache (or a {layer: state} dict) into ``directory``, beside a
    model: one ``MemoryState`` file per layer (atomic, checksummed) and ``fwpkm_memory.json``.
    The attention cache is not saved."""
    is_cache = isinstance(cache_or_states, FwPKMCache)
    states = cache_or_states.memory_states if is_cache else dict(cache_or_states)
    tails = dict(cache_or_states.conv_tails) if is_cache else {}
    if not states:
        raise ValueError("save_memory: no memory states (nothing was read through a FwPKM layer)")
    if any(isinstance(st, list) for st in states.values()):
        raise ValueError("save_memory: the cache holds the per-row memories of a padded batch; "
                         "save one row's: save_memory({layer: rows[b] for layer, rows in "
                         "cache.memory_states.items()}, directory)")
    os.makedirs(directory, exist_ok=True)
    files = {}
    for i, st in sorted(states.items()):
        name = f"fwpkm_memory.layer{int(i)}.pt"
        st.save(os.path.join(directory, name))
        files[str(int(i))] = name
    manifest = {"format": _MEMORY_FORMAT, "version": 1, "layers": files}
    if tails:  # short convolutions: their last inputs, so the next token sees them
        from safetensors.torch import save_file

        name = "fwpkm_memory.conv.safetensors"
        save_file({f"layer{int(i)}": t.detach().cpu().contiguous() for i, t in tails.items()},
                  os.path.join(directory, name + ".tmp"))
        os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))
        manifest["conv_tails"] = name
    tmp = os.path.join(directory, _MEMORY_MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(directory, _MEMORY_MANIFEST))


def load_memory(model: nn.Module, directory: str, *, window: Optional[int] = None,
                device=None) -> FwPKMCache:
    """A fresh :class:`FwPKMCache` (empty attention cache, ``window`` as in FwPKMCache) holding the
    memory states saved by :func:`save_memory`, each checked against the model's FwPKM layer."""
    mpath = os.path.join(directory, _MEMORY_MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{directory}: no {_MEMORY_MANIFEST} (see save_memory)")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != _MEMORY_FORMAT or manifest.get("version") != 1:
        raise ValueError(f"{mpath}: not a saved FwPKM memory of a version this fwpkm_ext reads")
    layers = fwpkm_layers(model)
    saved = {int(k): v for k, v in manifest["layers"].items()}
    if sorted(saved) != sorted(layers):
        raise ValueError(f"{directory}: memory for layers {sorted(saved)}, the model has FwPKM "
                         f"layers {sorted(layers)}")
    mem = {i: layers[i].load_state(os.path.join(directory, name), device=device)
           for i, name in saved.items()}
    want = sorted(i for i, fw in layers.items() if getattr(fw, "short_conv", None) is not None)
    tails = {}
    if manifest.get("conv_tails"):
        from safetensors.torch import load_file

        raw = load_file(os.path.join(directory, manifest["conv_tails"]))
        tails = {int(k[len("layer"):]): v for k, v in raw.items()}
    if tails and sorted(tails) != want:
        raise ValueError(f"{directory}: convolution tails for layers {sorted(tails)}, the model "
                         f"has short convolutions at layers {want}")
    for i, t in tails.items():
        w = layers[i].short_conv.kernel_size[0]
        S = mem[i].keys.shape[0]
        if tuple(t.shape) != (S, w - 1, layers[i].dim):
            raise ValueError(f"{directory}: convolution tail of layer {i} has shape "
                             f"{tuple(t.shape)}, expected {(S, w - 1, layers[i].dim)}")
        p = layers[i].short_conv.weight
        tails[i] = t.to(device=device if device is not None else p.device, dtype=p.dtype)
    return FwPKMCache(config=model.config, window=window, memory=mem, conv_tails=tails)


# --------------------------------------------------------------------------------------------
# Long documents
# --------------------------------------------------------------------------------------------
@dataclass
class HFStreamReport:
    """What :func:`stream_document` measured. ``max_kv_positions`` / ``max_kv_bytes``: the largest
    attention cache held between segments; ``state_bytes``: the memory states at the end."""

    tokens: int
    predicted: int
    nll_sum: float
    buckets: list
    segments: int
    seconds: float
    max_kv_positions: int
    max_kv_bytes: int
    state_bytes: int
    peak_rss_mb: float
    cache: Optional[FwPKMCache] = field(default=None, repr=False)
    kv_positions_per_segment: List[int] = field(default_factory=list, repr=False)

    @property
    def nll(self) -> float:
        return self.nll_sum / self.predicted if self.predicted else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0)) if self.predicted else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def table(self) -> str:
        """NLL / perplexity by position bucket (the table of ``fwpkm stream``)."""
        from ..stream import bucket_table

        return bucket_table(self.buckets, self.predicted, self.nll, self.ppl)


def _document_ids(doc, tokenizer):
    from ..stream import TokenSource, open_document

    if isinstance(doc, dict) or hasattr(doc, "input_ids") and not isinstance(doc, (str, Tensor)):
        doc = doc["input_ids"]
    if isinstance(doc, Tensor) and doc.dim() == 2:
        if doc.shape[0] != 1:
            raise ValueError(f"doc: stream_document reads one document, got a batch of shape "
                             f"{tuple(doc.shape)}")
        doc = doc[0]
    if isinstance(doc, str) and tokenizer is not None and not hasattr(tokenizer, "encode"):
        raise TypeError("tokenizer: expected an object with encode(text) -> ids")
    src = open_document(doc, tokenizer)
    return src if isinstance(src, TokenSource) else TokenSource(src)


@torch.no_grad()
def stream_document(model: nn.Module, doc, tokenizer=None, *, segment_tokens: int = 512,
                    window: int = 2048, cache: Optional[FwPKMCache] = None, progress: bool = True,
                    flush_at_end: bool = True, bucket_tokens: int = 1024,
                    max_tokens: Optional[int] = None) -> HFStreamReport:
    """Read a long document through a (retrofitted) model segment by segment at constant memory.

    ``doc``: token ids (list, 1-D array/tensor, ``(1, T)`` tensor, a tokenizer's output), a text
    or a ``.txt``/``.txt.gz`` path (with ``tokenizer``, anything with ``encode(text)``).
    Each call reads ``segment_tokens`` tokens with the cache carried: the FwPKM memory states (with
    the pending tokens of the unfinished update window) and the attention keys/values of the last
    ``window`` positions (``FwPKMCache(window=...)``), so what is kept does not grow with the
    document. A query sees the ``window`` positions before its segment plus its segment's earlier
    tokens. Returns NLL/perplexity by position bucket, the cache bound seen, and the final cache
    (``report.cache``: generate from it, or :func:`save_memory`). ``cache``: continue a stream.
    GPT-2 has learned absolute positions: it reads at most ``n_positions`` tokens.
    """
    from ..stream import _Stats, peak_rss_mb
    from tqdm.auto import tqdm

    for name, val in (("segment_tokens", segment_tokens), ("window", window),
                      ("bucket_tokens", bucket_tokens)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    src = _document_ids(doc, tokenizer)
    if max_tokens is not None:
        src.limit(max_tokens)
    config = model.config.get_text_config(decoder=True)
    vocab = int(config.vocab_size)
    limit = None
    if getattr(model.config, "model_type", None) == "gpt2":
        limit = int(config.max_position_embeddings)
    if cache is None:
        cache = FwPKMCache(config=model.config, window=window)
    elif not isinstance(cache, FwPKMCache):
        raise TypeError(f"cache: expected an FwPKMCache, got {type(cache).__name__}")
    pos0 = cache.get_seq_length()
    if limit is not None and src.length is not None and pos0 + src.length > limit:
        raise ValueError(f"doc: {src.length} tokens, but {type(model).__name__} has learned absolute "
                         f"positions for {limit} tokens only (use a RoPE model to stream longer)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stats = _Stats(bucket_tokens)
    prev_row: Optional[Tensor] = None
    pos, segments, kv_max, kvb_max, per_seg = pos0, 0, 0, 0, []
    bar = tqdm(total=src.length, unit="tok", unit_scale=True, dynamic_ncols=True, leave=False,
               file=sys.stderr, desc="stream", disable=not progress)
    t0 = time.perf_counter()
    try:
        while True:
            part = src.take(segment_tokens)
            T = len(part)
            if T == 0:
                break
            if int(part.min()) < 0 or int(part.max()) >= vocab:
                raise ValueError(f"doc: token ids must be in [0, {vocab}), got {int(part.min())}.."
                                 f"{int(part.max())} near position {pos}")
            if limit is not None and pos + T > limit:
                raise ValueError(f"doc: position {pos + T} is past the {limit} positions of "
                                 f"{type(model).__name__}")
            x = torch.from_numpy(np.ascontiguousarray(part)).to(device).unsqueeze(0)
            out = model(input_ids=x, cache=cache, use_cache=True)
            logits = out.logits.float()
            nll_rest = (torch.logsumexp(logits[0, :-1], -1)
                        - logits[0, :-1].gather(-1, x[0, 1:, None]).squeeze(-1))
            if prev_row is not None:
                first = torch.logsumexp(prev_row, -1) - prev_row[x[0, 0]]
                nll, start = torch.cat([first[None], nll_rest]), pos
            else:
                nll, start = nll_rest, pos + 1
            if nll.numel():
                stats.add(start, nll.double().cpu().numpy())
            prev_row = logits[0, -1].clone()
            pos += T
            segments += 1
            kv = cache.kv_positions()
            per_seg.append(kv)
            kv_max, kvb_max = max(kv_max, kv), max(kvb_max, cache.kv_nbytes())
            bar.update(T)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    if flush_at_end and cache.memory_states:
        cache.flush_memory(model)
    buckets = stats.buckets()
    return HFStreamReport(tokens=pos - pos0, predicted=sum(b.tokens for b in buckets),
                          nll_sum=sum(b.nll_sum for b in buckets), buckets=buckets,
                          segments=segments, seconds=seconds, max_kv_positions=kv_max,
                          max_kv_bytes=kvb_max, state_bytes=cache.memory_nbytes(),
                          peak_rss_mb=peak_rss_mb(), cache=cache, kv_positions_per_segment=per_seg)
